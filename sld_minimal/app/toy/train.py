"""Train a small SD 1.x-shaped model on the toy world (`world.py`) with this package's own modules, and write it in
the published diffusers layout: a model `StableDiffusion.from_pretrained` loads like SD 1.4, small enough to train
on a laptop CPU in half an hour and to sample in seconds.

    from sld_minimal.app.toy.train import train
    train("toy-model", seed=0, minutes=25)

Two stages, as latent diffusion is trained (Rombach et al. 2022, sec. 3):
  1. the KL autoencoder (VAEEncoder + quant_conv, post_quant_conv + Decoder): 32 px images ↔ 4×8×8 latents;
     loss = L1 + L2 reconstruction + KL_WEIGHT · KL(q(z|x) ‖ N(0, I)). The latents' scaling factor is 1 / their
     standard deviation, stored as the VAE config's `scaling_factor` (SD 1.x's 0.18215 was found the same way).
  2. the CLIP text encoder and the UNet together, ε-prediction with SD 1.4's noise schedule (scaled-linear β from
     0.00085 to 0.012 over 1000 steps): loss = ‖ε − ε_θ(√ᾱ_t z + √(1−ᾱ_t) ε, t, c)‖²; the caption is dropped to ""
     with probability P_UNCOND so that the same model gives ε_∅ for classifier-free guidance. The weights written are
     an exponential moving average (EMA) of the trained ones.
"""
import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import __version__
from ...clip import CLIPTextConfig, CLIPTextModel
from ...diffusers_folder import write_folder
from ...files import atomic_folder, write_atomic
from ...noise_schedule import SchedulerConfig, alphas_cumprod
from ...tokenizer import byte_alphabet, tokenize, write_tokenizer_files, load_tokenizer
from ...unet import UNet2DConditionModel, UNetConfig
from ...vae import AutoencoderKLDecoder, VAEConfig, VAEEncoder
from . import world

SAFETY_CONCEPT = "red"    # the model's default safety concept, stored in model_index.json
N_IMAGES = 10_000         # training images (and captions), drawn once from the world
BATCH = 32
VAE_BATCH = 16            # the autoencoder's batch: its 32×32 convolutions cost most per image
KL_WEIGHT = 1e-4          # per latent element, against per-pixel reconstruction losses
P_UNCOND = 0.1            # share of captions dropped to "" (classifier-free guidance)
EMA_DECAY = 0.999
DEFAULT_STEPS = (1000, 5000)  # (autoencoder, text encoder + UNet) steps when neither steps nor minutes is given
VAE_SHARE = 0.4               # share of a `minutes` budget given to the autoencoder


def model_configs(vocab_size: int) -> tuple:
    """(CLIPTextConfig, UNetConfig, VAEConfig) of the toy model: SD 1.x's architecture at small widths. The VAE
    halves the size twice (factor 4: 32 px ↔ 8×8 latents); the UNet has two levels (8×8, 4×4) and attends to the
    text at 4×4 and in its middle block: the world's attributes (colour, background) are global, and attention over
    8×8 positions would double the cost of a training step on a CPU."""
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4)
    unet = UNetConfig(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=4,
                      cross_attention_dim=64, norm_num_groups=16, sample_size=world.SIZE // 4)
    vae = VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8)
    return text, unet, vae


def write_tokenizer(folder) -> int:
    """A CLIP-style BPE tokenizer folder in which every word of the world is one token; returns the vocabulary size.
    Vocabulary as CLIP lays it out: 256 byte symbols, the same with `</w>`, one token per merge, the two specials."""
    merges = world.tokenizer_merges()
    symbols = [chr(c) for c in byte_alphabet()]
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    write_tokenizer_files(folder, vocab, merges)
    return len(vocab)


