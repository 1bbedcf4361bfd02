"""Guidance methods: small objects that say which text conditions they need at a step and combine the UNet's
estimates for them into the ε the sampler takes. The math is in `guidance.py`; this module only composes it.

A method is any object with

    conditions(step, num_steps, t) -> list of condition names   which branches the UNet must evaluate at this step
    __call__(eps, step, num_steps, t) -> (ε̂, terms)             eps: {condition name: ε}, (N, 4, h, w) each;
                                                                 terms: its intermediates, by name (may be empty)
    reset()                                                      (optional) forget the state of a previous run

Condition names (`conditions.py`): `UNCOND` (the negative prompt, "" by default: ε_∅), `PROMPT` (ε_p), and
`concept(text)` for any other text, evaluated for every image (ε_S for a safety concept, ε_c for an edit concept).
The sampling loop (`sampling.sample`) batches exactly the conditions a method asks for into one UNet call and
hands the estimates back by name, so a method that needs a new branch just names it.

Built in: `CFG`, `SLD` (one or several safety concepts), `SEGA` (semantic edits), `SLDWithSEGA`. Each gives the
bits of the reference pipelines (diffusers' StableDiffusionPipelineSafe and SemanticStableDiffusionPipeline).
`PRESETS` maps a name (`--safety`, `pipe(safety="strong")`) to a factory of methods: SLD's four and the
SEGA-as-safety presets `sega-medium|strong|max` (`SegaSafety`: the safety concept as one reversed edit).
"""
import dataclasses

from dataclasses import dataclass

from .conditions import PROMPT, UNCOND, concept
from .guidance import (DEFAULT_CONCEPT, PRESETS as SAFETY_PRESETS, Edit, SafetyConfig, cfg_guidance,
                       multi_sld_guidance, sega_terms)


def _unique(names):
    return list(dict.fromkeys(names))  # order kept: the batch order of the UNet call


class CFG:
    """Classifier-free guidance (Ho & Salimans 2022): ε̂ = ε_∅ + s_g·(ε_p − ε_∅). With s_g ≤ 1 guidance is off
    and only the prompt's branch is computed, ε̂ = ε_p (as in diffusers)."""

    def __init__(self, guidance_scale: float = 7.5):
        self.guidance_scale = guidance_scale

    @property
    def cfg_on(self) -> bool:
        return self.guidance_scale > 1.0

    def reset(self):
        pass

    def conditions(self, step, num_steps, t) -> list:
        return [UNCOND, PROMPT] if self.cfg_on else [PROMPT]

    def applied(self, step) -> list:
        """Indices of the safety configs / edits whose term enters ε̂ at this step (CFG has none)."""
        return []

    def __call__(self, eps, step, num_steps, t):
        if not self.cfg_on:
            return eps[PROMPT], {}
        return cfg_guidance(eps[UNCOND], eps[PROMPT], self.guidance_scale), {}

    def describe(self) -> str:
        return f"CFG (s_g {self.guidance_scale})"


