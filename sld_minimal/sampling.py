"""The sampling loop (`sample`): from the initial noise x_T to the final latents, knowing no guidance formula.

Per step the guidance method (methods.py) sets its configuration for the step (`at`, where it has one: a schedule)
and names the text conditions it needs, one batched UNet call evaluates them on the sampler's scaled input, the method
combines the estimates by name, and the sampler (schedulers.py), told the step's index, takes the combined ε to the
next latent; a callback sees every step (`StepInfo`) and may replace the latents or stop.
"""
from dataclasses import dataclass, field

import torch

from .conditions import PROMPT, UNCOND


class _Sentinel:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


STOP = _Sentinel("sld_minimal.STOP")  # a callback returns this to end sampling after the current step


@dataclass
class StepInfo:
    """What `callback(info)` receives once per step: the step's inputs and outputs and the method's own
    intermediates (`terms`, by name). The diagnostics below are read from those when read, not recomputed beside
    the method; each is None where the method does not report what it needs (plain CFG, a function in place of SLD,
    a method of your own that reports other terms).

    Terms are numbered as the method's `applied(step)` numbers them: SLD's safety configs, then SEGA's edits. A term
    is *computed* at a step where the method evaluated it (its branch ran; SLD computes γ_c during a warm-up with
    s_m ≠ 0 too, to build its momentum ν_c) and *applied* where it entered ε̂. The shares and norms below count
    applied terms only, so they are 0.0 during a warm-up, with s_m = 0 or not, and at steps where s_S ≤ 1."""
    step: int                    # index into the sampler's timesteps
    num_steps: int               # len(timesteps): the number of UNet calls
    timestep: int | float
    latents: torch.Tensor        # x_t, the latents of this step (before the sampler's input scaling), (N, 4, h, w)
    next_latents: torch.Tensor   # the sampler's result; a callback may return replacement latents for it
    eps: torch.Tensor            # the guided estimate ε̂ handed to the sampler
    branches: dict               # condition name -> the UNet's ε for it (conditions.UNCOND, PROMPT, concepts)
    terms: dict = field(default_factory=dict)  # the method's intermediates by name (SLD's, SEGA's: see methods.py)
    guidance_scale: float | None = None

    @property
    def computed(self) -> list | None:
        """Per term (safety configs, then edits): whether the method evaluated it at this step."""
        if "computed" not in self.terms and "edits" not in self.terms:
            return None
        return list(self.terms.get("computed", ())) + [True] * len(self.terms.get("edits", ()))

    @property
    def applied(self) -> list | None:
        """Per term (safety configs, then edits): whether it entered ε̂ at this step."""
        if self.sld_applied is None and self.edit_applied is None:
            return None
        return (self.sld_applied or []) + (self.edit_applied or [])

    @property
    def sld_applied(self) -> list | None:
        """Per SLD safety config: whether its γ_c entered ε̂ at this step."""
        return None if "applied" not in self.terms else list(self.terms["applied"])

    @property
    def edit_applied(self) -> list | None:
        """Per SEGA edit: whether it acted at this step (warm, not cooled down)."""
        return None if "edit_applied" not in self.terms else list(self.terms["edit_applied"])

    @property
    def mu(self):
        """SLD's per-element scale μ as computed, warm-up included; with several safety concepts, the element-wise
        maximum of their μ_c."""
        mus = [m for m in self.terms.get("mu", ()) if m is not None]
        return None if not mus else mus[0] if len(mus) == 1 else torch.stack(mus).amax(dim=0)

    @staticmethod
    def _applied(values, applied) -> list:
        return [v for v, a in zip(values, applied) if a and v is not None]

    def _union(self, masks):
        return torch.stack(masks).any(dim=0) if masks else torch.zeros_like(self.eps, dtype=torch.bool)

    @property
    def sld_steered(self):
        """(N, 4, h, w) bools: the elements SLD steers at this step, μ_c > 0 for some applied safety config c (all
        False where none is applied)."""
        if self.sld_applied is None:
            return None
        return self._union([mu > 0 for mu in self._applied(self.terms.get("mu", ()), self.sld_applied)])

    @property
    def sld_active(self):
        """Share of latent elements SLD steers at this step (`sld_steered`); 0.0 where no config is applied."""
        steered = self.sld_steered
        return None if steered is None else steered.float().mean().item()

    @property
    def edit_steered(self):
        """(N, 4, h, w) bools: the elements an acting SEGA edit moves (its mask keeps them: μ ⊙ ψ_c ≠ 0)."""
        if self.edit_applied is None:
            return None
        return self._union([d != 0 for d in self._applied(self.terms.get("edit_directions", ()), self.edit_applied)])

    @property
    def cfg_norm(self):
        """‖s_g·(ε_p − ε_∅)‖."""
        if self.guidance_scale is None or UNCOND not in self.branches:
            return None
        return (self.guidance_scale * (self.branches[PROMPT] - self.branches[UNCOND])).norm().item()

    @property
    def safety_norm(self):
        """‖s_g·Σ_c γ_c‖ over the safety configs c applied at this step: what SLD takes off CFG's ε̂ (ε̂_CFG − ε̂ with
        SLD alone); 0.0 where none is applied, whatever γ_c was computed for the momentum."""
        if self.sld_applied is None:
            return None
        gammas = self._applied(self.terms.get("gamma", ()), self.sld_applied)
        return 0.0 if not gammas else (self.guidance_scale * sum(gammas)).norm().item()

    @property
    def edit_norm(self):
        """‖γ̂‖, SEGA's term as added to ε̂ (zero before any edit's warm-up)."""
        term = self.terms.get("edit_term")
        return None if term is None else term.norm().item()

    @property
    def edits(self) -> list:
        """Per SEGA edit: its concept, whether it was applied, the share of elements its mask keeps (computed at
        every step, applied or not) and ‖μ ⊙ ψ_c‖."""
        applied = self.terms.get("edit_applied") or [None] * len(self.terms.get("edits", ()))
        return [{"concept": e.concept, "applied": a, "kept": (d != 0).float().mean().item(), "norm": d.norm().item()}
                for e, d, a in zip(self.terms.get("edits", ()), self.terms.get("edit_directions", ()), applied)]


