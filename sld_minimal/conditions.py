"""The names of the text conditions a guidance method asks the UNet for, shared by the methods and the loop.

`UNCOND` is the negative prompt ("" by default: ε_∅), `PROMPT` the prompt (ε_p), and `concept(text)` any other text
evaluated for every image (ε_S for a safety concept, ε_c for a SEGA edit). The sampling loop batches exactly the
conditions a method names and hands the estimates back by name (`sampling.sample`).
"""
UNCOND, PROMPT = "uncond", "prompt"


def concept(text: str) -> str:
    """The condition name of a concept text, e.g. "concept:nudity"."""
    return f"concept:{text}"


def concept_text(name: str) -> str:
    """The text of a condition named by `concept`."""
    if not name.startswith("concept:"):
        raise ValueError(f"unknown condition {name!r}: expected conditions.UNCOND, conditions.PROMPT or "
                         f"conditions.concept(…)")
    return name.removeprefix("concept:")
