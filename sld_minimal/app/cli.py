"""Command line: `sld-minimal generate|download|tiny|convert|demo|i2p|toy …` (also `python -m sld_minimal …`).

Every bad input ends in one line on stderr and a non-zero exit; `--debug` shows the traceback instead.
"""
import sys
import warnings
from pathlib import Path

from ..checks import MAX_IMAGES
from ..presets import PRESETS, SegaSafety, preset, safety_configs
from ..schedulers import SAMPLERS, describe as describe_samplers
from .common import (BF16_SPEEDUP, DEFAULT_WEIGHTS, EXIT_ERROR, EXIT_USAGE, REPO_ID, Parser, UsageError, check_limits, finite_float,
                     download, int_range, native_bf16, pick_device, pick_dtype, png_path, utf8_text, writable_folder)

def cmd_generate(a):
    """Validate everything the request depends on — flags, the output path, the model's config files (SD 1.4's,
    known without the files, where the default weights are still to be downloaded), the size against the model, the
    limits — and only then download the default weights where they are missing, read the weights and generate."""
    import torch

    from ..guidance import Edit
    from ..loading import read_configs
    from ..outputs import output_paths
    from ..pipeline import StableDiffusion, model_size
    from ..single_file import DEFAULTS as SD14_CONFIGS

    if a.safety == "off" and a.safety_concept is not None:
        raise UsageError("--safety-concept needs a safety preset (it has no effect with --safety off)")
    if a.eta and a.scheduler != "ddim":
        raise UsageError(f"--eta applies to --scheduler ddim only (got --scheduler {a.scheduler})")
    if a.image_index is not None and a.image_index >= a.num_images:
        raise UsageError(f"--image-index {a.image_index}: a batch of --num-images {a.num_images} has images "
                         f"0 to {a.num_images - 1}")
    # a preset by name takes the model's own safety concept (the paper's for SD 1.4); --safety-concept replaces it,
    # and repeated gives one config of the preset's values per concept (multi-concept SLD)
    try:
        safety = a.safety if a.safety_concept is None else safety_configs(a.safety, a.safety_concept)
    except ValueError as e:
        raise UsageError(f"--safety-concept: {e}") from None
    if (a.edit or a.edit_away) and any(isinstance(c, SegaSafety) for c in preset(a.safety)):
        raise UsageError(f"--edit/--edit-away cannot be combined with --safety {a.safety}: the SEGA safety preset is "
                         f"itself an edit and they would share one momentum; use an SLD preset with edits")
    edits = [Edit(c, reverse=rev, scale=a.edit_scale, threshold=a.edit_threshold, warmup_steps=a.edit_warmup)
             for rev, concepts in ((False, a.edit), (True, a.edit_away)) for c in concepts]
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    if a.vae_fp32 and dtype == torch.float32:
        raise UsageError("--vae-fp32 keeps the VAE in fp32 when --dtype is bf16 or fp16; here everything is fp32")
    out = png_path(a.out)
    n_out = 1 if a.image_index is not None else a.num_images
    if not a.overwrite:
        _refuse_existing(output_paths(out, n_out))
    if a.tokenizer is not None and not Path(a.tokenizer).is_dir():
        raise UsageError(f"--tokenizer {a.tokenizer}: no such folder")
    weights = Path(a.weights)
    fetch = not weights.exists() and weights == DEFAULT_WEIGHTS
    if fetch and a.ema:
        raise UsageError(f"--ema applies to a single .safetensors file; {weights} is SD 1.4's model folder")
    # every config file checked, no weight read yet; the default model's are SD 1.4's, known before its download,
    # so that the size and the limits are checked before any byte is fetched
    configs = SD14_CONFIGS if fetch else read_configs(weights)[0]
    factor = configs["vae"].factor
    default = model_size(configs["unet"], configs["vae"])  # the model's own size: 512 for SD 1.4
    height, width = a.height or default, a.width or default
    for flag, v in (("--height", height), ("--width", width)):
        if v % factor:
            raise UsageError(f"{flag} {v}: must be a multiple of {factor} (this model's VAE factor)")
    check_limits(width, height, a.num_images, a.no_limits)
    if fetch:
        writable_folder(weights.parent, "--weights")
        if not a.quiet:
            print(f"{weights} not found: downloading Stable Diffusion 1.4 there first.", file=sys.stderr)
        download(weights, fp16=str(dtype) == "torch.float16", quiet=a.quiet)  # the fp16 files only for fp16
        configs, _ = read_configs(weights)  # what came, checked
    if a.dtype == "auto" and device == "cpu" and not a.quiet and (feature := native_bf16()):
        print(f"note: this CPU computes bf16 natively ({feature}): --dtype bf16 is {BF16_SPEEDUP} faster "
              f"(fp32, the default, gives the reference's images)", file=sys.stderr)
    pipe = StableDiffusion.from_pretrained(weights, device=device, dtype=dtype, tokenizer=a.tokenizer, ema=a.ema,
                                           configs=configs, vae_dtype=torch.float32 if a.vae_fp32 else None)
    result = pipe(a.prompt, negative_prompt=a.negative_prompt, safety=safety, num_inference_steps=a.steps,
                  guidance_scale=a.guidance, height=height, width=width, num_images=a.num_images, seed=a.seed,
                  scheduler=a.scheduler, eta=a.eta, edits=edits, progress=not a.quiet, image_index=a.image_index)
    try:
        written = result.save(out, overwrite=a.overwrite)
    except FileExistsError:  # another process wrote one of the files meanwhile: it stays
        _refuse_existing(output_paths(out, n_out))
        raise
    for p in written:
        if not a.quiet:
            print(f"wrote {p}")
    if not a.quiet:
        print(f"seed {result.seed}")