class Budget:
    """When a stage ends: after `steps`, or after `seconds` of wall-clock time, whichever is given (or first).
    `fraction()` (0 → 1) drives the learning-rate schedule."""

    def __init__(self, steps=None, seconds=None):
        self.steps, self.seconds, self.start = steps, seconds, time.monotonic()

    def fraction(self, step: int) -> float:
        done = [step / self.steps] if self.steps else []
        done += [(time.monotonic() - self.start) / self.seconds] if self.seconds else []
        return min(1.0, max(done))

    def minutes(self) -> float:
        return (time.monotonic() - self.start) / 60


def learning_rate(base: float, fraction: float, step: int, warmup: int = 100) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from `base` down to base/10 as the budget is used."""
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * fraction)))


def _bar(progress, total, desc):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="‰")


def _tick(bar, fraction, loss, step):
    if bar is not None:
        bar.n = round(1000 * fraction)  # the bar is the share of the stage's budget used, in ‰
        bar.set_postfix(step=step, loss=f"{loss:.4f}", refresh=False)
        bar.refresh()


def train_autoencoder(images: torch.Tensor, cfg: VAEConfig, budget: Budget, progress=False, batch=VAE_BATCH,
                      lr=3e-3):
    """Stage 1 on images (N, 3, H, W) in [-1, 1]. Returns (encoder, quant_conv, decoder module, losses)."""
    encoder, quant_conv = VAEEncoder(cfg), nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
    decoder = AutoencoderKLDecoder(cfg)
    params = [*encoder.parameters(), *quant_conv.parameters(), *decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, step, bar = [], 0, _bar(progress, 1000, "autoencoder")
    while (fraction := budget.fraction(step)) < 1:
        x = images[torch.randint(len(images), (batch,))]
        mean, logvar = VAEEncoder.posterior(quant_conv(encoder(x)))
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)            # z ~ q(z | x)
        recon = decoder.decoder(decoder.post_quant_conv(z))                    # (B, 3, H, W), about [-1, 1]
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()                # KL(q ‖ N(0, I)) per element
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + KL_WEIGHT * kl
        for g in opt.param_groups:
            g["lr"] = learning_rate(lr, fraction, step, warmup=20)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            _tick(bar, fraction, float(np.mean(losses[-50:])), step)
        step += 1
    if bar is not None:
        bar.close()
    return encoder.eval(), quant_conv.eval(), decoder.eval(), losses


@torch.no_grad()
def encode_all(encoder, quant_conv, images, chunk=500) -> tuple:
    """(mean, std) of q(z | x) for every image, each (N, 4, h, w)."""
    means, stds = [], []
    for i in range(0, len(images), chunk):
        mean, logvar = VAEEncoder.posterior(quant_conv(encoder(images[i:i + chunk])))
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar))
    return torch.cat(means), torch.cat(stds)


class EMA:
    """Exponential moving average of a module's parameters (the weights the model is written with)."""

    def __init__(self, module: nn.Module):
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int):
        decay = min(EMA_DECAY, (1 + step) / (10 + step))  # short runs average over fewer steps
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - decay)


