"""gfnalign.backbones"""
