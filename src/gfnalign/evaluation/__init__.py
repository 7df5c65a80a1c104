"""gfnalign.evaluation"""
