"""Random-weight SD 1.x checkpoints for tests, demos and benchmarks, written in the *published* layout.

The folder structure, file names, key names, legacy quirks (`text_model.` prefix, `position_ids`, old VAE
attention names, the VAE encoder) and old-style config files of `CompVis/stable-diffusion-v1-4`, plus a working
CLIP tokenizer folder made in code (byte-level BPE with a few merges). Nothing is downloaded.

    python -m sld_minimal tiny DIR [--config tiny|small|sd14]

A test fixture, not a part of the library: only the `tiny` command and `sld_minimal.testing` import it. The layout
itself (file names, configs, the VAE encoder's keys, SD 1.4's scheduler config) is `diffusers_folder.py`'s, and the
tokenizer files are written by `tokenizer.py`.
"""
from pathlib import Path

import torch

from ..clip import CLIPTextConfig, CLIPTextModel
from ..files import atomic_folder
from ..diffusers_folder import extra_tensors, write_folder
from ..tokenizer import byte_alphabet, write_tokenizer_files
from ..unet import UNet2DConditionModel, UNetConfig
from ..vae import AutoencoderKLDecoder, VAEConfig

# A handful of merges is enough for a working BPE: words made of them become single tokens, the rest bytes.
MERGES = ["t h", "i n", "th e</w>", "a n", "o n</w>", "e r</w>", "c a", "ca t</w>", "d o", "do g</w>",
          "p h", "o t", "ph ot", "phot o</w>", "o f</w>", "k in", "kin g</w>"]
VOCAB_SIZE = 2 * 256 + len(MERGES) + 2  # the generated tokenizer's vocabulary (see write_tokenizer)

# What `write_checkpoint` puts into its folder (`tiny --overwrite` replaces only a folder holding these alone)
WRITTEN = {"model_index.json", "scheduler", "text_encoder", "unet", "vae", "tokenizer"}

# Three sizes: `tiny` (fast tests), `small` (SD 1.4's topology — 4 levels, 2 layers per block, 8 heads,
# cross-attention — at small widths) and `sd14` (full size, for benchmarks).
CONFIGS = {
    "tiny": (CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
             UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                        attention_head_dim=2, cross_attention_dim=32, sample_size=16),
             VAEConfig(block_out_channels=(32, 64), layers_per_block=1)),
    "small": (CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
              UNetConfig(block_out_channels=(32, 64, 64, 96), cross_attention_dim=64, sample_size=8),
              VAEConfig(block_out_channels=(32, 32, 64, 64))),
    "sd14": (CLIPTextConfig(), UNetConfig(), VAEConfig()),
}


def write_tokenizer(folder: Path):
    """CLIP's vocabulary layout: the 256 byte symbols, the same with the end-of-word mark `</w>`, one entry per
    merge, then <|startoftext|> and <|endoftext|> (SD 1.4 pads with the latter)."""
    symbols = [chr(c) for c in byte_alphabet()]
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    write_tokenizer_files(folder, vocab, MERGES)
    return len(vocab)


def published_state_dicts(text_cfg, unet_cfg, vae_cfg, device="cpu", seed=0) -> dict:
    """component -> state dict with the published file's keys. Random weights: PyTorch's default init, with norm
    scales and all biases perturbed so that a swapped or skipped parameter shows in a parity test."""
    torch.manual_seed(seed)
    with torch.device(device):
        text, unet, vae = CLIPTextModel(text_cfg), UNet2DConditionModel(unet_cfg), AutoencoderKLDecoder(vae_cfg)
    extras = extra_tensors(text_cfg, vae_cfg, device)  # the VAE encoder's init is drawn after the three modules'
    dicts = {"text_encoder": dict(text.state_dict()), "unet": dict(unet.state_dict()), "vae": dict(vae.state_dict())}
    dicts["vae"] |= extras["vae"]
    if device != "meta":
        for sd in dicts.values():
            for k, v in sd.items():
                if k.endswith(".bias"):
                    sd[k] = v + 0.1 * torch.randn_like(v)
                elif "norm" in k and k.endswith(".weight"):
                    sd[k] = v + 0.1 * torch.randn_like(v)
    dicts["text_encoder"] |= extras["text_encoder"]  # the file keeps CLIP's position-id buffer
    return dicts


def write_checkpoint(folder, config="tiny", seed=0, overwrite=False) -> Path:
    """Write an SD 1.x model folder in the published diffusers layout with random weights; returns the folder.
    `config` is one of CONFIGS or a (text, unet, vae) config triple. The folder appears complete or not at all
    (`files.atomic_folder`); a non-empty one is refused unless `overwrite`."""
    folder = Path(folder)
    text_cfg, unet_cfg, vae_cfg = CONFIGS[config] if isinstance(config, str) else config
    with atomic_folder(folder, overwrite) as tmp:
        write_tokenizer(tmp / "tokenizer")
        dicts = published_state_dicts(text_cfg, unet_cfg, vae_cfg, seed=seed)
        write_folder(tmp, (text_cfg, unet_cfg, vae_cfg), dicts)
    return folder