class SLD(CFG):
    """Safe Latent Diffusion (`guidance.multi_sld_guidance`; one concept: `guidance.sld_guidance`).

    `safety`: one SafetyConfig or a list (several concepts: each with its own μ_c, threshold, warm-up and momentum
    ν_c; an extension beyond the paper). Configs that are not `enabled` (s_S ≤ 1) contribute nothing and cost no
    branch; configs with the same concept text share one branch. Terms: per config, `mu`, `gamma` and `nu` (None
    where the config was not computed at this step)."""

    def __init__(self, safety, guidance_scale: float = 7.5):
        super().__init__(guidance_scale)
        configs = [safety] if isinstance(safety, SafetyConfig) else list(safety)
        if not all(isinstance(c, SafetyConfig) for c in configs):
            raise TypeError("safety must be a SafetyConfig or a list of SafetyConfigs")
        self.safety = [c for c in configs if c.enabled]
        self.reset()

    def reset(self):
        self.momenta = [None] * len(self.safety)  # ν_c; None = 0

    def computed(self, step) -> list:
        """Indices of the configs whose safety term is computed at this step. The branch is skipped where it cannot
        change the result: no momentum (s_m = 0, so ν never reaches γ) and still in warm-up (γ not subtracted)."""
        if not self.cfg_on:
            return []
        return [i for i, c in enumerate(self.safety) if c.momentum_scale != 0 or step >= c.warmup_steps]

    def applied(self, step) -> list:
        """Indices of the configs whose γ_c enters ε̂ at this step: s_g > 1 and step ≥ δ_c (sld_guidance)."""
        return [i for i, c in enumerate(self.safety) if self.cfg_on and step >= c.warmup_steps]

    def conditions(self, step, num_steps, t) -> list:
        return super().conditions(step, num_steps, t) + _unique(concept(self.safety[i].concept)
                                                                for i in self.computed(step))

    def __call__(self, eps, step, num_steps, t):
        active = self.computed(step)
        if not active:
            return super().__call__(eps, step, num_steps, t)
        configs = [self.safety[i] for i in active]
        eps_hat, momenta, gammas, mus = multi_sld_guidance(
            eps[UNCOND], eps[PROMPT], [eps[concept(c.concept)] for c in configs], self.guidance_scale, configs,
            step, [self.momenta[i] for i in active])
        terms = {"safety": self.safety, "mu": [None] * len(self.safety), "gamma": [None] * len(self.safety)}
        for i, nu, gamma, mu in zip(active, momenta, gammas, mus):
            self.momenta[i], terms["gamma"][i], terms["mu"][i] = nu, gamma, mu
        terms["nu"] = list(self.momenta)
        return eps_hat, terms

    def describe(self) -> str:
        return f"SLD (s_g {self.guidance_scale}; " + "; ".join(
            f"{c.concept!r}: " + ", ".join(f"{k}={v}" for k, v in c.values().items()) for c in self.safety) + ")"


class SEGA(CFG):
    """Semantic guidance (`guidance.sega_terms`): ε̂ = ε_∅ + (s_g·(ε_p − ε_∅) + γ̂), summed in the reference's
    order. Terms: `edits`, `edit_directions` (each edit's masked μ ⊙ ψ_c), `edit_term` (γ̂), `edit_nu`."""

    def __init__(self, edits, guidance_scale: float = 7.5, momentum_scale: float = 0.1, momentum_beta: float = 0.4):
        super().__init__(guidance_scale)
        self.edits = list(edits)
        if not all(isinstance(e, Edit) for e in self.edits):
            raise TypeError("edits must be guidance.Edit objects")
        self.momentum_scale, self.momentum_beta = momentum_scale, momentum_beta
        self.reset()

    def reset(self):
        self.momentum = None

    def conditions(self, step, num_steps, t) -> list:
        edits = _unique(concept(e.concept) for e in self.edits) if self.cfg_on else []
        return super().conditions(step, num_steps, t) + edits

    def applied(self, step) -> list:
        """Indices of the edits that act at this step: s_g > 1, step ≥ δ_c and not cooled down (sega_terms)."""
        return [c for c, e in enumerate(self.edits) if self.cfg_on and step >= e.warmup_steps and not e.cooled(step)]

    def term(self, eps, step):
        """γ̂ and the terms, updating the momentum."""
        term, self.momentum, directions = sega_terms(
            eps[UNCOND], [eps[concept(e.concept)] for e in self.edits], self.edits, step, self.momentum,
            self.momentum_scale, self.momentum_beta)
        return term, {"edits": self.edits, "edit_directions": directions, "edit_term": term,
                      "edit_nu": self.momentum}

    def __call__(self, eps, step, num_steps, t):
        if not self.cfg_on or not self.edits:
            return super().__call__(eps, step, num_steps, t)
        term, terms = self.term(eps, step)
        eps_u, eps_p = eps[UNCOND], eps[PROMPT]
        return eps_u + (self.guidance_scale * (eps_p - eps_u) + term), terms

    def describe(self) -> str:
        return "SEGA (s_g {}; {}; s_m {}, β_m {})".format(self.guidance_scale, "; ".join(
            f"{'-' if e.reverse else '+'}{e.concept} (scale {e.scale}, threshold {e.threshold}, warmup "
            f"{e.warmup_steps}, cooldown {e.cooldown_steps}, weight {e.weight})" for e in self.edits),
            self.momentum_scale, self.momentum_beta)