def sample(unet, sampler, method, latents, context, generator=None, callback=None, progress=False) -> torch.Tensor:
    """The sampling loop: from x_T (`latents`) to x_0, the final latents (float32). `context(name)` is a condition's
    text embedding, (N, 77, d); `callback(info)` may return replacement latents or STOP.

    Precision: the UNet computes in its own dtype (bf16/fp16 for speed); everything the loop keeps — the latents,
    the sampler's state (PNDM's past ε), the guidance with SLD's threshold test and momentum ν — is float32, the
    UNet's ε cast up once per step. In bf16 (8 significant bits) the loop's own arithmetic would add rounding at every
    step: PNDM's (55ε_t − 59ε_{t−1} + 37ε_{t−2} − 9ε_{t−3})/24 cancels terms larger than its result (in bf16 it
    errs by ~10 units of 2^-8 where float32 errs by 1e-7), and a latent re-rounded to 8 bits at each of 50 steps
    drifts by ~0.2 (tests/test_bf16.py). The casts cost nothing beside the UNet; for a float32 UNet they are no-ops,
    so fp32 results are unchanged and equal the reference's. (diffusers keeps the loop in the model's dtype, so in
    half precision the two differ by that rounding.)"""
    model_dtype = next(unet.parameters()).dtype
    latents = latents.to(torch.promote_types(latents.dtype, torch.float32))
    timesteps = sampler.timesteps.tolist()
    at = getattr(method, "at", None)  # optional: the method sets its configuration for the step (a schedule)
    for i, t in enumerate(_progress(timesteps, progress)):  # i counts UNet calls: PNDM makes n + 1 for n steps
        if at is not None:
            at(i, len(timesteps), t)
        names = method.conditions(i, len(timesteps), t)
        x = sampler.scale_model_input(latents, t, i=i).to(model_dtype)
        eps = unet(torch.cat([x] * len(names)), t, torch.cat([context(n) for n in names]))
        eps = eps.to(latents.dtype).chunk(len(names))                       # the model's ε, in float32
        branches = dict(zip(names, eps))                                   # condition -> ε, (N, 4, h, w) each
        eps_hat, terms = method(branches, i, len(timesteps), t)
        new = sampler.step(eps_hat, t, latents, generator=generator, i=i)
        if not torch.isfinite(new).all():
            hint = "try --dtype fp32" if model_dtype != torch.float32 else "check the guidance settings and the weights"
            raise FloatingPointError(f"the latents became NaN or infinite at step {i} (timestep {t}); {hint}")
        if callback is not None:
            reply = callback(StepInfo(i, len(timesteps), t, latents, new, eps_hat, branches, terms,
                                      getattr(method, "guidance_scale", None)))
            if reply is STOP:
                return new
            if reply is not None:
                if not (isinstance(reply, torch.Tensor) and reply.shape == new.shape):
                    raise ValueError(f"a callback returns None, STOP or latents of shape {tuple(new.shape)}, "
                                     f"got {reply!r:.80}")
                new = reply.to(latents.dtype)
        latents = new
    return latents


def initial_latents(generator, shape, dtype, device, sigma=1.0) -> torch.Tensor:
    """x_T = z · σ_init, z ~ N(0, I) drawn in one call on the generator's device (CPU by default, as diffusers), so
    that a seed gives the same noise on any device; `sigma`: the sampler's `init_noise_sigma`."""
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    return z.to(device) * sigma


def _progress(steps, enabled):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, leave=False)
