"""gfnalign.toy"""