class SLDWithSEGA:
    """SLD and SEGA together: ε̂ = SLD's ε̂ + γ̂. At steps where no safety term is computed, SEGA's own sum."""

    def __init__(self, sld: SLD, sega: SEGA):
        self.sld, self.sega = sld, sega

    @property
    def guidance_scale(self):
        return self.sld.guidance_scale

    @property
    def cfg_on(self) -> bool:
        return self.sld.cfg_on

    def reset(self):
        self.sld.reset()
        self.sega.reset()

    def conditions(self, step, num_steps, t) -> list:
        return _unique(self.sld.conditions(step, num_steps, t) + self.sega.conditions(step, num_steps, t))

    def applied(self, step) -> list:
        """SLD's applied configs, then SEGA's applied edits numbered after them."""
        return self.sld.applied(step) + [len(self.sld.safety) + c for c in self.sega.applied(step)]

    def __call__(self, eps, step, num_steps, t):
        if not self.sld.computed(step):
            return self.sega(eps, step, num_steps, t)
        eps_hat, terms = self.sld(eps, step, num_steps, t)
        term, sega_terms = self.sega.term(eps, step)
        return eps_hat + term, terms | sega_terms

    def describe(self) -> str:
        return f"{self.sld.describe()} + {self.sega.describe()}"


class FunctionSLD(SLD):
    """SLD with its combination replaced by a function of `guidance.sld_guidance`'s signature, fn(ε_∅, ε_p, ε_S,
    s_g, safety, step, ν) -> (ε̂, ν): what the deprecated `pipe(..., guidance=fn)` runs. The safety branch is
    computed at every step (the function may use it anywhere)."""

    def __init__(self, fn, safety: SafetyConfig, guidance_scale: float = 7.5):
        super().__init__(safety, guidance_scale)
        self.fn = fn

    def computed(self, step) -> list:
        return [0] if self.cfg_on and self.safety else []

    def __call__(self, eps, step, num_steps, t):
        if not self.computed(step):
            return super().__call__(eps, step, num_steps, t)
        safety = self.safety[0]
        eps_hat, self.momenta[0] = self.fn(eps[UNCOND], eps[PROMPT], eps[concept(safety.concept)],
                                           self.guidance_scale, safety, step, self.momenta[0])
        return eps_hat, {}

    def describe(self) -> str:
        return f"{getattr(self.fn, '__name__', 'a function')} in place of SLD ({super().describe()})"