def _refuse_existing(paths):
    """The usage error for output files that exist (without --overwrite), naming the first."""
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise UsageError(f"{existing[0]} already exists; choose another --out or pass --overwrite")


def cmd_download(a):
    download(Path(a.to), fp16=a.fp16)
    print(f"SD 1.4 is in {a.to}")


def cmd_tiny(a):
    from ..files import check_replaceable
    from ..testing.tiny import WRITTEN, write_checkpoint

    if a.overwrite:
        try:
            check_replaceable(a.dir, WRITTEN, "model_index.json")
        except ValueError as e:
            raise UsageError(str(e)) from None
    folder = write_checkpoint(a.dir, a.config, overwrite=a.overwrite)
    print(f"wrote a random SD 1.x checkpoint ({a.config}) in the published layout to {folder}")


def cmd_convert(a):
    from ..single_file import convert

    print(f"wrote {convert(a.src, a.dst, ema=a.ema, tokenizer=a.tokenizer)}")


def cmd_demo(a):
    try:
        from .demo_page import serve  # imports gradio
    except ModuleNotFoundError as e:
        if e.name not in ("gradio", "matplotlib"):
            raise
        raise UsageError(f'the demo needs {e.name}: pip install -e ".[demo]"') from None
    serve(a.weights, a.host, a.port, a.device, a.dtype, a.max_steps, a.no_limits)


