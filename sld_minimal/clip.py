"""The CLIP ViT-L/14 text transformer that conditions Stable Diffusion 1.x (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision").

SD uses the *last hidden state* (after the final LayerNorm), not the pooled embedding: every one of the 77 token
positions conditions the UNet through cross-attention. Attribute paths equal the keys of the published
`text_encoder/model.safetensors` (`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_positive


@dataclass(frozen=True)
class CLIPTextConfig:
    """Field names are the keys of the published `text_encoder/config.json`; defaults are SD 1.4's."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "max_position_embeddings", "layer_norm_eps")
        if self.max_position_embeddings < 77:  # `tokenizer.tokenize` always gives 77 ids
            raise ValueError(f"key 'max_position_embeddings' must be at least 77 (a prompt is 77 tokens), "
                             f"got {self.max_position_embeddings}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"text encoder hidden_act {self.hidden_act!r} is not supported (use one of {sorted(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("text encoder hidden_size must be a multiple of num_attention_heads")


ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's sigmoid approximation of GELU
    "gelu": F.gelu,
}


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # (B, T, d)
        B, T, d = x.shape
        # (B, T, d) -> (B, heads, T, d/heads)
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # causal: token i attends to tokens 0..i only, as CLIP was trained (a language-model-style mask)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):  # (B, T) int64
        positions = torch.arange(ids.shape[1], device=ids.device)  # the file's `position_ids` buffer, recomputed
        return self.token_embedding(ids) + self.position_embedding(positions)  # (B, T, d)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids):
        x = self.embeddings(ids)  # (B, 77, 768)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)  # (B, 77, 768)


class CLIPTextModel(nn.Module):
    """Token ids (B, 77) -> last hidden state (B, 77, hidden_size). The extra `text_model` level is only there so
    that attribute paths equal the published keys."""

    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, ids):
        return self.text_model(ids)
