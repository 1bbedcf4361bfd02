"""The preset registry: one name for one safety configuration, read by `pipe(safety="strong")`, both command lines'
`--safety`, the demo's list and `i2p generate`; and `build`, the one way from a name or configs to a guidance method.

    PRESETS["off"]          ()                                   plain SD (classifier-free guidance only)
    PRESETS["strong"]       (SafetyConfig(2000, 7, 0.025, 0.5, 0.7),)   SLD: the authors' four (`guidance.PRESETS`)
    PRESETS["sega-strong"]  (SegaSafety(7, 5, 0.85, 0.5),)       SEGA as the safety method, as the authors' harness

`register(name, *configs)` adds one (several SafetyConfigs: one SLD concept each). A config read from the registry
carries its name (`config.name`), and that name is what an image's settings record: a config made by hand or changed
with `dataclasses.replace` records "custom", whatever its numbers. The settings of a caller's own method object are
`method_settings`: its class, module, `describe()` and `settings()`, and the configuration of the built-in method it
extends, all read before sampling.
"""
import dataclasses
import json
from dataclasses import dataclass

from .guidance import DEFAULT_CONCEPT, PRESETS as SLD_PRESETS, Edit, SafetyConfig
from .methods import CFG, SEGA, SLD, FunctionSLD, SLDWithSEGA

