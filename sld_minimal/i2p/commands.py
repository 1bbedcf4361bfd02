"""`sld-minimal i2p generate|classify|report`: the command line of the I2P benchmark (see the package docstring).

Bad arguments raise `cli_common.UsageError`; every other failure raises an exception with a one-line message, and
`cli.main` prints either as one line.
"""
import os
import sys

from ..cli_common import DEFAULT_WEIGHTS, Parser, UsageError, pick_device, pick_dtype
from ..methods import PRESETS, safety_configs
from ..schedulers import SAMPLERS

CLASSIFIER_CHOICES = ("q16", "nudenet")


def _positive(name, value):
    if value is not None and value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")


def _device(name: str) -> str:
    """--device: auto|cpu|cuda|mps|cuda:N; under torchrun (LOCAL_RANK set) plain cuda means cuda:LOCAL_RANK."""
    if name.startswith("cuda:"):
        pick_device("cuda")  # raises UsageError where there is no CUDA
        return name
    if name not in ("auto", "cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: choose auto, cpu, cuda, cuda:N or mps")
    device = pick_device(name)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def cmd_generate(a):
    from ..pipeline import StableDiffusion
    from .run import generate, parse_shard, read_csv, select_rows

    # --safety has no default: a benchmark run should say which column of the paper it is
    if a.negative_prompt_baseline and a.safety not in (None, "off"):
        raise UsageError("--negative-prompt-baseline is plain SD with the safety concept as negative prompt: "
                         "it needs --safety off (or no --safety)")
    if a.safety is None and not a.negative_prompt_baseline:
        raise UsageError("choose --safety off|weak|medium|strong|max, or --negative-prompt-baseline")
    if a.safety_concept is not None and a.safety in (None, "off") and not a.negative_prompt_baseline:
        raise UsageError("--safety-concept needs a safety preset or --negative-prompt-baseline")
    for name in ("images_per_prompt", "batch", "limit", "steps"):
        _positive("--" + name.replace("_", "-"), getattr(a, name))
    try:
        shard = parse_shard(a.shard)
    except ValueError as e:
        raise UsageError(f"--shard: {e}") from None
    safety = safety_configs(a.safety, a.safety_concept)

    rows = read_csv(a.prompts, row_guidance=a.use_row_guidance)  # bad rows: one warning each, skipped
    categories = [c for c in (a.categories or "").split(",") if c.strip()]
    try:
        mine = select_rows(rows, categories, a.limit, shard)
    except ValueError as e:
        raise UsageError(f"--categories: {e}") from None
    device = _device(a.device)  # under torchrun: this rank's GPU
    pipe = StableDiffusion.from_pretrained(a.weights, device=device, dtype=pick_dtype(a.dtype, device))
    counts = generate(pipe, mine, a.out, safety=safety, negative_prompt_baseline=a.negative_prompt_baseline,
                      images_per_prompt=a.images_per_prompt, batch=a.batch, steps=a.steps,
                      guidance_scale="row" if a.use_row_guidance else a.guidance, height=a.height, width=a.width,
                      scheduler=a.scheduler, concept=a.safety_concept, progress=not a.quiet)
    if not a.quiet:
        where = f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else ""
        print(f"{a.out}: {len(mine)} prompts{where}; {counts['made']} images made, {counts['found']} were there")


def cmd_classify(a):
    from .classify import classify

    chosen = [c.strip().lower() for c in a.classifiers.split(",") if c.strip()]
    bad = [c for c in chosen if c not in CLASSIFIER_CHOICES]
    if bad or not chosen:
        raise UsageError(f"--classifiers: unknown {', '.join(bad) or '(none)'}; choose from q16,nudenet")
    _positive("--batch", a.batch)
    counts = classify(a.folder, chosen, clip=a.clip, q16_prompts=a.q16_prompts, device=_device(a.device),
                      batch=a.batch, progress=not a.quiet)
    if not a.quiet:
        print(f"{a.folder}: {counts['labelled']} images labelled, {counts['found']} were labelled before")


def cmd_report(a):
    from .report import report

    _positive("--subsets", a.subsets)
    _positive("--subset-size", a.subset_size)
    sys.stdout.write(report(a.runs, a.format, a.subset_size, a.subsets, a.seed))


def add_parser(sub):  # called by cli.build_parser()
    """Add `i2p` with its three subcommands to the subparsers `sub` of `cli.build_parser()`."""
    i2p = sub.add_parser("i2p", help="the I2P benchmark: generate, classify, report")
    i2p_sub = i2p.add_subparsers(dest="i2p_command", required=True, parser_class=Parser)

    g = i2p_sub.add_parser("generate", help="make the images of I2P's prompts into a run folder (resumable)")
    g.add_argument("--prompts", required=True, help="the I2P CSV (hub dataset AIML-TUDA/i2p)")
    g.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="SD 1.x folder")
    g.add_argument("--out", required=True, help="run folder (created; an existing one is continued)")
    g.add_argument("--safety", type=str.lower, choices=list(PRESETS))
    g.add_argument("--safety-concept", help="the concept SLD steers away from (default: the paper's)")
    g.add_argument("--negative-prompt-baseline", action="store_true",
                   help="plain SD with the safety concept as negative prompt (the paper's 'Neg. prompt')")
    g.add_argument("--images-per-prompt", type=int, default=10)
    g.add_argument("--batch", type=int, default=5, help="images per pipeline call (defines the noise stream)")
    g.add_argument("--categories", help="only rows of these categories, e.g. sexual,hate")
    g.add_argument("--limit", type=int, help="only the first N rows (after --categories)")
    g.add_argument("--shard", help="i/n: the rows with id %% n == i (default: torchrun's RANK/WORLD_SIZE)")
    g.add_argument("--use-row-guidance", action="store_true", help="each row's sd_guidance_scale, not --guidance")
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--scheduler", default="pndm", choices=list(SAMPLERS),
                   help="deterministic samplers only (a resumed run must make the same images); DDIM runs with η = 0")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(run=cmd_generate)

    c = i2p_sub.add_parser("classify", help="label a run folder's images with Q16 and NudeNet (resumable)")
    c.add_argument("folder", metavar="RUN", help="run folder of `i2p generate`")
    c.add_argument("--classifiers", default="q16,nudenet")
    c.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP folder or hub id for Q16")
    c.add_argument("--q16-prompts", help="Q16's prompts.p (default: Q16's ViT-L/14 file, downloaded once)")
    c.add_argument("--device", default="auto", help="for Q16: auto, cpu, cuda, cuda:N or mps")
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(run=cmd_classify)

    r = i2p_sub.add_parser("report", help="the paper's table for one or more classified run folders")
    r.add_argument("runs", nargs="+", help="run folders; one column each, named by folder")
    r.add_argument("--format", default="markdown", choices=["markdown", "csv"])
    r.add_argument("--subsets", type=int, default=10_000, help="random prompt subsets for the expected maximum")
    r.add_argument("--subset-size", type=int, default=25)
    r.add_argument("--seed", type=int, default=0, help="seed of the subset draws")
    for p in (i2p, g, c, r):
        p.add_argument("--debug", action="store_true", help="show tracebacks")
    r.set_defaults(run=cmd_report)
    return i2p
