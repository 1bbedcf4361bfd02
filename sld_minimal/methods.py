"""Guidance methods: small objects that say which text conditions they need at a step and combine the UNet's
estimates for them into the ε the sampler takes. The math is in `guidance.py`; this module only composes it.

A method is any object with

    conditions(step, num_steps, t) -> list of condition names   which branches the UNet must evaluate at this step
    __call__(eps, step, num_steps, t) -> (ε̂, terms)             eps: {condition name: ε}, (N, 4, h, w) each;
                                                                 terms: its intermediates, by name (may be empty)
    reset()                                                      (optional) forget the state of a previous run
    at(step, num_steps, t)                                       (optional) set the configuration of this step
                                                                 (a schedule); the loop calls it before conditions

`at` should depend on its arguments only (and on the method's base configuration): `never_acts` calls it for every
step ahead of a run to ask `applied(step)` whether anything acts. A method that wraps another forwards `at`.
Step indices count the loop's iterations, one per UNet call (PNDM: 51 for 50 steps), as diffusers counts them.

Condition names (`conditions.py`): `UNCOND` (the negative prompt, "" by default: ε_∅), `PROMPT` (ε_p), and
`concept(text)` for any other text, evaluated for every image (ε_S for a safety concept, ε_c for an edit concept).
The sampling loop (`sampling.sample`) batches exactly the conditions a method asks for into one UNet call and
hands the estimates back by name, so a method that needs a new branch just names it.

Built in: `CFG`, `SLD` (one or several safety concepts), `SEGA` (semantic edits), `SLDWithSEGA`. Each gives the
bits of the reference pipelines (diffusers' StableDiffusionPipelineSafe and SemanticStableDiffusionPipeline).
The presets (`--safety`, `pipe(safety="strong")`) and `build`, from a name or configs to one of these methods,
are in `presets.py`.
"""
from .conditions import PROMPT, UNCOND, concept
from .guidance import Edit, SafetyConfig, cfg_guidance, multi_sld_guidance, sega_terms


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

    def at(self, step, num_steps, t):
        """The per-step hook (see the module docstring); CFG has nothing to set."""

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
    ν_c; an extension beyond the paper); configs with the same concept text share one branch. `self.safety` keeps
    them as given (the base configuration, which `describe` reports); `self.current` holds the configuration of the
    step under way, one config per base config in the same order (config c keeps its ν_c). `at` sets it before each
    step: SLD's own keeps the base, a schedule overrides `at` (README's `RampedSLD`).

    Config c acts at a step where s_g > 1 and its s_S > 1 there (`SafetyConfig.enabled`, the authors' and diffusers'
    rule): with s_S ≤ 1 at a step it contributes nothing and costs no branch, and it acts again once s_S rises above
    1. Its momentum over such a step follows eq. 7 with nothing to add, γ_{c,t} = 0:

        ν_{c,t+1} = β_{m,c}·ν_{c,t}         (s_S ≤ 1 at step t; β_m of that step's config)

    so the running average of the safety term fades by β_m per step off, as over steps where the concept steered
    nothing, instead of pushing with an old ν when it returns. Where its branch is skipped for another reason (s_m = 0
    during its warm-up: ν never reaches γ) ν_c is left as it is.

    Terms, per config (lists indexed as `current`): `safety` (this step's configs), `computed` (γ_c evaluated: its
    branch ran), `applied` (γ_c entered ε̂), `mu`, `gamma` (None where not computed) and `nu` (ν_c after the step)."""

    def __init__(self, safety, guidance_scale: float = 7.5):
        super().__init__(guidance_scale)
        configs = [safety] if isinstance(safety, SafetyConfig) else list(safety)
        if not all(isinstance(c, SafetyConfig) for c in configs):
            raise TypeError("safety must be a SafetyConfig or a list of SafetyConfigs")
        self.safety = configs  # s_S ≤ 1 kept: a schedule may raise it (`at`); where it stays ≤ 1 it never acts
        self.reset()

    def reset(self):
        self.momenta = [None] * len(self.safety)  # ν_c; None = 0
        self.current = list(self.safety)

    def at(self, step, num_steps, t):
        """Set `self.current`, the configs of this step; SLD's own keeps the base configuration."""
        self.current = list(self.safety)

    def computed(self, step) -> list:
        """Indices of the configs whose safety term is computed at this step (their branch runs): s_g > 1, s_S > 1 at
        this step, and s_m ≠ 0 (γ_c builds ν_c from step 0) or step ≥ δ_c. Elsewhere the branch cannot change the
        result and is skipped. Reads `current`, the configuration `at` set for the step."""
        if not self.cfg_on:
            return []
        return [i for i, c in enumerate(self._configs()) if c.enabled and (c.momentum_scale != 0
                                                                           or step >= c.warmup_steps)]

    def applied(self, step) -> list:
        """Indices of the configs whose γ_c enters ε̂ at this step: s_g > 1, s_S > 1 and step ≥ δ_c (sld_guidance).
        Reads `current`, the configuration `at` set: where a schedule changes it, call `at(step, …)` first."""
        return [i for i, c in enumerate(self._configs()) if self.cfg_on and c.enabled and step >= c.warmup_steps]

    def _configs(self) -> list:
        """`current`, checked: one SafetyConfig per base config."""
        if len(self.current) != len(self.safety) or not all(isinstance(c, SafetyConfig) for c in self.current):
            raise ValueError(f"{type(self).__name__}.current must hold one SafetyConfig per base config, in order "
                             f"({len(self.safety)}), got {self.current!r:.120}")
        return self.current

    def conditions(self, step, num_steps, t) -> list:
        return super().conditions(step, num_steps, t) + _unique(concept(self.current[i].concept)
                                                                for i in self.computed(step))

    def __call__(self, eps, step, num_steps, t):
        active, applied, configs = self.computed(step), self.applied(step), self.current
        for i, c in enumerate(configs):
            if not c.enabled and self.momenta[i] is not None:
                self.momenta[i] = c.momentum_beta * self.momenta[i]  # s_S ≤ 1: ν_{t+1} = β_m·ν_t (γ_t = 0)
        k = len(configs)
        terms = {"safety": list(configs), "computed": [i in active for i in range(k)],
                 "applied": [i in applied for i in range(k)], "mu": [None] * k, "gamma": [None] * k}
        if not active:
            eps_hat, _ = super().__call__(eps, step, num_steps, t)
        else:
            eps_hat, momenta, gammas, mus = multi_sld_guidance(
                eps[UNCOND], eps[PROMPT], [eps[concept(configs[i].concept)] for i in active], self.guidance_scale,
                [configs[i] for i in active], step, [self.momenta[i] for i in active])
            for i, nu, gamma, mu in zip(active, momenta, gammas, mus):
                self.momenta[i], terms["gamma"][i], terms["mu"][i] = nu, gamma, mu
        terms["nu"] = list(self.momenta)
        return eps_hat, terms

    def describe(self) -> str:
        return f"SLD (s_g {self.guidance_scale}; " + "; ".join(
            f"{c.concept!r}: " + ", ".join(f"{k}={v}" for k, v in c.values().items()) for c in self.safety) + ")"


class SEGA(CFG):
    """Semantic guidance (`guidance.sega_terms`): ε̂ = ε_∅ + (s_g·(ε_p − ε_∅) + γ̂), summed in the reference's
    order. Terms: `edits`, `edit_applied` (per edit: it acts at this step), `edit_directions` (each edit's masked
    μ ⊙ ψ_c, computed at every step), `edit_term` (γ̂), `edit_nu`."""

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
        """γ̂ and the terms (`edit_applied`: per edit, whether it acts at this step), updating the momentum."""
        term, self.momentum, directions = sega_terms(
            eps[UNCOND], [eps[concept(e.concept)] for e in self.edits], self.edits, step, self.momentum,
            self.momentum_scale, self.momentum_beta)
        applied = self.applied(step)
        return term, {"edits": self.edits, "edit_applied": [c in applied for c in range(len(self.edits))],
                      "edit_directions": directions, "edit_term": term, "edit_nu": self.momentum}

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
    """SLD and SEGA together: ε̂ = SLD's ε̂ + γ̂. At steps where no safety term is computed, SEGA's own sum. Terms: SLD's
    and SEGA's."""

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

    def at(self, step, num_steps, t):
        self.sld.at(step, num_steps, t)
        self.sega.at(step, num_steps, t)

    def conditions(self, step, num_steps, t) -> list:
        return _unique(self.sld.conditions(step, num_steps, t) + self.sega.conditions(step, num_steps, t))

    def applied(self, step) -> list:
        """SLD's applied configs, then SEGA's applied edits numbered after them."""
        return self.sld.applied(step) + [len(self.sld.safety) + c for c in self.sega.applied(step)]

    def __call__(self, eps, step, num_steps, t):
        eps_hat, terms = self.sld(eps, step, num_steps, t)  # every step: SLD's momenta and terms
        if not any(terms["computed"]):  # SLD's ε̂ is CFG's: SEGA's own sum, in the reference's order of additions
            eps_hat, sega_terms = self.sega(eps, step, num_steps, t)
            return eps_hat, terms | sega_terms
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
        return [0] if self.cfg_on and self.current and self.current[0].enabled else []

    def __call__(self, eps, step, num_steps, t):
        if not self.computed(step):
            return super().__call__(eps, step, num_steps, t)
        safety = self.current[0]
        eps_hat, self.momenta[0] = self.fn(eps[UNCOND], eps[PROMPT], eps[concept(safety.concept)],
                                           self.guidance_scale, safety, step, self.momenta[0])
        return eps_hat, {}

    def describe(self) -> str:
        return f"{getattr(self.fn, '__name__', 'a function')} in place of SLD ({super().describe()})"


def never_acts(method, num_steps: int, timesteps=None):
    """Why a method's safety and edit terms enter ε̂ at none of a run's `num_steps` loop iterations (the sampler's
    `len(timesteps)`: PNDM makes 51 for 50 steps), as one sentence; None when some term acts, when the method has
    no such term (plain CFG; SLD whose every concept has s_S ≤ 1 at every step: switched off, as asked), or when it
    has no `applied(step)` to ask (a caller's own method). A method's per-step hook `at` runs first at each step, as
    the loop runs it (t from `timesteps`, None where they are not given), since `applied` reads the configuration it
    sets; the loop sets it again before each step of the run."""
    if type(method) is CFG or isinstance(method, FunctionSLD) or not callable(getattr(method, "applied", None)):
        return None
    at = getattr(method, "at", None)
    parts = [method.sld, method.sega] if isinstance(method, SLDWithSEGA) else [method]
    warmups, concepts = set(), False  # δ of the terms that are on at some step; whether an SLD concept is
    for step in range(num_steps):
        if callable(at):
            at(step, num_steps, None if timesteps is None else timesteps[step])
        if method.applied(step):
            return None
        on = [c for m in parts for c in getattr(m, "current", ()) if c.enabled]  # SLD's concepts with s_S > 1 here
        concepts = concepts or bool(on)
        warmups |= {x.warmup_steps for x in [*on, *(e for m in parts for e in getattr(m, "edits", ()))]}
    if not getattr(method, "cfg_on", True):
        return (f"guidance scale s_g = {method.guidance_scale} <= 1 turns classifier-free guidance off, and with "
                f"it every safety and edit term: the images are plain SD's")
    if not warmups:
        return None  # no edit, and s_S ≤ 1 for every safety concept at every step
    if min(warmups) >= num_steps:
        return (f"the safety guidance never acts: its warm-up (δ = {', '.join(map(str, sorted(warmups)))}) is not "
                f"shorter than the run's {num_steps} sampling iterations, so the images are plain SD's")
    why = ["each edit is cooled down before its warm-up ends"] if any(getattr(m, "edits", ()) for m in parts) else []
    why += ["each safety concept has s_S ≤ 1 wherever it is past its warm-up"] if concepts else []
    return f"no safety or edit term acts at any step of this run ({'; '.join(why)})"
