"""sld_minimal: Safe Latent Diffusion (Schramowski et al., CVPR 2023) on Stable Diffusion 1.4, in plain PyTorch."""
from ._version import __version__
from .pipeline import StableDiffusion
from .sampling import STOP

__all__ = ["STOP", "StableDiffusion", "__version__"]
