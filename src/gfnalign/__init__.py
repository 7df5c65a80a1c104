"""gfnalign: align text-to-image diffusion models to rewards with GFlowNets.

Layers (lower never import higher): core -> objectives / sampling / toy -> backbones / rewards ->
training / evaluation -> cli. Only ``backbones`` imports diffusers/peft; accelerate is used by
``training`` and ``cli`` alone.
"""

__version__ = "0.1.0"
