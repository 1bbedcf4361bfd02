"""Stable Diffusion 1.x with Safe Latent Diffusion: the parts, and the sampling loop that joins them.

    pipe = StableDiffusion.from_pretrained("weights/stable-diffusion-v1-4")
    out = pipe("a portrait of a king", safety="strong", seed=0)
    out.save("king.png")

Per step, one batched UNet call evaluates the branches [unconditional, prompt, safety concept, edit concepts…]
on the same latents; `guidance.py` combines the estimates; the scheduler takes the combined ε to the next latent.
"""
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__, guidance as G, schedulers
from .clip import tokenize
from .loading import load_model

SCHEDULERS = ("pndm", "ddim")


@dataclass
class StepInfo:
    """What `callback(info)` receives once per step. SLD fields are None where the safety branch was not computed
    (plain SD, or skipped during warm-up); with a custom `guidance` function, `safety_norm` is ‖ε_cfg − ε̂‖ (the
    correction it applied) and `mu`/`sld_active` are None."""
    step: int                    # index into scheduler.timesteps
    timestep: int
    latents: torch.Tensor        # the latents the UNet saw at this step, (N, 4, h, w)
    eps: torch.Tensor            # the guided estimate ε̂ handed to the scheduler
    sld_active: float | None = None   # share of latent elements with μ > 0
    cfg_norm: float | None = None     # ‖s_g·(ε_p − ε_∅)‖
    safety_norm: float | None = None  # ‖s_g·γ‖
    mu: torch.Tensor | None = None    # SLD's per-element scale μ
    edits: list = field(default_factory=list)  # per SEGA edit: {"concept", "kept", "norm"}


@dataclass
class Output:
    images: np.ndarray    # (N, H, W, 3) float32 in [0, 1], prompt-major
    latents: torch.Tensor  # (N, 4, H/8, W/8)
    seed: int | None
    parameters: list = field(default_factory=list)  # per image: the text stored in its PNG's `parameters` chunk

    def save(self, path) -> list:
        """Write PNGs: `path` itself for one image, else `stem-0.png`, `stem-1.png`, …; folders are created.
        Each PNG carries the generation settings as a `parameters` text chunk."""
        from PIL import Image, PngImagePlugin

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        paths = [path] if len(self.images) == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}")
                                                      for i in range(len(self.images))]
        for i, (p, img) in enumerate(zip(paths, self.images)):
            info = PngImagePlugin.PngInfo()
            if i < len(self.parameters):
                info.add_text("parameters", self.parameters[i])
            Image.fromarray((img * 255).round().astype(np.uint8)).save(p, pnginfo=info)
        return paths


def resolve_safety(safety) -> G.SafetyConfig | None:
    """`None`/"off" → plain SD; a preset name; or a SafetyConfig as is."""
    if safety is None or (isinstance(safety, str) and safety.lower() == "off"):
        return None
    if isinstance(safety, str):
        return G.SafetyConfig.preset(safety)
    if isinstance(safety, G.SafetyConfig):
        return safety
    raise TypeError(f"safety must be a preset name, a SafetyConfig or None, not {type(safety).__name__}")