def build_parser() -> Parser:
    p = Parser(prog="sld-minimal", description="Safe Latent Diffusion on Stable Diffusion 1.4")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate images")
    g.add_argument("prompt", type=utf8_text)
    g.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                   help="SD 1.x folder (downloaded if it is the default and missing), single .safetensors file, or "
                        "`toy`: the toy model shipped with the package")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (vocab.json, merges.txt) to use instead")
    g.add_argument("--ema", action="store_true", help="a single file's EMA UNet weights (model_ema.*)")
    g.add_argument("--out", default="image.png", help="PNG path; with several images: stem-0.png, stem-1.png, …")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--safety", default="medium", type=str.lower, choices=list(PRESETS),  # the registry
                   help="a preset (sld_minimal/presets.py): off, SLD's, or SEGA as the safety method (sega-*)")
    g.add_argument("--safety-concept", type=utf8_text, action="append",
                   help="text of the concept SLD steers away from (default: the model's own, else the paper's); "
                        "several concepts, each with the preset's values (repeatable)")
    g.add_argument("--negative-prompt", type=utf8_text)
    g.add_argument("--steps", type=int_range(1, 999), default=50)
    g.add_argument("--guidance", type=finite_float(0), default=7.5, help="classifier-free guidance scale s_g")
    g.add_argument("--seed", type=int_range(0, 2**64 - 1), help="default: a random one, printed")
    g.add_argument("--height", type=int_range(8), help="default: the model's (512 for SD 1.4)")
    g.add_argument("--width", type=int_range(8), help="default: the model's (512 for SD 1.4)")
    g.add_argument("--num-images", type=int_range(1), default=1, help="images from one seed (one noise draw)")
    g.add_argument("--image-index", type=int_range(0), metavar="K",
                   help="write only image K of the --num-images batch (as its PNG's 'Image: K of N' says)")
    g.add_argument("--no-limits", action="store_true",
                   help=f"allow more than 2048x2048 pixels or {MAX_IMAGES} images")
    g.add_argument("--scheduler", default="pndm", choices=list(SAMPLERS), help=describe_samplers())
    g.add_argument("--eta", type=finite_float(0), default=0.0, help="DDIM's η (0 = deterministic)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp32 on the CPU, fp16 on a GPU")
    g.add_argument("--vae-fp32", action="store_true", help="with --dtype bf16/fp16: run the VAE decoder in fp32")
    g.add_argument("--edit", action="append", default=[], type=utf8_text, metavar="CONCEPT",
                   help="SEGA: steer toward (repeatable)")
    g.add_argument("--edit-away", action="append", default=[], type=utf8_text, metavar="CONCEPT",
                   help="SEGA: steer away (repeatable)")
    g.add_argument("--edit-scale", type=finite_float(0), default=5.0)
    g.add_argument("--edit-threshold", type=finite_float(0, 1), default=0.9)
    g.add_argument("--edit-warmup", type=int_range(0), default=10)
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    g.set_defaults(run=cmd_generate)

    d = sub.add_parser("download", help=f"download {REPO_ID} (safetensors only)")
    d.add_argument("--to", default=str(DEFAULT_WEIGHTS))
    d.add_argument("--fp16", action="store_true", help="the fp16 files (about 2 GB instead of 4)")
    d.add_argument("--debug", action="store_true", help="show tracebacks")
    d.set_defaults(run=cmd_download)

    t = sub.add_parser("tiny", help="write a random checkpoint in the published layout (tests, demos, benchmarks)")
    t.add_argument("dir")
    t.add_argument("--config", default="tiny", choices=["tiny", "small", "sd14"])
    t.add_argument("--overwrite", action="store_true", help="replace DIR if it is a checkpoint folder `tiny` wrote")
    t.add_argument("--debug", action="store_true", help="show tracebacks")
    t.set_defaults(run=cmd_tiny)

    c = sub.add_parser("convert", help="model folder -> one .safetensors file (CompVis layout) or back; no overwriting")
    c.add_argument("src", help="SD 1.x model folder or single .safetensors file")
    c.add_argument("dst", help="the other layout: a new .safetensors file, or a new folder")
    c.add_argument("--ema", action="store_true", help="file -> folder: write the file's EMA UNet (model_ema.*)")
    c.add_argument("--tokenizer", metavar="DIR", help="file -> folder: copy this tokenizer folder (default: CLIP's)")
    c.add_argument("--debug", action="store_true", help="show tracebacks")
    c.set_defaults(run=cmd_convert)

    from .demo import MAX_STEPS
    m = sub.add_parser("demo", help="a local web page comparing SD and SLD side by side (pip install -e \".[demo]\")")
    m.add_argument("--weights", help=f"SD 1.x folder, .safetensors file or `toy` (default: {DEFAULT_WEIGHTS}, "
                                     f"downloaded if missing)")
    m.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; another makes the page reachable from the "
                        "network)")
    m.add_argument("--port", type=int_range(1, 65535), default=7860)
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    m.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    m.add_argument("--max-steps", type=int_range(1, 999), default=MAX_STEPS,
                   help="the page's limit on sampling steps (<= 999)")
    m.add_argument("--no-limits", action="store_true", help="lift the page's limit on image size (2048x2048 pixels)")
    m.add_argument("--debug", action="store_true", help="show tracebacks")
    m.set_defaults(run=cmd_demo)

    from . import i2p  # the I2P benchmark's generate/classify/report (sld_minimal/app/i2p/)
    i2p.add_parser(sub)
    from .toy import commands as toy  # the toy world: train, table (sld_minimal/app/toy/)
    toy.add_parser(sub)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    """A library warning as the command line prints it: one line, without the source line it came from."""
    return f"sld-minimal: warning: {' '.join(str(message).split())}\n"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Print a warning on a line of its own, above a progress bar that is being drawn (tqdm.write clears it and
    draws it again below)."""
    from tqdm import tqdm

    tqdm.write(_one_line_warning(message, category, filename, lineno).rstrip("\n"), file=file or sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    formatwarning, showwarning = warnings.formatwarning, warnings.showwarning
    if not debug:
        warnings.formatwarning, warnings.showwarning = _one_line_warning, _show_warning
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            if getattr(args, "quiet", False):  # nothing but errors: no warnings, no progress, no notes
                import transformers

                warnings.simplefilter("ignore")
                transformers.logging.set_verbosity_error()
            args.run(args)
        return 0
    except UsageError as e:
        if debug:
            raise
        print(f"sld-minimal: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sld-minimal: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — every failure becomes one line unless --debug
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"sld-minimal: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        warnings.formatwarning, warnings.showwarning = formatwarning, showwarning


if __name__ == "__main__":
    sys.exit(main())
