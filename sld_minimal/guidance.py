"""Guidance arithmetic of Safe Latent Diffusion (SLD) and Semantic Guidance (SEGA).

Pure functions on noise estimates, no model inside. Every ε is a U-Net output of shape
(B, 4, h, w) for the same latent z_t under a different text condition: ε_∅ (empty prompt),
ε_p (the user's prompt), ε_S (the safety concept c_S), ε_c (an edit concept c_e).

    CFG  (Ho & Salimans 2022)                        ε̂ = ε_∅ + s_g·(ε_p − ε_∅)
    SLD  (Schramowski et al., arXiv 2211.05105)      ε̂ = ε_∅ + s_g·(ε_p − ε_∅ − γ)
    SEGA (Brack et al., arXiv 2301.12247)            ε̂ = ε_∅ + s_g·(ε_p − ε_∅) + γ̂

`methods.py` composes them into guidance methods by adding the SEGA term after guidance:
    ε̂ = cfg_guidance(ε_∅, ε_p, s_g) + term            (SEGA alone)
    ε̂ = sld_guidance(ε_∅, ε_p, ε_S, ...)[0] + term    (SLD and SEGA)
diffusers' SEGA pipeline sums in the order ε_∅ + (s_g·(ε_p − ε_∅) + term): equal up to rounding.

Where a printed equation and the authors' published code (as ported to diffusers) differ,
we follow the code, since it produced the papers' numbers, and say so where it happens.
"""
import math
import numbers
from dataclasses import dataclass, field, replace

import torch

DEFAULT_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
    " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons,"
    " child abuse, brutality, cruelty"
)


def _check(ok, message):
    if not ok:
        raise ValueError(message)


def _real(owner, name, value):
    # bool is an int in Python; reject it so that scale=True is an error, not 1.0
    _check(isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value),
           f"{owner}.{name} must be a finite number, got {value!r}")
    return float(value)