@dataclass(frozen=True)
class SegaSafety:
    """Safety through SEGA, as the authors' I2P harness runs it (`mitigation/semantic_ssd.py`): the safety concept
    as one reversed edit, ψ = ε_∅ − ε_S, with SEGA's own relative threshold and momentum (see `guidance.sega_terms`).
    Accepted wherever a SafetyConfig is (`safety=`, `safety_configs`); `method` builds its `SEGA`. `values()` has
    SafetyConfig's five keys (s_e, δ, λ, s_m, β_m) and `"method": "sega"`, so settings never read as SLD's."""
    scale: float                    # s_e, edit guidance scale
    warmup_steps: int               # δ, first step the edit acts (its momentum runs from step 0)
    threshold: float                # λ, quantile of |ψ| below which elements are dropped
    momentum_scale: float           # s_m
    momentum_beta: float = 0.4      # β_m: diffusers' default, which the harness leaves
    concept: str = DEFAULT_CONCEPT  # c_S
    preset: str = "custom"          # the registry name it came from, for settings and messages

    enabled = True  # (as SafetyConfig.enabled: a SEGA safety config always acts)

    def __post_init__(self):
        edit = self.edit()  # Edit's own checks of s_e, λ, δ and the concept, with its messages
        for name in ("scale", "threshold", "warmup_steps"):  # frozen: normalised types through object.__setattr__
            object.__setattr__(self, name, getattr(edit, name))
        for name in ("momentum_scale", "momentum_beta"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if not 0 <= self.momentum_beta <= 1:
            raise ValueError(f"SegaSafety.momentum_beta (β_m) must be in [0, 1], got {self.momentum_beta}")

    def edit(self) -> Edit:
        """The reversed SEGA edit away from the safety concept."""
        return Edit(self.concept, scale=self.scale, threshold=self.threshold, warmup_steps=self.warmup_steps,
                    reverse=True)

    def method(self, guidance_scale: float = 7.5) -> "SEGA":
        """SEGA with the reversed edit and this config's momentum: what `build` and the presets run."""
        return SEGA([self.edit()], guidance_scale, self.momentum_scale, self.momentum_beta)

    def values(self) -> dict:
        """The five numbers by SafetyConfig's field names, and "method": "sega" (for settings and run.json)."""
        return {"method": "sega", "scale": self.scale, "warmup_steps": self.warmup_steps,
                "threshold": self.threshold, "momentum_scale": self.momentum_scale,
                "momentum_beta": self.momentum_beta}


# name -> SegaSafety(s_e, δ, λ, s_m); β_m 0.4 and s_g 7.5 (the pipeline's default) as in the authors' harness
SEGA_SAFETY_PRESETS = {name: SegaSafety(*values, preset=name) for name, values in (
    ("sega-medium", (4, 10, 0.9, 0.3)), ("sega-strong", (7, 5, 0.85, 0.5)), ("sega-max", (10, 0, 0.75, 0.5)))}
SAFETY_KINDS = (SafetyConfig, SegaSafety)


def safety_configs(safety, concept_text=None) -> list:
    """The SafetyConfigs that `safety=` names: None or "off" → [], a preset name → its config (names from `PRESETS`;
    a SEGA preset → its `SegaSafety`), a SafetyConfig/SegaSafety or a list of them as given (disabled ones included:
    `SLD` drops those). `concept_text` (a text, or a list of texts: one config per text, several concepts) replaces
    each config's concept (the CLIs' --safety-concept, repeatable)."""
    if isinstance(safety, str):
        key = safety.strip().lower()
        preset(key)  # a registered name, or the error that lists them
        configs = [] if key == "off" else [SEGA_SAFETY_PRESETS[key] if key in SEGA_SAFETY_PRESETS
                                           else SAFETY_PRESETS[key]]
    else:
        configs = [] if safety is None else list(safety) if isinstance(safety, (list, tuple)) else [safety]
    if not all(isinstance(c, SAFETY_KINDS) for c in configs):
        raise TypeError(f"safety must be a preset name, a SafetyConfig, a list of them or None, not {safety!r}")
    if sum(isinstance(c, SegaSafety) for c in configs) > 1:
        raise ValueError("safety takes one SEGA safety config at most (its edit has the one SEGA momentum)")
    if concept_text is None:
        return configs
    texts = [concept_text] if isinstance(concept_text, str) else list(concept_text)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"concept_text must be a text or a non-empty list of texts, not {concept_text!r}")
    if len(set(texts)) < len(texts):
        raise ValueError(f"the safety concept {next(t for t in texts if texts.count(t) > 1)!r} is given twice")
    if len(texts) > 1 and any(isinstance(c, SegaSafety) for c in configs):
        raise ValueError("a SEGA safety preset takes one safety concept (its one reversed edit has the one SEGA "
                         "momentum); give one concept, or use an SLD preset for several")
    return [_with_concept(c, t) for c in configs for t in texts]


