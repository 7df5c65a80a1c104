"""gfnalign.objectives"""
