"""Writes a Stable Diffusion 1.x checkpoint with random weights in the *published* layout: the folder structure,
file names, key names, legacy quirks (`text_model.` prefix, `position_ids`, old VAE attention names, the VAE
encoder) and old-style config files of `CompVis/stable-diffusion-v1-4`, plus a working CLIP tokenizer folder made
in code (byte-level BPE with a few merges). Tests, demos and benchmarks use it; nothing is downloaded.

    python -m sld_minimal tiny DIR [--config tiny|small|sd14]
"""
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .clip import CLIPTextConfig, CLIPTextModel
from .unet import ResnetBlock2D, UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKLDecoder, VAEAttention, VAEConfig

SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
# A handful of merges is enough for a working BPE: words made of them become single tokens, the rest bytes.
MERGES = ["t h", "i n", "th e</w>", "a n", "o n</w>", "e r</w>", "c a", "ca t</w>", "d o", "do g</w>",
          "p h", "o t", "ph ot", "phot o</w>", "o f</w>", "k in", "kin g</w>"]
VOCAB_SIZE = 2 * 256 + len(MERGES) + 2  # the generated tokenizer's vocabulary (see write_tokenizer)

# Three sizes: `tiny` (fast tests), `small` (SD 1.4's topology — 4 levels, 2 layers per block, 8 heads,
# cross-attention — at small widths) and `sd14` (full size, for benchmarks).
CONFIGS = {
    "tiny": (CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
             UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                        attention_head_dim=2, cross_attention_dim=32),
             VAEConfig(block_out_channels=(32, 64), layers_per_block=1)),
    "small": (CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
              UNetConfig(block_out_channels=(32, 64, 64, 96), cross_attention_dim=64),
              VAEConfig(block_out_channels=(32, 32, 64, 64))),
    "sd14": (CLIPTextConfig(), UNetConfig(), VAEConfig()),
}


def write_tokenizer(folder: Path):
    """CLIP's vocabulary layout: the 256 byte symbols, the same with the end-of-word mark `</w>`, one entry per
    merge, then <|startoftext|> and <|endoftext|> (SD 1.4 pads with the latter)."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = [chr(c) for c in byte_alphabet()]
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": 77, "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
         "tokenizer_class": "CLIPTokenizer"}, indent=2))
    return len(vocab)


def byte_alphabet() -> list:
    """The code points byte-level BPE uses for bytes 0..255 (printable ones map to themselves)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    table = dict(zip(printable, printable)) | {b: 256 + i for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


class _Encoder(nn.Module):
    """The VAE encoder's key layout (random weights only: sampling never runs it, but the published file has it)."""

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
        self.conv_norm_out = nn.GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)


def published_state_dicts(text_cfg, unet_cfg, vae_cfg, device="cpu", seed=0) -> dict:
    """component -> state dict with the published file's keys. Random weights: PyTorch's default init, with norm
    scales and all biases perturbed so that a swapped or skipped parameter shows in a parity test."""
    torch.manual_seed(seed)
    with torch.device(device):
        text, unet, vae = CLIPTextModel(text_cfg), UNet2DConditionModel(unet_cfg), AutoencoderKLDecoder(vae_cfg)
        encoder, quant_conv = _Encoder(vae_cfg), nn.Conv2d(2 * vae_cfg.latent_channels, 2 * vae_cfg.latent_channels, 1)
    dicts = {"text_encoder": dict(text.state_dict()), "unet": dict(unet.state_dict()), "vae": dict(vae.state_dict())}
    dicts["vae"] |= {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    dicts["vae"] |= {f"quant_conv.{k}": v for k, v in quant_conv.state_dict().items()}
    if device != "meta":
        for sd in dicts.values():
            for k, v in sd.items():
                if k.endswith(".bias"):
                    sd[k] = v + 0.1 * torch.randn_like(v)
                elif "norm" in k and k.endswith(".weight"):
                    sd[k] = v + 0.1 * torch.randn_like(v)
    positions = torch.arange(text_cfg.max_position_embeddings, device=device)[None]  # the file keeps this buffer
    dicts["text_encoder"]["text_model.embeddings.position_ids"] = positions
    return dicts


def write_checkpoint(folder, config="tiny", seed=0, **overrides) -> Path:
    """Write an SD 1.x model folder in the published diffusers layout with random weights; returns the folder.
    `config` is one of CONFIGS or a (text, unet, vae) config triple."""
    folder = Path(folder)
    text_cfg, unet_cfg, vae_cfg = CONFIGS[config] if isinstance(config, str) else config
    write_tokenizer(folder / "tokenizer")
    dicts = published_state_dicts(text_cfg, unet_cfg, vae_cfg, seed=seed)
    return write_folder(folder, (text_cfg, unet_cfg, vae_cfg), dicts)


def write_folder(folder, model_configs, dicts, scheduler_config=SCHEDULER_CONFIG) -> Path:
    """The published layout's files but the tokenizer — config.json and weights per component, the scheduler config,
    model_index.json — for `model_configs` (text, unet, vae) and state dicts with the published keys."""
    folder, (text_cfg, unet_cfg, vae_cfg) = Path(folder), model_configs
    names = {"text_encoder": "model.safetensors", "unet": "diffusion_pytorch_model.safetensors",
             "vae": "diffusion_pytorch_model.safetensors"}
    configs = {"text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32",
                                **dataclasses.asdict(text_cfg)},
               "unet": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False,
                        "downsample_padding": 1, "mid_block_scale_factor": 1, "sample_size": 64,
                        **dataclasses.asdict(unet_cfg)},
               # old-style: no norm_num_groups, no scaling_factor (the published file omits both)
               "vae": {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": 3, "sample_size": 512,
                       "down_block_types": ["DownEncoderBlock2D"] * len(vae_cfg.block_out_channels),
                       "up_block_types": ["UpDecoderBlock2D"] * len(vae_cfg.block_out_channels),
                       **{k: v for k, v in dataclasses.asdict(vae_cfg).items()
                          if k not in ("norm_num_groups", "scaling_factor") or v != getattr(VAEConfig(), k)}}}
    for component, sd in dicts.items():
        sub = folder / component
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "config.json").write_text(json.dumps(configs[component], indent=2))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(sub / names[component]), metadata={"format": "pt"})
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    index = {"_class_name": "StableDiffusionPipeline",
             "scheduler": ["diffusers", scheduler_config.get("_class_name", "PNDMScheduler")],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
