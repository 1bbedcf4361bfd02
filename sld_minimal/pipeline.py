"""Stable Diffusion 1.x with Safe Latent Diffusion: the parts, and the sampling loop that joins them.

    pipe = StableDiffusion.from_pretrained("weights/stable-diffusion-v1-4")
    out = pipe("a portrait of a king", safety="strong", seed=0)
    out.save("king.png")

`StableDiffusion.__call__` is validate → encode → initial latents → sample → decode; the loop itself is
`sampling.sample`, where the guidance method (methods.py) names the text conditions each step needs and combines
their estimates (guidance.py holds the math), and the sampler (schedulers.py) takes the result to the next latent.
"""
import random
import re

import numpy as np
import torch

from . import methods, presets, schedulers, speedups
from ._version import __version__
from .checks import device as check_device, dtype as check_dtype, integer, kind, number, warn
from .conditions import PROMPT, UNCOND, concept_text
from .guidance import Edit
from .loading import load_model
from .outputs import SETTINGS_FORMAT, Output
from .sampling import STOP, initial_latents, sample
from .tokenizer import tokenize


def model_size(unet_config, vae_config) -> int:
    """The image size a model was trained at: the UNet's `sample_size` × the VAE factor (64 × 8 = 512 for SD 1.4)."""
    return unet_config.sample_size * vae_config.factor


