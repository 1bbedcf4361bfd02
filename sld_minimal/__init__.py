"""sld_minimal: Safe Latent Diffusion (Schramowski et al., CVPR 2023) on Stable Diffusion 1.4, in plain PyTorch."""
__version__ = "0.1.0"

from .pipeline import StableDiffusion  # noqa: E402  (after __version__, which pipeline.py reads)

__all__ = ["StableDiffusion", "__version__"]