def build(safety=None, edits=(), guidance_scale=7.5, edit_momentum_scale=0.1, edit_momentum_beta=0.4):
    """The method for the pipeline's `safety=` (see `safety_configs`) and `edits=` (SEGA Edits). A SEGA safety
    config is SEGA with its reversed edit; together with `edits` it is refused (they would share one momentum)."""
    configs = safety_configs(safety)
    sega_safety = [c for c in configs if isinstance(c, SegaSafety)]
    sld = SLD([c for c in configs if isinstance(c, SafetyConfig)], guidance_scale)
    if sega_safety:
        if edits:
            raise ValueError(f"the SEGA safety preset {sega_safety[0].preset!r} cannot be combined with edits: "
                             f"they would share one SEGA momentum; use an SLD preset with edits")
        sega = sega_safety[0].method(guidance_scale)
    elif edits:
        sega = SEGA(edits, guidance_scale, edit_momentum_scale, edit_momentum_beta)
    else:
        return sld if sld.safety else CFG(guidance_scale)
    return SLDWithSEGA(sld, sega) if sld.safety else sega  # SLD with no enabled config adds nothing


def never_acts(method, num_steps: int):
    """Why a method's safety and edit terms enter ε̂ at none of a run's `num_steps` loop iterations (the sampler's
    `len(timesteps)`: PNDM makes 51 for 50 steps), as one sentence; None when some term acts, when the method has
    no such term (plain CFG), or when it has no `applied(step)` to ask (a caller's own method)."""
    if type(method) is CFG or isinstance(method, FunctionSLD) or not callable(getattr(method, "applied", None)):
        return None
    if any(method.applied(step) for step in range(num_steps)):
        return None
    if not getattr(method, "cfg_on", True):
        return (f"guidance scale s_g = {method.guidance_scale} <= 1 turns classifier-free guidance off, and with "
                f"it every safety and edit term: the images are plain SD's")
    parts = [method.sld, method.sega] if isinstance(method, SLDWithSEGA) else [method]
    warmups = sorted({x.warmup_steps for m in parts for x in [*getattr(m, "safety", []), *getattr(m, "edits", [])]})
    if warmups and warmups[0] >= num_steps:
        return (f"the safety guidance never acts: its warm-up (δ = {', '.join(map(str, warmups))}) is not shorter "
                f"than the run's {num_steps} sampling iterations, so the images are plain SD's")
    return "no safety or edit term acts at any step of this run (each edit is cooled down before its warm-up ends)"


def _sld_preset(config):
    return lambda guidance_scale=7.5, concept_text=None: SLD(
        config if concept_text is None else _with_concept(config, concept_text), guidance_scale)


def _sega_preset(config):
    """The registry factory of a SEGA safety preset: (guidance_scale, concept_text) -> its SEGA method."""
    return lambda guidance_scale=7.5, concept_text=None: (
        config if concept_text is None else _with_concept(config, concept_text)).method(guidance_scale)


def _with_concept(config, text):
    return dataclasses.replace(config, concept=text)


# The preset registry: name -> factory(guidance_scale, concept_text=None) -> method. The CLI's --safety choices,
# validation and image metadata read it; a new preset is one line here.
PRESETS = {"off": lambda guidance_scale=7.5, concept_text=None: CFG(guidance_scale),
           **{name: _sld_preset(config) for name, config in SAFETY_PRESETS.items()},
           **{name: _sega_preset(config) for name, config in SEGA_SAFETY_PRESETS.items()}}


def preset(name: str):
    """The factory of the named preset (any case)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in PRESETS:
        raise ValueError(f"unknown safety preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]