def _count(owner, name, value):
    _check(isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0,
           f"{owner}.{name} must be an int >= 0, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- SLD

@dataclass(frozen=True)
class SafetyConfig:
    """SLD hyper-parameters with the symbols of Schramowski et al. (arXiv 2211.05105, §3).

    Defaults are the "medium" preset (also diffusers' pipeline defaults). Presets come from the
    authors' published configuration table; diffusers ships "weak" with s_S = 20 (its
    SafetyConfig.WEAK) where the authors' table has s_S = 200: we keep the authors' 200.
    """
    scale: float = 1000.0           # s_S, safety guidance scale
    warmup_steps: int = 10          # δ, steps of plain CFG before γ is subtracted
    threshold: float = 0.01         # λ, elements with ε_p − ε_S < λ are steered
    momentum_scale: float = 0.3     # s_m, weight of the momentum ν inside γ
    momentum_beta: float = 0.4      # β_m, how much of ν is kept per step
    concept: str = DEFAULT_CONCEPT  # c_S, the text whose direction is steered away from
    # the preset it was read from (`presets.PRESETS`), which settings record; set only by `named`, so a config made
    # by hand or changed with `dataclasses.replace` is "custom" whatever its numbers. Not compared: a config is its
    # numbers and concept
    name: str = field(default="custom", init=False, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        """The rule of the authors' and diffusers' pipelines: s_S ≤ 1 turns SLD off for this concept (no safety
        branch, no momentum). The pure functions below apply any s_S they are given; the methods (methods.py) and
        the pipeline use only configs with `enabled`."""
        return self.scale > 1.0

    def __post_init__(self):
        # frozen dataclass: normalise types through object.__setattr__
        for name in ("scale", "threshold", "momentum_scale", "momentum_beta"):
            object.__setattr__(self, name, _real("SafetyConfig", name, getattr(self, name)))
        object.__setattr__(self, "warmup_steps", _count("SafetyConfig", "warmup_steps", self.warmup_steps))
        _check(self.scale >= 0, f"SafetyConfig.scale (s_S) must be >= 0, got {self.scale}")
        _check(0 <= self.momentum_beta <= 1,
               f"SafetyConfig.momentum_beta (β_m) must be in [0, 1], got {self.momentum_beta}")
        _check(isinstance(self.concept, str) and self.concept.strip() != "",
               f"SafetyConfig.concept must be a non-empty string, got {self.concept!r}")

    @classmethod
    def preset(cls, name: str) -> "SafetyConfig":
        """The named configuration: "weak", "medium", "strong" or "max" (any case)."""
        key = name.strip().lower() if isinstance(name, str) else name
        if key not in PRESETS:
            raise ValueError(f"unknown SLD preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[key]

    def named(self, name: str) -> "SafetyConfig":
        """A copy that carries a preset's name (the registry's, `presets.preset`)."""
        copy = replace(self)
        object.__setattr__(copy, "name", name)
        return copy

    def values(self) -> dict:
        """The five numbers (s_S, δ, λ, s_m, β_m) by field name, e.g. for image metadata."""
        return {"scale": self.scale, "warmup_steps": self.warmup_steps, "threshold": self.threshold,
                "momentum_scale": self.momentum_scale, "momentum_beta": self.momentum_beta}


# name -> SafetyConfig(s_S, δ, λ, s_m, β_m), the authors' table; each carries its name (what settings record)
PRESETS = {name: config.named(name) for name, config in {
    "weak": SafetyConfig(200, 15, 0.0, 0.0, 0.0),
    "medium": SafetyConfig(1000, 10, 0.01, 0.3, 0.4),
    "strong": SafetyConfig(2000, 7, 0.025, 0.5, 0.7),
    "max": SafetyConfig(5000, 0, 1.0, 0.5, 0.7),
}.items()}


def cfg_guidance(eps_uncond, eps_text, guidance_scale) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022; SLD paper eq. 2): ε̂ = ε_∅ + s_g·(ε_p − ε_∅)."""
    return eps_uncond + guidance_scale * (eps_text - eps_uncond)


def safety_scale(eps_text, eps_safety, safety: SafetyConfig) -> torch.Tensor:
    """Element-wise safety scale μ (SLD paper eq. 5), as the authors' code computes it:

        μ = min(1, s_S·|ε_p − ε_S|)   where ε_p − ε_S < λ,   0 otherwise.

    The printed eq. 5 has max(1, |φ|) with φ = s_S·(ε_p − ε_S), which read literally is a floor
    at 1; the code clamps from above, so μ ∈ [0, 1] and saturates once s_S·|ε_p − ε_S| ≥ 1.
    The λ test reads the same in paper and code: elements with ε_p − ε_S ≥ λ get μ = 0, so with
    λ ≥ 0 every element where the prompt's estimate lies below the safety concept's is steered.
    """
    diff = eps_text - eps_safety                                        # ε_p − ε_S, (B, 4, h, w)
    scale = torch.clamp(torch.abs(diff) * safety.scale, max=1.0)
    return torch.where(diff >= safety.threshold, torch.zeros_like(scale), scale)


def safety_term(eps_uncond, eps_text, eps_safety, safety: SafetyConfig, momentum=None):
    """SLD's guidance term γ_t = μ ⊙ (ε_S − ε_∅) + s_m·ν_t (SLD paper eqs. 4 and 6). Returns (γ, μ).

    `momentum` is ν_t (None = 0). sld_guidance subtracts s_g·γ from CFG; the pipeline also reports μ and ‖s_g·γ‖."""
    mu = safety_scale(eps_text, eps_safety, safety)
    gamma = torch.mul(eps_safety - eps_uncond, mu)                      # μ ⊙ (ε_S − ε_∅)
    if momentum is not None:
        gamma = gamma + safety.momentum_scale * momentum                # + s_m·ν_t
    return gamma, mu


def sld_guidance(eps_uncond, eps_text, eps_safety, guidance_scale, safety: SafetyConfig, step: int,
                 momentum=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Safe Latent Diffusion (SLD paper eqs. 3-7). Returns (ε̂, ν), both (B, 4, h, w).

        γ_t = μ ⊙ (ε_S − ε_∅) + s_m·ν_t                 (eqs. 4 and 6; safety_term, μ from safety_scale)
        ν_{t+1} = β_m·ν_t + (1 − β_m)·γ_t               (eq. 7; ν_0 = 0, pass momentum=None first)
        ε̂ = ε_∅ + s_g·(ε_p − ε_∅ − γ_t)   if step ≥ δ   (eq. 3)
        ε̂ = ε_∅ + s_g·(ε_p − ε_∅)         if step < δ   (warm-up: plain CFG)

    As in the authors' code, ν is updated on every step, warm-up included, so guidance starts
    with momentum already built up. Operations run in the order of diffusers'
    StableDiffusionPipelineSafe, so the results match it bit for bit. Any s_S is applied as given
    (s_S = 0 is CFG); the pipelines' rule that s_S ≤ 1 turns SLD off is `SafetyConfig.enabled`.
    """
    eps, (momentum,), _, _ = multi_sld_guidance(eps_uncond, eps_text, [eps_safety], guidance_scale, [safety], step,
                                                [momentum])
    return eps, momentum


def multi_sld_guidance(eps_uncond, eps_text, eps_safeties, guidance_scale, safeties, step: int, momenta=None):
    """SLD with several safety concepts c = 1..K, each with its own s_S, δ, λ, s_m, β_m and momentum ν_c — an
    extension beyond the paper, which steers from one concept. Returns (ε̂, [ν_c], [γ_c], [μ_c]).

        γ_c = μ_c ⊙ (ε_{S,c} − ε_∅) + s_{m,c}·ν_c,   ν_c ← β_{m,c}·ν_c + (1 − β_{m,c})·γ_c   (each c, every step)
        ε̂ = ε_∅ + s_g·(ε_p − ε_∅ − Σ_{c: step ≥ δ_c} γ_c)

    With one concept this is `sld_guidance`, operation for operation (the same bits). `momenta`: ν_c per concept
    (None, or a list holding None, = 0)."""
    guidance = eps_text - eps_uncond                                    # ε_p − ε_∅
    momenta = list(momenta) if momenta is not None else [None] * len(safeties)
    _check(len(eps_safeties) == len(safeties) == len(momenta),
           f"got {len(eps_safeties)} safety estimates, {len(safeties)} configs, {len(momenta)} momenta")
    new_momenta, gammas, mus = [], [], []
    for eps_safety, safety, momentum in zip(eps_safeties, safeties, momenta):
        if momentum is None:
            momentum = torch.zeros_like(guidance)                       # ν_0 = 0
        gamma, mu = safety_term(eps_uncond, eps_text, eps_safety, safety, momentum)
        new_momenta.append(safety.momentum_beta * momentum + (1 - safety.momentum_beta) * gamma)
        if step >= safety.warmup_steps:
            guidance = guidance - gamma
        gammas.append(gamma)
        mus.append(mu)
    return eps_uncond + guidance_scale * guidance, new_momenta, gammas, mus


# ----------------------------------------------------------------------------- SEGA

@dataclass(frozen=True)
class Edit:
    """One SEGA edit concept c_e with its hyper-parameters (Brack et al., arXiv 2301.12247, §3)."""
    concept: str                        # c_e, the text prompt of the edit
    scale: float = 5.0                  # s_e, edit guidance scale
    threshold: float = 0.9              # λ, quantile of |ψ| below which elements are dropped
    warmup_steps: int = 10              # δ, first step at which the edit is applied
    cooldown_steps: int | None = None   # step from which the edit is switched off; None = never
    reverse: bool = False               # True: steer away from c_e (ψ = ε_∅ − ε_c)
    weight: float = 1.0                 # g, its share among concepts; negative counts as 0

    def __post_init__(self):
        _check(isinstance(self.concept, str) and self.concept.strip() != "",
               f"Edit.concept must be a non-empty string, got {self.concept!r}")
        for name in ("scale", "threshold", "weight"):
            object.__setattr__(self, name, _real("Edit", name, getattr(self, name)))
        _check(self.scale >= 0, f"Edit.scale (s_e) must be >= 0 (use reverse=True to negate), got {self.scale}")
        _check(0 <= self.threshold < 1, f"Edit.threshold (a quantile) must be in [0, 1), got {self.threshold}")
        object.__setattr__(self, "warmup_steps", _count("Edit", "warmup_steps", self.warmup_steps))
        if self.cooldown_steps is not None:
            object.__setattr__(self, "cooldown_steps", _count("Edit", "cooldown_steps", self.cooldown_steps))
        _check(isinstance(self.reverse, bool), f"Edit.reverse must be a bool, got {self.reverse!r}")

    def cooled(self, step) -> bool:
        """True once the edit is switched off (step ≥ cooldown_steps)."""
        return self.cooldown_steps is not None and step >= self.cooldown_steps


def edit_directions(eps_uncond, eps_edits, edits, step: int) -> list[torch.Tensor]:
    """Masked, scaled edit directions μ ⊙ ψ_c, one (B, C, h, w) tensor per concept (SEGA eqs. 4-6).

        ψ_c = ε_c − ε_∅  (or ε_∅ − ε_c for a reverse edit)
        μ   = s_e  where |ψ_c| ≥ η_λ(|ψ_c|),  0 otherwise

    η_λ is the λ-quantile of |s_e·ψ_c| taken per sample and per latent channel over the h·w
    positions (torch.quantile, linear interpolation), so roughly the top (1 − λ) share of each
    channel moves. Contrast SLD, whose λ is an absolute bound on ε_p − ε_S: SEGA's threshold is
    relative, and keeps the same fraction of elements whatever the scale of ψ. A concept at or
    past its cooldown gives zeros.
    """
    _check(len(eps_edits) == len(edits), f"got {len(eps_edits)} edit estimates for {len(edits)} edits")
    out = []
    for eps_c, edit in zip(eps_edits, edits):                           # eps_c: (B, C, h, w)
        if edit.cooled(step):
            out.append(torch.zeros_like(eps_c))
            continue
        psi = eps_c - eps_uncond
        if edit.reverse:
            psi = -psi                                                  # flip before scaling, as reference
        psi = psi * edit.scale
        # torch.quantile needs float32/64: half types go through float32 as in the reference
        # (which also downcasts float64; we keep float64, so ties at η stay exact)
        mag = torch.abs(psi).flatten(start_dim=2)                       # (B, C, h*w)
        mag = mag.float() if mag.dtype in (torch.float16, torch.bfloat16) else mag
        eta = torch.quantile(mag, edit.threshold, dim=2).to(psi.dtype)  # (B, C)
        out.append(torch.where(torch.abs(psi) >= eta[:, :, None, None], psi, torch.zeros_like(psi)))
    return out


def sega_guidance(eps_uncond, eps_edits, edits, step: int, momentum=None, momentum_scale=0.1,
                  momentum_beta=0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """The SEGA term γ̂ to add to the guided estimate, and the momentum ν (SEGA eqs. 7-9); see `sega_terms`."""
    return sega_terms(eps_uncond, eps_edits, edits, step, momentum, momentum_scale, momentum_beta)[:2]


def sega_terms(eps_uncond, eps_edits, edits, step: int, momentum=None, momentum_scale=0.1, momentum_beta=0.4):
    """(γ̂, ν, [μ ⊙ ψ_c]): the SEGA term to add to the guided estimate, the momentum (SEGA eqs. 7-9), and each
    concept's masked direction from `edit_directions` (zeros once cooled down).

    With ψ_c from edit_directions and weights g_c (0 when negative or once cooled down):

        S_t = Σ_c g_c·ψ_c + s_m·ν_t,   ν_{t+1} = β_m·ν_t + (1 − β_m)·S_t    (every step, ν_0 = 0)

    The term depends on which concepts are warm (step ≥ δ_c), as in the authors' code:
      - none warm:            0
      - some but not all:     Σ_warm (g_c / Σ_warm g)·ψ_c   (normalised, without momentum)
      - all warm:             S_t
    A cooled-down concept still counts as warm. The partial-warm normalisation and the single
    momentum over the combined sum are the code's; the paper gives per-concept warm-up and
    weights g_i without these details.

    Corner case: if every warm concept has weight 0 (all cooled down, or weights ≤ 0) while
    others still warm up, the reference divides 0 by 0 and its image turns to NaN. Here the
    normalised term is 0 there instead.
    """
    _check(0 <= momentum_beta <= 1, f"momentum_beta (β_m) must be in [0, 1], got {momentum_beta}")
    if momentum is None:
        momentum = torch.zeros_like(eps_uncond)                         # ν_0 = 0
    if len(edits) == 0:
        return torch.zeros_like(eps_uncond), momentum, []
    directions = edit_directions(eps_uncond, eps_edits, edits, step)
    psi = torch.stack(directions)                                       # (E, B, C, h, w)
    # g_c laid out per concept and sample, (E, B), as in the reference's einsum
    g = [0.0 if edit.cooled(step) else edit.weight for edit in edits]
    g = torch.tensor(g, dtype=eps_uncond.dtype, device=eps_uncond.device)[:, None].repeat(1, eps_uncond.shape[0])
    g = torch.where(g < 0, torch.zeros_like(g), g)
    warm = [c for c, edit in enumerate(edits) if step >= edit.warmup_steps]
    term = torch.zeros_like(eps_uncond)
    if 0 < len(warm) < len(edits):
        idx = torch.tensor(warm, device=eps_uncond.device)
        g_warm = g.index_select(0, idx)                                 # (W, B)
        total = g_warm.sum(dim=0)                                       # (B,)
        g_warm = torch.where(total > 0, g_warm / total, torch.zeros_like(g_warm))  # 0/0 -> 0, not NaN
        term = torch.einsum("cb,cbijk->bijk", g_warm, psi.index_select(0, idx))

    s = torch.einsum("cb,cbijk->bijk", g, psi)                          # Σ_c g_c·ψ_c, (B, C, h, w)
    s = s + momentum_scale * momentum
    momentum = momentum_beta * momentum + (1 - momentum_beta) * s
    if len(warm) == len(edits):
        term = s
    return term, momentum, directions
