"""SD 1.x's KL autoencoder (Rombach et al. 2022, sec. 3.1): the decoder, latents z (B, 4, h, w) → image
x (B, 3, 8h, 8w), which sampling runs; and the encoder (`VAEEncoder`), image → the posterior's moments, which
sampling never needs: the loader skips the published file's `encoder.*` and `quant_conv.*` tensors. Training runs
it (the toy world, `app/toy/train.py`), and the writers of the layout use its keys (`diffusers_folder.extra_tensors`).

Attribute paths equal the keys of the published `vae/diffusion_pytorch_model.safetensors`, including the old
names of the mid-block attention (`group_norm`, `query`, `key`, `value`, `proj_attn`).
"""
from dataclasses import dataclass

import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checks import check_divides, check_positive
from .unet import ResnetBlock2D


@dataclass(frozen=True)
class VAEConfig:
    """Field names are the keys of `vae/config.json`; the published file omits the last two (SD 1.4 defaults)."""
    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # latents were scaled by this to unit variance before diffusion training

    def __post_init__(self):  # 0 would divide the latents by zero: an all-black image
        check_positive(self, "latent_channels", "out_channels", "block_out_channels", "layers_per_block",
                       "norm_num_groups", "scaling_factor")
        check_divides(self, "norm_num_groups", self.block_out_channels)

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel: the decoder doubles the size per level after the first (8 for SD 1.x)."""
        return 2 ** (len(self.block_out_channels) - 1)


class VAEAttention(nn.Module):
    """Single-head self-attention over the h·w positions, with a GroupNorm in front and the input added back."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.query, self.key, self.value, self.proj_attn = (nn.Linear(channels, channels) for _ in range(4))

    def forward(self, x):  # (B, C, h, w)
        B, C, h, w = x.shape
        y = rearrange(self.group_norm(x), "b c h w -> b 1 (h w) c")
        y = F.scaled_dot_product_attention(self.query(y), self.key(y), self.value(y))  # one head of size C
        return x + rearrange(self.proj_attn(y), "b 1 (h w) c -> b c h w", h=h, w=w)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, L = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.layers_per_block  # ch: 512, 512, 256, 128
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList(ResnetBlock2D(ch[0], ch[0], None, g, 1e-6) for _ in range(2))
        self.mid_block.attentions = nn.ModuleList([VAEAttention(ch[0], g)])
        self.up_blocks = nn.ModuleList()
        for i, cout in enumerate(ch):
            block = nn.Module()
            cin = ch[max(i - 1, 0)]
            block.resnets = nn.ModuleList(ResnetBlock2D(cin if j == 0 else cout, cout, None, g, 1e-6) for j in range(L + 1))
            if i < len(ch) - 1:  # every level but the last doubles the resolution
                up = nn.Module()
                up.conv = nn.Conv2d(cout, cout, 3, padding=1)
                block.upsamplers = nn.ModuleList([up])
            self.up_blocks.append(block)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):  # (B, 4, h, w)
        x = self.conv_in(z)
        x = self.mid_block.resnets[0](x)
        x = self.mid_block.attentions[0](x)
        x = self.mid_block.resnets[1](x)
        for block in self.up_blocks:
            for resnet in block.resnets:
                x = resnet(x)
            if hasattr(block, "upsamplers"):
                x = block.upsamplers[0].conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))  # (B, 3, 8h, 8w) in about [-1, 1]


class AutoencoderKLDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = cfg
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def forward(self, latents):
        """Diffusion latents (B, 4, h, w) → image (B, 3, 8h, 8w) in [0, 1]. Undoes the latent scaling
        (z = latents / 0.18215) itself; the input is not modified."""
        z = latents / self.config.scaling_factor
        x = self.decoder(self.post_quant_conv(z))
        return (x / 2 + 0.5).clamp(0, 1)


class VAEEncoder(nn.Module):
    """The VAE encoder (`encoder.*` in the published file): image x (B, 3, H, W) in [-1, 1] → the moments
    (B, 2·latent_channels, H/f, W/f) of the posterior q(z | x): its mean and log-variance, concatenated along
    channels (`posterior`). Sampling never runs it; training the toy world (`app/toy/train.py`) does. The published
    file's 1×1 `quant_conv` follows it, a separate module there (`diffusers_folder.extra_tensors`)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, L = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, cout in enumerate(ch):
            block = nn.Module()
            block.resnets = nn.ModuleList(ResnetBlock2D(ch[max(i - 1, 0)] if j == 0 else cout, cout, None, g, 1e-6)
                                          for j in range(L))
            if i < len(ch) - 1:
                down = nn.Module()
                down.conv = nn.Conv2d(cout, cout, 3, stride=2)
                block.downsamplers = nn.ModuleList([down])
            self.down_blocks.append(block)
        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList(ResnetBlock2D(ch[-1], ch[-1], None, g, 1e-6) for _ in range(2))
        self.mid_block.attentions = nn.ModuleList([VAEAttention(ch[-1], g)])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, H, W) in [-1, 1]
        x = self.conv_in(x)
        for block in self.down_blocks:
            for resnet in block.resnets:
                x = resnet(x)
            if hasattr(block, "downsamplers"):
                # stride 2 with no padding after one zero row/column at the bottom and right: H → H/2 exactly
                x = block.downsamplers[0].conv(F.pad(x, (0, 1, 0, 1)))
        x = self.mid_block.resnets[0](x)
        x = self.mid_block.attentions[0](x)
        x = self.mid_block.resnets[1](x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2·latent_channels, H/f, W/f)

    @staticmethod
    def posterior(moments):
        """Moments (B, 2c, h, w) → (mean, logvar) of the diagonal Gaussian q(z | x), each (B, c, h, w); the
        log-variance clamped to [−30, 20] as SD's `DiagonalGaussianDistribution` does."""
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)