class StableDiffusion:
    """The four parts of SD 1.x (`tokenizer`, `text_encoder`, `unet`, `vae` — the VAE's decoder) and its scheduler
    config; calling the object generates images."""

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler_config: dict, name: str = ""):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler_config, self.name = scheduler_config, name
        self._concepts = {}  # concept text -> its embedding (1, 77, d); each concept is encoded once per pipeline

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, configs=None, tokenizer=None, ema=False,
                        vae_dtype=None):
        """Load SD 1.x strictly, safetensors only: a model folder in the published diffusers layout, or one
        `.safetensors` file in the original CompVis layout. `configs` ({"unet": UNetConfig(…), …}) and `tokenizer`
        (a folder) replace the model's; `ema` loads a single file's EMA UNet. See `loading.load_model`.
        `vae_dtype`: the VAE's own dtype, e.g. torch.float32 with dtype=torch.float16 (the SD 1.x VAE can overflow
        in fp16; its weights are then the fp16 ones, cast up, as diffusers' `upcast_vae` does)."""
        tok, parts, scheduler_config = load_model(path, device, dtype, configs, tokenizer, ema)
        if vae_dtype is not None:
            parts[2] = parts[2].to(vae_dtype)
        return cls(tok, *parts, scheduler_config, name=str(path))

    def compile(self, **options):
        """Opt in to `torch.compile` for the UNet, the work of every step (`options` go to torch.compile). The first
        generation after this compiles (minutes on CPU). Returns the pipeline."""
        self.unet = torch.compile(self.unet, **options)
        return self

    @property
    def device(self):
        return self.unet.conv_in.weight.device

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def encode_prompt(self, prompts) -> torch.Tensor:
        """Prompts → CLIP's last hidden state (B, 77, d), d = 768 for SD 1.4."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = tokenize(self.tokenizer, prompts).to(self.device)
        return self.text_encoder(ids).to(self.dtype)

    def encode_concept(self, text: str) -> torch.Tensor:
        if text not in self._concepts:
            self._concepts[text] = self.encode_prompt([text])
        return self._concepts[text]  # (1, 77, d)

    @torch.no_grad()
    def decode(self, latents) -> torch.Tensor:
        """Latents (B, 4, h, w) → images (B, 3, 8h, 8w) in [0, 1] (the VAE divides by 0.18215 itself)."""
        vae_dtype = self.vae.post_quant_conv.weight.dtype
        return torch.cat([self.vae(z[None].to(vae_dtype)) for z in latents]).float()  # one at a time: memory

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, safety="medium", num_inference_steps=50, guidance_scale=7.5,
                 height=512, width=512, num_images=1, seed=None, generator=None, scheduler="pndm", eta=0.0,
                 callback=None, guidance=None, edits=(), edit_momentum_scale=0.1, edit_momentum_beta=0.4,
                 progress=True) -> Output:
        """Generate `num_images` images per prompt. `safety`: preset name, SafetyConfig, or None (plain SD).
        `guidance`: a function with `guidance.sld_guidance`'s signature that replaces it. `edits`: SEGA
        `guidance.Edit`s. Same seed and settings → the image of diffusers' StableDiffusionPipelineSafe."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = self._check(prompts, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                num_images, scheduler, eta, edits)
        safety = resolve_safety(safety)
        cfg_on = guidance_scale > 1.0
        if safety is not None and not cfg_on:
            warnings.warn("guidance_scale <= 1 turns classifier-free guidance off, and with it SLD", stacklevel=2)
        sld_on = safety is not None and safety.scale > 1.0 and cfg_on  # as diffusers: SLD needs s_S > 1 and CFG
        edits = list(edits) if cfg_on else []
        if guidance is not None and not sld_on:
            raise ValueError("guidance= replaces SLD's guidance, which needs a safety config and guidance_scale > 1")
        sld_fn = guidance or G.sld_guidance

        # Conditioning, prompt-major: all images of prompt 0 first. Order of the batch: ∅, prompt, concept, edits.
        n, N = num_images, len(prompts) * num_images
        text = self.encode_prompt(prompts).repeat_interleave(n, dim=0)  # (N, 77, d)
        contexts = [self.encode_prompt(negatives).repeat_interleave(n, dim=0), text] if cfg_on else [text]
        if sld_on:
            concept = self.encode_concept(safety.concept).expand(N, -1, -1)
        edit_contexts = [self.encode_concept(e.concept).expand(N, -1, -1) for e in edits]

        if generator is None:  # a caller's generator is used as is (its stream continues across calls)
            seed = random.randrange(2**32) if seed is None else int(seed)
            generator = torch.Generator("cpu").manual_seed(seed)
        else:
            seed = None
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)  # the VAE's downscale: 8 for SD 1.x
        h, w = height // f, width // f
        latents = torch.randn((N, 4, h, w), generator=generator, device=generator.device, dtype=self.dtype)
        latents = latents.to(self.device)
        sampler = schedulers.from_config(self.scheduler_config, scheduler, num_inference_steps,
                                          **({"eta": eta} if eta else {}))

        momentum = edit_momentum = None
        steps = sampler.timesteps.tolist()
        for i, t in enumerate(_progress(steps, progress)):
            # The safety branch is skipped where it cannot change the output: no momentum and still in warm-up.
            run_safety = sld_on and (guidance is not None or safety.momentum_scale != 0 or i >= safety.warmup_steps)
            ctx = torch.cat(contexts + ([concept] if run_safety else []) + edit_contexts)
            k = len(ctx) // N  # branches this step
            eps_all = self.unet(torch.cat([latents] * k), t, ctx).chunk(k)  # k × (N, 4, h, w)
            info = StepInfo(step=i, timestep=t, latents=latents, eps=None)
            diagnose = callback is not None  # the diagnostics cost extra passes over ε: only for a callback
            if not cfg_on:
                eps = eps_all[0]
            else:
                eps_u, eps_p = eps_all[:2]
                if diagnose:
                    info.cfg_norm = (guidance_scale * (eps_p - eps_u)).norm().item()
                if run_safety:
                    eps_s = eps_all[2]
                    if diagnose and guidance is None:
                        gamma, mu = G.safety_term(eps_u, eps_p, eps_s, safety, momentum)
                        info.mu, info.sld_active = mu, (mu > 0).float().mean().item()
                        info.safety_norm = (guidance_scale * gamma).norm().item()
                    eps, momentum = sld_fn(eps_u, eps_p, eps_s, guidance_scale, safety, i, momentum)
                    if diagnose and guidance is not None:
                        info.safety_norm = (G.cfg_guidance(eps_u, eps_p, guidance_scale) - eps).norm().item()
                else:
                    eps = G.cfg_guidance(eps_u, eps_p, guidance_scale)
                if edits:
                    eps_e = eps_all[len(eps_all) - len(edits):]
                    if diagnose:
                        psis = G.edit_directions(eps_u, eps_e, edits, i)
                        info.edits = [{"concept": e.concept, "kept": (p != 0).float().mean().item(),
                                       "norm": p.norm().item()} for e, p in zip(edits, psis)]
                    term, edit_momentum = G.sega_guidance(eps_u, eps_e, edits, i, edit_momentum,
                                                          edit_momentum_scale, edit_momentum_beta)
                    # without SLD, add in the SEGA reference's order, ε_∅ + (s_g·(ε_p − ε_∅) + term): same bits
                    eps = eps + term if run_safety else eps_u + (guidance_scale * (eps_p - eps_u) + term)
            latents = sampler.step(eps, t, latents, generator=generator)
            if not torch.isfinite(latents).all():
                raise FloatingPointError(f"the latents became NaN or infinite at step {i} (timestep {t}); "
                                         f"try --dtype fp32 or other guidance settings")
            info.eps = eps
            if callback is not None:
                callback(info)

        images = self.decode(latents).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)  # (N, H, W, 3)
        params = [self._parameters(p, neg, seed, num_inference_steps,
                                   guidance_scale, scheduler, eta, height, width, safety, edits)
                  for p, neg in zip(prompts, negatives) for _ in range(n)]
        return Output(images=images, latents=latents, seed=seed, parameters=params)

    def _check(self, prompts, negative_prompt, steps, guidance_scale, height, width, num_images, scheduler, eta,
               edits):
        """Validate every argument before any work; returns the negative prompts, one per prompt."""
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < 8 or v % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {v}")
        if not isinstance(steps, int) or not 1 <= steps <= 999:
            raise ValueError(f"num_inference_steps must be an integer from 1 to 999, got {steps}")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1, got {num_images}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if eta < 0 or (eta and scheduler != "ddim"):
            raise ValueError(f"eta must be >= 0 and applies to the DDIM scheduler only, got {eta} with {scheduler}")
        if not all(isinstance(e, G.Edit) for e in edits):
            raise TypeError("edits must be guidance.Edit objects")
        return negatives

    def _parameters(self, prompt, negative, seed, steps, guidance_scale, scheduler, eta, height, width, safety, edits):
        lines = [prompt, f"Negative prompt: {negative}",
                 f"Seed: {seed}, Steps: {steps}, Guidance: {guidance_scale}, Scheduler: {scheduler}"
                 + (f", Eta: {eta}" if scheduler == "ddim" else "") + f", Size: {width}x{height}"]
        if safety is None:
            lines.append("Safety: off")
        else:
            name = next((k for k, v in G.PRESETS.items() if v.values() == safety.values()), "custom")
            lines.append(f"Safety: {name} (" + ", ".join(f"{k}={v}" for k, v in safety.values().items()) + ")")
            lines.append(f"Safety concept: {safety.concept}")
        for e in edits:
            lines.append(f"Edit: {'-' if e.reverse else '+'}{e.concept} (scale {e.scale}, threshold {e.threshold}, "
                         f"warmup {e.warmup_steps}, cooldown {e.cooldown_steps}, weight {e.weight})")
        lines.append(f"Model: {self.name}, sld_minimal {__version__}")
        return "\n".join(lines)


def _progress(steps, enabled):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, leave=False)
