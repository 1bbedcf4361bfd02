"""sld_minimal: Safe Latent Diffusion (Schramowski et al., CVPR 2023) on Stable Diffusion 1.4, in plain PyTorch."""
__version__ = "0.1.0"