CUSTOM = "custom"  # the name of a config that did not come from the registry


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
    preset: str = CUSTOM            # the registry name it came from, for settings and messages

    enabled = True  # (as SafetyConfig.enabled: a SEGA safety config always acts)

    def __post_init__(self):
        edit = self.edit()  # Edit's own checks of s_e, λ, δ and the concept, with its messages
        for name in ("scale", "threshold", "warmup_steps"):  # frozen: normalised types through object.__setattr__
            object.__setattr__(self, name, getattr(edit, name))
        for name in ("momentum_scale", "momentum_beta"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if not 0 <= self.momentum_beta <= 1:
            raise ValueError(f"SegaSafety.momentum_beta (β_m) must be in [0, 1], got {self.momentum_beta}")

    @property
    def name(self) -> str:
        """The preset's name, as `SafetyConfig.name`."""
        return self.preset

    def named(self, name: str) -> "SegaSafety":
        return dataclasses.replace(self, preset=name)

    def edit(self) -> Edit:
        """The reversed SEGA edit away from the safety concept."""
        return Edit(self.concept, scale=self.scale, threshold=self.threshold, warmup_steps=self.warmup_steps,
                    reverse=True)

    def method(self, guidance_scale: float = 7.5) -> SEGA:
        """SEGA with the reversed edit and this config's momentum: what `build` and the presets run."""
        return SEGA([self.edit()], guidance_scale, self.momentum_scale, self.momentum_beta)

    def values(self) -> dict:
        """The five numbers by SafetyConfig's field names, and "method": "sega" (for settings and run.json)."""
        return {"method": "sega", "scale": self.scale, "warmup_steps": self.warmup_steps,
                "threshold": self.threshold, "momentum_scale": self.momentum_scale,
                "momentum_beta": self.momentum_beta}


SAFETY_KINDS = (SafetyConfig, SegaSafety)

# The registry: name -> its configs (none: off). The command lines' --safety choices, the demo's list and every
# lookup read it; the names that settings record come from it.
PRESETS: dict[str, tuple] = {}


def _check_kinds(configs, what):
    if not all(isinstance(c, SAFETY_KINDS) for c in configs):
        raise TypeError(f"{what} must be a preset name, a SafetyConfig, a list of them or None, not {configs!r}")
    if sum(isinstance(c, SegaSafety) for c in configs) > 1:
        raise ValueError("safety takes one SEGA safety config at most (its edit has the one SEGA momentum)")


def register(name: str, *configs):
    """Add the preset `name` (lower case, not yet taken, not "custom"): its SafetyConfigs (one SLD concept each),
    or one SegaSafety; none is plain SD. `pipe(safety=name)` runs it and the command lines offer it from then on."""
    if not isinstance(name, str) or not name or name != name.strip().lower() or name in PRESETS or name == CUSTOM:
        raise ValueError(f"a preset name is lower case, not 'custom' and not yet taken ({', '.join(PRESETS)}); "
                         f"got {name!r}")
    _check_kinds(configs, f"preset {name!r}")
    PRESETS[name] = tuple(configs)


register("off")
for _name, _config in SLD_PRESETS.items():
    register(_name, _config)
# SEGA as safety, name -> SegaSafety(s_e, δ, λ, s_m); β_m 0.4 and s_g 7.5 (the pipeline's default) as in the harness
for _name, _values in (("sega-medium", (4, 10, 0.9, 0.3)), ("sega-strong", (7, 5, 0.85, 0.5)),
                       ("sega-max", (10, 0, 0.75, 0.5))):
    register(_name, SegaSafety(*_values, preset=_name))
SEGA_SAFETY_PRESETS = {name: PRESETS[name][0] for name in ("sega-medium", "sega-strong", "sega-max")}  # built in


def preset(name: str) -> list:
    """The configs of the named preset (any case), each carrying the name; [] for "off"."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in PRESETS:
        raise ValueError(f"unknown safety preset {name!r}; choose one of {', '.join(PRESETS)}")
    return [c.named(key) for c in PRESETS[key]]


def safety_configs(safety, concept_text=None) -> list:
    """The configs that `safety=` names: None → [], a preset name → its configs (`preset`), a SafetyConfig/SegaSafety
    or a list of them as given (disabled ones included: `SLD` drops those). `concept_text` (a text, or a list of
    texts: one config per text, several concepts) replaces each config's concept, keeping its name (the CLIs'
    --safety-concept, repeatable)."""
    if isinstance(safety, str):
        configs = preset(safety)
    else:
        configs = [] if safety is None else list(safety) if isinstance(safety, (list, tuple)) else [safety]
    _check_kinds(configs, "safety")
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


def _with_concept(config, text):
    return dataclasses.replace(config, concept=text).named(config.name)  # the same preset, another concept


def build(safety=None, edits=(), guidance_scale=7.5, edit_momentum_scale=0.1, edit_momentum_beta=0.4):
    """The method for the pipeline's `safety=` (see `safety_configs`) and `edits=` (SEGA Edits). A SEGA safety
    config is SEGA with its reversed edit; together with `edits` it is refused (they would share one momentum)."""
    configs = safety_configs(safety)
    sega_safety = [c for c in configs if isinstance(c, SegaSafety)]
    # s_S ≤ 1 turns a config off (`SafetyConfig.enabled`): a preset's SLD holds the configs that act
    sld = SLD([c for c in configs if isinstance(c, SafetyConfig) and c.enabled], guidance_scale)
    if sega_safety:
        if edits:
            raise ValueError(f"the SEGA safety preset {sega_safety[0].name!r} cannot be combined with edits: "
                             f"they would share one SEGA momentum; use an SLD preset with edits")
        sega = sega_safety[0].method(guidance_scale)
    elif edits:
        sega = SEGA(edits, guidance_scale, edit_momentum_scale, edit_momentum_beta)
    else:
        return sld if sld.safety else CFG(guidance_scale)
    return SLDWithSEGA(sld, sega) if sld.safety else sega


# ----------------------------------------------------------------------------- what settings record

def record(configs=(), edits=(), edit_momentum=None) -> dict:
    """The settings' record of safety configs (each with the name it carries) and SEGA edits with SEGA's momentum
    (s_m, β_m), where there are edits."""
    return {"safety": [{"preset": c.name, **c.values(), "concept": c.concept} for c in configs],
            "edits": [dataclasses.asdict(e) for e in edits],
            "edit_momentum": None if not edits else dict(zip(("momentum_scale", "momentum_beta"), edit_momentum))}


def configuration(method) -> tuple:
    """(safety configs, edits, SEGA's (s_m, β_m)) that a built-in method, or a subclass of one, holds now: read
    before sampling, the configuration its run starts from. A method of another kind holds none we can read."""
    if isinstance(method, SLDWithSEGA):
        return configuration(method.sld)[0], *configuration(method.sega)[1:]
    if isinstance(method, SLD):
        return list(method.safety), [], None
    if isinstance(method, SEGA):
        return [], list(method.edits), (method.momentum_scale, method.momentum_beta)
    return [], [], None


def method_settings(method) -> dict:
    """What the settings record of a caller's method object, read before sampling: its guidance scale, its class and
    module, its `describe()` and its `settings()` where it offers them (settings: a JSON-able dict, recorded as is;
    for the deprecated function method, the function's name), and the safety configs and edits of the built-in
    method it is or extends."""
    cls = type(method)
    description = method.describe() if callable(getattr(method, "describe", None)) else None
    settings = method.settings() if callable(getattr(method, "settings", None)) else None
    if settings is None and isinstance(method, FunctionSLD):
        fn = method.fn
        settings = {"function": f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', repr(fn))}"}
    if settings is not None:
        try:
            settings = json.loads(json.dumps(settings)) if isinstance(settings, dict) else None
        except (TypeError, ValueError):
            settings = None
        if settings is None:
            raise TypeError(f"{cls.__qualname__}.settings() must return a dict of JSON values (what the PNG and "
                            f"run.json record)")
    return {"guidance_scale": getattr(method, "guidance_scale", None),
            "method": {"class": cls.__qualname__, "module": cls.__module__, "description": description,
                       "settings": settings},
            **record(*configuration(method))}
