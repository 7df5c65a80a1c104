"""gfnalign.training"""
