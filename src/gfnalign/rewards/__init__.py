"""gfnalign.rewards"""