class _Default:
    """An argument not given: its default value (`.value`), and no conflict with `method=`."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return repr(self.value)


DEFAULT_SAFETY, DEFAULT_GUIDANCE = _Default("medium"), _Default(7.5)  # safety="medium", guidance_scale=7.5


class StableDiffusion:
    """The four parts of SD 1.x (`tokenizer`, `text_encoder`, `unet`, `vae` — the VAE's decoder) and its scheduler
    config; calling the object generates images."""

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler_config: dict, name: str = "",
                 safety_concept: str | None = None, vocabulary=None):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler_config, self.name = scheduler_config, name
        # the concept a preset named by `safety="…"` steers away from: the model's own (model_index.json), else
        # the paper's (`guidance.DEFAULT_CONCEPT`)
        self.safety_concept = safety_concept
        self.vocabulary = None if vocabulary is None else frozenset(vocabulary)  # a small model's words, if listed
        self._concepts = {}  # concept text -> its embedding (1, 77, d); each concept is encoded once per pipeline

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, configs=None, tokenizer=None, ema=False,
                        vae_dtype=None):
        """Load SD 1.x strictly, safetensors only: a model folder in the published diffusers layout, or one
        `.safetensors` file in the original CompVis layout. `configs` ({"unet": UNetConfig(…), …}) and `tokenizer`
        (a folder) replace the model's; `ema` loads a single file's EMA UNet. See `loading.load_model`.
        `vae_dtype`: the VAE's own dtype, e.g. torch.float32 with dtype=torch.float16 (the SD 1.x VAE can overflow
        in fp16; its weights are then the fp16 ones, cast up, as diffusers' `upcast_vae` does).
        fp16 on the CPU (dtype or vae_dtype) is refused before anything is read: PyTorch has no fast CPU fp16 path.
        On the CPU it also tunes glibc's malloc for the process (`speedups.keep_freed_memory`), unless the environment
        sets glibc's malloc tuning (`speedups.MALLOC_VARIABLES`, `GLIBC_TUNABLES`)."""
        device = check_device("device", device)  # before any file is read
        dtype = check_dtype("dtype", dtype)
        vae_dtype = None if vae_dtype is None else check_dtype("vae_dtype", vae_dtype)
        if torch.device(device).type == "cpu" and torch.float16 in (dtype, vae_dtype):
            raise ValueError("fp16 is not accelerated on the CPU: use --dtype bf16 or fp32")
        if torch.device(device).type == "cpu":  # before the load's threads start: one heap for all of them
            speedups.keep_freed_memory()  # activations reuse memory instead of fresh pages at every call
        model = load_model(path, device, dtype, configs, tokenizer, ema)
        vae = model.vae if vae_dtype is None else model.vae.to(vae_dtype)
        # the CPU speed-ups (`speedups.py`) on the plain modules: the same weights and keys, only faster
        return cls(model.tokenizer, model.text_encoder, speedups.apply(model.unet), speedups.apply(vae),
                   model.scheduler_config, name=str(path), safety_concept=model.safety_concept,
                   vocabulary=model.vocabulary)

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
    def encode_prompt(self, prompts, what="prompt") -> torch.Tensor:
        """Prompts → CLIP's last hidden state (B, 77, d), d = 768 for SD 1.4. `what` names the text in the
        truncation warning."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = tokenize(self.tokenizer, prompts, what=what).to(self.device)
        return self.text_encoder(ids).to(self.dtype)

    def encode_concept(self, text: str, what="concept") -> torch.Tensor:
        """A concept's embedding (1, 77, d), encoded once per pipeline (so a long one is warned about once)."""
        if text not in self._concepts:
            self._concepts[text] = self.encode_prompt([text], what)
        return self._concepts[text]

    @torch.no_grad()
    def decode(self, latents) -> torch.Tensor:
        """Latents (B, 4, h, w) → images (B, 3, 8h, 8w) in [0, 1] (the VAE divides by 0.18215 itself)."""
        vae_dtype = self.vae.post_quant_conv.weight.dtype
        return torch.cat([self.vae(z[None].to(vae_dtype)) for z in latents]).float()  # one at a time: memory

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD 1.x)."""
        return self.vae.config.factor

    @property
    def default_size(self) -> int:
        """The image size the model was trained at (512 for SD 1.4): see `model_size`."""
        return model_size(self.unet.config, self.vae.config)

    def latent_shape(self, n: int, height: int, width: int) -> tuple:
        """(n, 4, h, w) for images of height × width."""
        return n, 4, height // self.vae_factor, width // self.vae_factor

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, safety=DEFAULT_SAFETY, num_inference_steps=50,
                 guidance_scale=DEFAULT_GUIDANCE, height=None, width=None, num_images=1, seed=None, generator=None,
                 scheduler="pndm", eta=0.0, callback=None, method=None, edits=(), edit_momentum_scale=0.1,
                 edit_momentum_beta=0.4, progress=True, guidance=None, image_index=None, latents=None) -> Output:
        """Generate `num_images` images per prompt (prompt-major). Same seed and settings → the image of diffusers'
        StableDiffusionPipelineSafe.

        safety:    a preset name (presets.PRESETS: off, weak, medium, strong, max, sega-*; its concept: the model's
                   `safety_concept`, else the paper's), a SafetyConfig, a list of them (several concepts), or None
                   (plain SD); edits: SEGA `guidance.Edit`s.
        guidance_scale: s_g, 7.5 by default; a method object carries its own, so passing both is refused.
        method:    any guidance method object (methods.py) in place of safety/edits, e.g. your own research variant.
                   The settings record it as it is before sampling (`presets.method_settings`).
        scheduler: a registry name (schedulers.SAMPLERS) or a fresh Sampler object (its own timesteps win).
        height, width: default `default_size`, the model's own (512 for SD 1.4).
        callback:  called with a StepInfo after every step; may return replacement latents, or STOP (the settings
                   then record `steps_taken`, the loop iterations made).
        image_index: return only image k of the batch this call makes, e.g. to regenerate one image from its PNG's
                   chunk. The whole batch is sampled as before (one noise draw for all N, as the reference does;
                   and a CPU's results depend on the batch size by ~1e-6, enough to flip 8-bit pixels), only
                   image k is decoded: its pixels are exactly the batch's.
        latents:   the initial noise z (N, 4, h, w), N = len(prompts)·num_images, in place of a draw from the seed
                   (as diffusers' `latents`; scaled by the sampler's init_noise_sigma as a drawn one is). The
                   settings then record no seed: the noise came from the caller. A stochastic sampler's per-step
                   noise still comes from `generator` or `seed`.
        guidance:  deprecated: a function with `guidance.sld_guidance`'s signature; use method= instead."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if method is not None and guidance_scale is not DEFAULT_GUIDANCE:
            raise ValueError(f"method= carries its own guidance scale (s_g = {getattr(method, 'guidance_scale', None)}"
                             f"): set it on the method, not with guidance_scale=")
        guidance_scale = DEFAULT_GUIDANCE.value if guidance_scale is DEFAULT_GUIDANCE else guidance_scale
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        negatives, num_inference_steps, guidance_scale, height, width, num_images, eta, seed = self._check(
            prompts, negative_prompt, num_inference_steps, guidance_scale, height, width, num_images, scheduler, eta,
            seed, generator)
        prompts = list(prompts)
        if self.vocabulary is not None and (unknown := self._unknown_words(prompts + negatives)):
            warn(f"words this model never saw (outside its vocabulary): {', '.join(unknown)}")
        # the method, and what the settings record of it: read here, before sampling changes anything
        method, record = self._method(method, safety, edits, guidance, guidance_scale, edit_momentum_scale,
                                      edit_momentum_beta)
        sampler = scheduler if isinstance(scheduler, schedulers.Sampler) else schedulers.from_config(
            self.scheduler_config, scheduler, num_inference_steps, **({"eta": eta} if eta else {}))
        idle = methods.never_acts(method, len(sampler.timesteps), sampler.timesteps.tolist())  # e.g. every δ ≥ len
        if idle:
            warn(idle)

        n = num_images
        embeddings = {}

        def context(name):  # a condition's text embedding for every image, (N, 77, d); each encoded once per call
            if name not in embeddings:
                if name == PROMPT:
                    embeddings[name] = self.encode_prompt(prompts).repeat_interleave(n, dim=0)
                elif name == UNCOND:
                    embeddings[name] = self.encode_prompt(negatives, "negative prompt").repeat_interleave(n, dim=0)
                else:
                    text = concept_text(name)
                    what = ("safety concept" if text in {c["concept"] for c in record["safety"]} else
                            "edit concept" if text in {e["concept"] for e in record["edits"]} else "concept")
                    embeddings[name] = self.encode_concept(text, what).expand(len(prompts) * n, -1, -1)
            return embeddings[name]

        if generator is None:  # a caller's generator is used as is (its stream continues across calls)
            seed = random.randrange(2**32) if seed is None else int(seed)
            generator = torch.Generator("cpu").manual_seed(seed)
        else:
            seed = None
        total = len(prompts) * n  # images of this call, prompt-major: image k is prompt k // n
        which = list(range(total)) if image_index is None else [self._image_index(image_index, total)]
        shape = self.latent_shape(total, height, width)
        if latents is None:
            latents = initial_latents(generator, shape, self.dtype, self.device, sampler.init_noise_sigma)
        else:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                raise ValueError(f"latents must be a tensor of shape {shape} ({total} images of {height}×{width}), "
                                 f"got {tuple(latents.shape) if isinstance(latents, torch.Tensor) else kind(latents)}")
            latents, seed = latents.to(self.device, self.dtype) * sampler.init_noise_sigma, None
        if hasattr(method, "reset"):
            method.reset()
        stopped = []  # the loop iterations made, where a callback said STOP

        def watch(info):
            reply = callback(info)
            if reply is STOP:
                stopped.append(info.step + 1)
            return reply

        latents = sample(self.unet, sampler, method, latents, context, generator,
                         None if callback is None else watch, progress)[which]

        images = self.decode(latents).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)  # (N, H, W, 3)
        name = getattr(sampler, "name", "") or type(sampler).__name__
        steps = getattr(sampler, "num_inference_steps", len(sampler.timesteps))  # an object: its own count
        settings = [self._settings(prompts[k // n], negatives[k // n], seed, steps, name, eta, height, width, record,
                                   (k, total), stopped[0] if stopped else None) | {"never_acts": idle} for k in which]
        return Output(images=images, latents=latents, seed=seed, settings=settings)

    def _method(self, method, safety, edits, guidance, guidance_scale, edit_momentum_scale, edit_momentum_beta):
        """(the guidance method, what the settings record of it: s_g, `method` (a caller's object: its class, module
        and settings), `safety` and `edits`), the record read from the configuration before any sampling."""
        if method is not None:
            if safety is not DEFAULT_SAFETY or edits or guidance is not None:
                raise ValueError("method= replaces safety=, edits= and guidance=: pass either the method or those")
            if not (callable(method) and callable(getattr(method, "conditions", None))):
                raise TypeError("method must have conditions(step, num_steps, t) and __call__(eps, step, num_steps, "
                                "t) -> (eps, terms); see sld_minimal/methods.py")
            return method, presets.method_settings(method)
        safety = "medium" if safety is DEFAULT_SAFETY else safety
        # a preset by name steers away from the model's own concept, where it names one
        configs = presets.safety_configs(safety, self.safety_concept if isinstance(safety, str) else None)
        if not all(isinstance(e, Edit) for e in edits):
            raise TypeError("edits must be guidance.Edit objects")
        if guidance is not None:
            warn("guidance= is deprecated: pass a method object, e.g. method=methods.FunctionSLD(fn, "
                 "safety, guidance_scale), or write your own (sld_minimal/methods.py)", DeprecationWarning)
            if len(configs) != 1 or edits:
                raise ValueError("guidance= replaces SLD's combination for one safety config, without edits")
            if not configs[0].enabled or guidance_scale <= 1.0:
                why = (f"safety scale s_S = {configs[0].scale} <= 1 turns SLD off" if not configs[0].enabled
                       else f"guidance_scale = {guidance_scale} <= 1 turns classifier-free guidance and SLD off")
                raise ValueError(f"guidance= replaces SLD's combination, but {why}")
            method = methods.FunctionSLD(guidance, configs[0], guidance_scale)
            return method, presets.method_settings(method)
        momentum = (edit_momentum_scale, edit_momentum_beta)
        return (presets.build(configs, edits, guidance_scale, *momentum),
                {"guidance_scale": guidance_scale, "method": None, **presets.record(configs, edits, momentum)})

    def _unknown_words(self, texts) -> list:
        """The words of `texts` outside the model's vocabulary, each once, in order."""
        words = (w for text in texts for w in re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text.lower()))
        return list(dict.fromkeys(w for w in words if w not in self.vocabulary))

    @staticmethod
    def _image_index(k, total: int) -> int:
        k = integer("image_index", k)
        if not 0 <= k < total:
            raise ValueError(f"image_index must be from 0 to {total - 1} (the batch has {total} images), got {k}")
        return k

    def _check(self, prompts, negative_prompt, steps, guidance_scale, height, width, num_images, scheduler, eta,
               seed, generator=None) -> tuple:
        """Validate every argument before any work (numpy scalars welcome); returns the negative prompts, one per
        prompt, and the numbers as Python ints and floats."""
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {kind(prompts)}")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        elif isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        else:
            raise TypeError(f"negative_prompt must be a string or a list of strings, got {kind(negative_prompt)}")
        f = self.vae_factor
        height, width = integer("height", height), integer("width", width)
        for name, v in (("height", height), ("width", width)):
            if v < f or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (this model's VAE factor), got {v}")
        steps, num_images = integer("num_inference_steps", steps), integer("num_images", num_images)
        if not 1 <= steps <= 999:
            raise ValueError(f"num_inference_steps must be from 1 to 999, got {steps}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        guidance_scale, eta = number("guidance_scale", guidance_scale), number("eta", eta)
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if seed is not None and not 0 <= (seed := integer("seed", seed)) < 2**64:
            raise ValueError(f"seed must be from 0 to 2**64 - 1, got {seed}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {kind(generator)}")
        if seed is not None and generator is not None:  # else one of them would be ignored without a word
            raise ValueError("pass seed= or generator=, not both: the noise comes from one of them")
        if isinstance(scheduler, schedulers.Sampler):  # used before or not: step 0 starts its run afresh
            if eta:
                raise ValueError("eta applies to a scheduler built by name; a scheduler object has its own")
        elif not isinstance(scheduler, str) or scheduler not in schedulers.SAMPLERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(schedulers.SAMPLERS)}")
        elif eta < 0 or (eta and scheduler != "ddim"):
            raise ValueError(f"eta must be >= 0 and applies to the DDIM scheduler only, got {eta} with {scheduler}")
        return negatives, steps, guidance_scale, height, width, num_images, eta, seed

    def _settings(self, prompt, negative, seed, steps, scheduler, eta, height, width, record, image=(0, 1),
                  steps_taken=None) -> dict:
        """One image's generation settings (`outputs.SETTINGS_FORMAT`). `record`: the method's, from `_method`;
        `image`: (k, N), image k (from 0, as in `stem-k.png`) of the N that the call's one noise draw made; `steps`:
        the schedule's, `steps_taken`: the loop iterations made where a callback stopped the run (else None)."""
        return {
            "prompt": prompt, "negative_prompt": negative, "seed": seed, "image_index": image[0],
            "num_images": image[1], "steps": steps, "steps_taken": steps_taken,
            "guidance_scale": record["guidance_scale"], "scheduler": scheduler,
            "eta": eta if scheduler == "ddim" else None, "width": width, "height": height,
            "method": record["method"], "safety": record["safety"], "edits": record["edits"],
            "edit_momentum": record["edit_momentum"],
            "model": self.name, "version": __version__, "format": SETTINGS_FORMAT}


