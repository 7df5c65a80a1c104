"""gfnalign.evaluation: how far a fine-tuned model got, and what it cost.

* :mod:`.metrics`: reward mean/std, per-prompt diversity, per-prompt Fréchet prior drift (pure torch).
* :mod:`.features`: feature spaces for those metrics (digits classifier, CLIP, DreamSim, pixels).
* :mod:`.evaluate`: sample a backbone with and without its adapter from the same noise and compare
  (behind ``gfnalign eval``).
"""
