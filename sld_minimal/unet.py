"""The conditional UNet of Stable Diffusion 1.x: ε_θ(z_t, t, c), the noise predicted in a 4-channel latent
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3.3).

Down path: resnets + spatial transformers (self-attention, cross-attention to the text, GEGLU feed-forward) at
4 resolutions; a middle block; an up path that concatenates the down path's outputs (skip connections).
Attribute paths equal the keys of the published `unet/diffusion_pytorch_model.safetensors`. Plain `nn` modules
throughout: the loader lays CPU speed-ups over them (`speedups.py`).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checks import check_divides, check_positive


@dataclass(frozen=True)
class UNetConfig:
    """Field names are the keys of the published `unet/config.json`; defaults are SD 1.4's.

    Note: in SD 1.x's config, `attention_head_dim` (8) is really the number of heads; the head size is
    channels / 8 (40, 80, 160). The name is a historical mistake that the published files keep.
    """
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    attention_head_dim: int = 8  # number of heads, see above
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int = 64  # the latent size it was trained at: 64 × the VAE's 8 = 512 px, the default image size

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("unet config: block_out_channels, down_block_types and up_block_types differ in length")
        known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
        if not set(self.down_block_types + self.up_block_types) <= known:
            raise ValueError(f"unet config: only the SD 1.x block types {sorted(known)} are supported")
        check_positive(self, "in_channels", "out_channels", "block_out_channels", "layers_per_block",
                       "attention_head_dim", "cross_attention_dim", "norm_num_groups", "norm_eps", "sample_size")
        check_divides(self, "norm_num_groups", self.block_out_channels)  # every GroupNorm's channels
        rch = self.block_out_channels[::-1]  # the up path's widths
        attended = {self.block_out_channels[-1]} | {  # the widths of the levels with a spatial transformer
            c for types, chs in ((self.down_block_types, self.block_out_channels), (self.up_block_types, rch))
            for kind, c in zip(types, chs) if kind.startswith("CrossAttn")}
        check_divides(self, "attention_head_dim", sorted(attended))  # heads split those widths


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0, max_period: float = 10000.0):
    """Sinusoidal embedding of t (Vaswani et al. 2017, sec. 3.5; DDPM uses it for the timestep):
    e_k = [cos(t·ω_k), sin(t·ω_k)] with ω_k = max_period^(−k/(dim/2 − shift)), k = 0..dim/2−1.
    SD 1.x's `flip_sin_to_cos` puts the cosines first."""
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    angles = t.float()[:, None] * omega[None, :]  # (B, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, dim)


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → conv, plus the time embedding, GroupNorm → SiLU → conv, plus the (1×1-projected) input."""

    def __init__(self, cin, cout, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        if temb_dim:
            self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb=None):  # x (B, cin, h, w), temb (B, temb_dim)
        # in place only on tensors made here (norm and conv outputs, which no backward needs): the same values,
        # fewer activations alive — the VAE's are 32–64 MiB each at 256 px
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        if temb is not None:
            h += self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x)  # (B, cout, h, w)


class Attention(nn.Module):
    """Multi-head attention softmax(QKᵀ/√d)V; keys and values come from `context` (cross-attention) or from x."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])  # index 1 keeps the key `to_out.0`

    def forward(self, x, context=None):  # x (B, N, dim), context (B, 77, context_dim)
        context = x if context is None else context
        q, k, v = (rearrange(p(s), "b n (h d) -> b h n d", h=self.heads)
                   for p, s in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.to_out[0](rearrange(y, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """GLU with a GELU gate (Shazeer 2020): proj(x) = [a, g], out = a ⊙ GELU(g)."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.attn1 = Attention(dim, heads)               # self-attention over the latent's positions
        self.attn2 = Attention(dim, heads, context_dim)  # cross-attention to the text tokens
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x, context):  # (B, hw, C)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net[2](self.ff.net[0](self.norm3(x)))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, 1×1 conv in, one transformer block over the h·w positions, 1×1 conv out,
    plus the input."""

    def __init__(self, channels, heads, context_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):  # x (B, C, h, w)
        B, C, h, w = x.shape
        y = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(rearrange(y, "b (h w) c -> b c h w", h=h, w=w))


class Block(nn.Module):
    """One resolution level of the down or up path: resnets, each followed by a spatial transformer where the level
    has attention, then an optional down- or upsampler. The up path's resnets also take a skip connection."""

    def __init__(self, cfg: UNetConfig, cins, cout, attn, sampler=None):
        super().__init__()
        g, temb = cfg.norm_num_groups, 4 * cfg.block_out_channels[0]
        self.resnets = nn.ModuleList(ResnetBlock2D(cin, cout, temb, g, cfg.norm_eps) for cin in cins)
        if attn:
            self.attentions = nn.ModuleList(
                Transformer2DModel(cout, cfg.attention_head_dim, cfg.cross_attention_dim, g) for _ in cins)
        if sampler:
            conv = nn.Module()
            conv.conv = nn.Conv2d(cout, cout, 3, stride=2 if sampler == "down" else 1, padding=1)
            setattr(self, sampler + "samplers", nn.ModuleList([conv]))

    def forward(self, x, temb, context, skips=None, size=None):
        outputs = []
        for i, resnet in enumerate(self.resnets):
            if skips is not None:  # up path: concatenate the matching down-path output along channels
                x = torch.cat([x, skips.pop()], dim=1)
            x = resnet(x, temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context)
            outputs.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0].conv(x)
            outputs.append(x)
        if hasattr(self, "upsamplers"):
            # nearest-neighbour to the next skip's size: ×2, or the odd size the down path had (any latent size)
            x = self.upsamplers[0].conv(F.interpolate(x, size=size, mode="nearest"))
        return x, outputs


class UNet2DConditionModel(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg
        ch, L, g = cfg.block_out_channels, cfg.layers_per_block, cfg.norm_num_groups
        temb = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(ch[0], temb)
        self.time_embedding.linear_2 = nn.Linear(temb, temb)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            cin = ch[max(i - 1, 0)]
            self.down_blocks.append(Block(cfg, [cin] + [ch[i]] * (L - 1), ch[i], kind.startswith("CrossAttn"),
                                          "down" if i < len(ch) - 1 else None))
        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList(ResnetBlock2D(ch[-1], ch[-1], temb, g, cfg.norm_eps) for _ in range(2))
        self.mid_block.attentions = nn.ModuleList(
            [Transformer2DModel(ch[-1], cfg.attention_head_dim, cfg.cross_attention_dim, g)])

        # The up path mirrors the down path with L + 1 resnets per level; resnet j takes the previous output plus
        # the down path's output that the skip stack yields at that point (its channel count varies).
        self.up_blocks = nn.ModuleList()
        rch = ch[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            prev, out, skip_last = rch[max(i - 1, 0)], rch[i], rch[min(i + 1, len(ch) - 1)]
            cins = [(prev if j == 0 else out) + (skip_last if j == L else out) for j in range(L + 1)]
            self.up_blocks.append(Block(cfg, cins, out, kind.startswith("CrossAttn"),
                                        "up" if i < len(ch) - 1 else None))
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x, t, context):
        """x: latents (B, 4, h, w); t: int or tensor of timesteps (scalar or (B,)); context: text (B, 77, 768).
        Returns ε_θ(x, t, context), (B, 4, h, w)."""
        cfg = self.config
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype)
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(emb)))  # (B, 1280)

        x = self.conv_in(x)  # (B, 320, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, outputs = block(x, temb, context)
            skips += outputs
        x = self.mid_block.resnets[0](x, temb)
        x = self.mid_block.attentions[0](x, context)
        x = self.mid_block.resnets[1](x, temb)
        for block in self.up_blocks:
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            x, _ = block(x, temb, context, level_skips, size=skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 4, h, w)