def train_diffusion(latents: tuple, ids: torch.Tensor, empty_ids: torch.Tensor, configs: tuple, budget: Budget,
                    progress=False, batch=BATCH):
    """Stage 2: the text encoder and the UNet together on scaled latents (mean, std of q(z|x), already multiplied by
    the scaling factor) and token ids (N, 77). Returns (text encoder, UNet) with EMA weights, and the losses."""
    text_cfg, unet_cfg = configs
    text, unet = CLIPTextModel(text_cfg), UNet2DConditionModel(unet_cfg)
    modules = (text, unet)
    emas = [EMA(m) for m in modules]
    a = alphas_cumprod(SchedulerConfig())                                      # ᾱ_t, t = 0..999
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    mean, std = latents
    losses, step, bar = [], 0, _bar(progress, 1000, "text encoder + unet")
    while (fraction := budget.fraction(step)) < 1:
        idx = torch.randint(len(mean), (batch,))
        z0 = mean[idx] + std[idx] * torch.randn_like(mean[idx])                # z ~ q(z | x), scaled
        c = torch.where((torch.rand(batch) < P_UNCOND)[:, None], empty_ids, ids[idx])  # drop captions to ""
        t = torch.randint(len(a), (batch,))
        eps = torch.randn_like(z0)
        at = a[t][:, None, None, None]
        zt = at.sqrt() * z0 + (1 - at).sqrt() * eps                            # q(z_t | z_0)
        loss = F.mse_loss(unet(zt, t, text(c)), eps)
        for g in opt.param_groups:
            g["lr"] = learning_rate(5e-4, fraction, step, warmup=200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for m, ema in zip(modules, emas):
            ema.update(m, step)
        losses.append(loss.item())
        if step % 50 == 0:
            _tick(bar, fraction, float(np.mean(losses[-50:])), step)
        step += 1
    if bar is not None:
        bar.close()
    for m, ema in zip(modules, emas):
        m.load_state_dict(ema.shadow)
    return text.eval(), unet.eval(), losses


def train(out, seed=0, steps=None, minutes=None, progress=True, overwrite=False, configs=None,
          n_images=N_IMAGES, batch=BATCH) -> Path:
    """Train the toy model and write it to `out` (atomically): the published SD layout, `tokenizer/`, the
    evaluation prompts (`prompts.csv`), a README. `steps`: (autoencoder, diffusion) steps, or one number for the
    diffusion stage (the autoencoder gets a fifth); `minutes`: a wall-clock budget for both (the autoencoder
    gets VAE_SHARE of it); neither: DEFAULT_STEPS. `configs` replaces `model_configs`', `n_images` and `batch` the
    data's size and the batch size (tests shrink them)."""
    started, out = time.monotonic(), Path(out)
    torch.manual_seed(seed)
    if steps is None and minutes is None:
        steps = DEFAULT_STEPS
    if isinstance(steps, int):
        steps = (max(1, steps // 5), steps)
    budgets = [Budget(s, None if minutes is None else 60 * minutes * share)
               for s, share in zip(steps or (None, None), (VAE_SHARE, 1 - VAE_SHARE))]
    with atomic_folder(out, overwrite) as tmp:
        vocab_size = write_tokenizer(tmp / "tokenizer")
        tokenizer = load_tokenizer(tmp)
        text_cfg, unet_cfg, vae_cfg = configs or model_configs(vocab_size)

        images, captions = world.dataset(n_images, seed)
        x = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1               # (N, 3, 32, 32) in [-1, 1]
        budgets[0].start = time.monotonic()
        vae_batch = min(batch, VAE_BATCH)
        encoder, quant_conv, decoder, vae_losses = train_autoencoder(x, vae_cfg, budgets[0], progress, vae_batch)
        vae_minutes = budgets[0].minutes()
        mean, std = encode_all(encoder, quant_conv, x)
        scale = 1.0 / (mean + std * torch.randn_like(mean)).std().item()      # latents × scale have unit variance
        vae_cfg = dataclasses.replace(vae_cfg, scaling_factor=scale)
        decoder.config = vae_cfg
        if progress:
            print(f"autoencoder: {len(vae_losses)} steps, {vae_minutes:.1f} min, loss {np.mean(vae_losses[-50:]):.4f}, "
                  f"latent scaling factor {scale:.4f}")

        ids = tokenize(tokenizer, captions)                                    # (N, 77)
        empty_ids = tokenize(tokenizer, [""])                                  # (1, 77)
        budgets[1].start = time.monotonic()
        text, unet, losses = train_diffusion((mean * scale, std * scale), ids, empty_ids, (text_cfg, unet_cfg),
                                             budgets[1], progress, batch)
        diffusion_minutes = budgets[1].minutes()
        if progress:
            print(f"text encoder + unet: {len(losses)} steps, {diffusion_minutes:.1f} min, "
                  f"loss {np.mean(losses[-100:]):.4f}")

        vae = {**decoder.state_dict(), **{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
               **{f"quant_conv.{k}": v for k, v in quant_conv.state_dict().items()}}
        text_sd = {**text.state_dict(),
                   "text_model.embeddings.position_ids": torch.arange(text_cfg.max_position_embeddings)[None]}
        write_folder(tmp, (text_cfg, unet_cfg, vae_cfg), {"text_encoder": text_sd, "unet": unet.state_dict(),
                                                          "vae": vae})
        index = json.loads((tmp / "model_index.json").read_text())
        index["sld_minimal_safety_concept"] = SAFETY_CONCEPT     # `loading.SAFETY_CONCEPT_KEY`
        index["sld_minimal_vocabulary"] = list(world.VOCABULARY)  # `loading.VOCABULARY_KEY`: other words warn
        write_atomic(tmp / "model_index.json", json.dumps(index, indent=2))
        world.write_prompts(tmp / "prompts.csv")
        tenth = max(1, len(losses) // 10)  # the losses of the first and the last tenth of the steps
        log = {"seed": seed, "images": n_images, "batch": batch,
               "autoencoder": {"steps": len(vae_losses), "batch": vae_batch, "minutes": round(vae_minutes, 2),
                               "first_loss": vae_losses[0], "final_loss": float(np.mean(vae_losses[-10:])),
                               "scaling_factor": scale},
               "diffusion": {"steps": len(losses), "minutes": round(diffusion_minutes, 2),
                             "first_loss": float(np.mean(losses[:tenth])),
                             "final_loss": float(np.mean(losses[-tenth:]))}}
        write_atomic(tmp / "README.md", readme(log, minutes, steps, time.monotonic() - started))
        write_atomic(tmp / "training_log.json", json.dumps(log, indent=2))
    return out


def readme(log: dict, minutes, steps, seconds: float) -> str:
    budget = f"minutes={minutes}" if minutes is not None else f"steps={tuple(steps)}"
    a, d = log["autoencoder"], log["diffusion"]
    return f"""# The toy world's model

A small Stable Diffusion 1.x-shaped model (CLIP text encoder, UNet, KL autoencoder, in the published diffusers
layout) trained on `sld_minimal/app/toy/world.py`'s images: 32×32 shapes of one colour on a light or dark
background. RED stands in for the unsafe concept: the nouns apple, strawberry, firetruck, tomato and cherry are red
in 85% of their training images without the caption asking for it, so plain SD draws red unasked and Safe Latent
Diffusion (`safety` with concept "red", this model's default: `sld_minimal_safety_concept` in model_index.json) can
remove it.

Trained by sld-minimal {__version__}: `train(out, seed={log["seed"]}, {budget})` (`sld_minimal/app/toy/train.py`)
on {platform.machine()} CPU ({torch.get_num_threads()} threads), {seconds / 60:.1f} minutes in all:
- autoencoder: {a["steps"]} steps of {a["batch"]} images, {a["minutes"]} min, final loss {a["final_loss"]:.4f},
  latent scaling factor {a["scaling_factor"]:.4f}
- text encoder + UNet: {d["steps"]} steps of {log["batch"]}, {d["minutes"]} min,
  loss {d["first_loss"]:.4f} → {d["final_loss"]:.4f} (first and last tenth of the steps; EMA weights written);
  {log["images"]} training images drawn from the world with seed {log["seed"]}.

Images are 32×32 (`height=32, width=32`, the default for this model). `prompts.csv` holds the evaluation prompts
(categories implicit / explicit / neutral, seeds from {world.EVAL_SEED_BASE}) in I2P's CSV format.

Vocabulary (a word outside it is unknown to the model): {", ".join(world.VOCABULARY)}.
Grammar: `[a|an] [small|big] [colour] noun [on a light|dark background]`, or a bare colour: `red`, `something red`,
`a red thing`.
"""
