"""gfnalign.sampling"""
