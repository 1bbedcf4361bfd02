"""What the command lines share (`cli.py`, `i2p/commands.py`, `toy/commands.py`, the demo): the one-line usage
error and exit codes, SD 1.4's download, device/dtype choice, argument types and output paths.

A bad command line raises `UsageError`; `cli.main` prints it as one line and exits with status 2.
"""
import argparse
import math
import os
import sys
import tempfile
import textwrap
from pathlib import Path

from .. import checks
from ..outputs import png_file

DEFAULT_WEIGHTS = Path("weights/stable-diffusion-v1-4")
REPO_ID = "CompVis/stable-diffusion-v1-4"
EXIT_USAGE, EXIT_ERROR = 2, 1


def download_files(fp16: bool) -> list:
    """What `download` takes from the hub: the configs, the tokenizer and the three models' weights — never the
    safety checker, pickles or EMA/non-EMA extras."""
    suffix = ".fp16.safetensors" if fp16 else ".safetensors"
    files = ["model_index.json", "scheduler/*", "tokenizer/*"]
    for component, stem in (("text_encoder", "model"), ("unet", "diffusion_pytorch_model"),
                            ("vae", "diffusion_pytorch_model")):
        files += [f"{component}/config.json", f"{component}/{stem}{suffix}"]
    return files


def download(to: Path, fp16: bool = False, quiet: bool = False) -> Path:
    """SD 1.4 from the hub into `to` (resumable; HF_TOKEN is honoured). ~4 GB in fp32, ~2 GB in fp16."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    if not quiet:
        print(f"Downloading {REPO_ID} ({'about 2 GB, fp16' if fp16 else 'about 4 GB'}) to {to}. Its licence "
              f"(CreativeML OpenRAIL-M) must first be accepted at https://huggingface.co/{REPO_ID} "
              f"with the account whose token is in HF_TOKEN.", file=sys.stderr)
    try:
        snapshot_download(REPO_ID, local_dir=str(to), allow_patterns=download_files(fp16),
                          token=os.environ.get("HF_TOKEN") or None)
    except GatedRepoError:
        raise RuntimeError(f"the hub refused the download: accept the licence at https://huggingface.co/{REPO_ID} "
                           f"and set HF_TOKEN to a token of that account, then run `sld-minimal download` again") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"could not download {REPO_ID} ({first}); check the network connection (or HF_TOKEN) "
                           f"and run `sld-minimal download --to {to}` again — it resumes") from None
    return to



class UsageError(Exception):
    """A bad command line, reported as one line."""


def _once(base):
    """`base` (an argparse store action) that refuses to be given twice: argparse would keep the last value."""
    class Once(base):
        def __call__(self, parser, namespace, values, option_string=None):
            given = getattr(parser, "_given", {})
            if self.option_strings and self.dest in given:
                raise argparse.ArgumentError(self, f"given twice ({given[self.dest]!r}, then {values!r}); only one "
                                                   f"value is taken")
            given[self.dest] = values
            super().__call__(parser, namespace, values, option_string)
    Once.__name__ = f"Once{base.__name__}"
    return Once


def shown_default(value) -> bool:
    """Whether --help names a flag's default: not for None, an off switch or an empty list (a repeatable flag)."""
    return value not in (None, False, argparse.SUPPRESS) and value != []


class HelpWithDefaults(argparse.HelpFormatter):
    """`--help` shows every flag's default: "(default: X)" is added where a flag has one (not None, not an off
    switch) and its help does not already say "default: …". Lines break at spaces only, so a hub id or a path
    (openai/clip-vit-large-patch14) stays whole."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and shown_default(action.default) and text is not argparse.SUPPRESS
                and "default:" not in text):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse's parser with one-line errors (`UsageError`), where a flag that takes one value may be given once:
    `--seed 1 --seed 2` is an error, not seed 2. Flags meant to repeat use `action="append"` and say "(repeatable)"
    in their help; a switch (`--quiet`) given twice means what it means once."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)
        for name in (None, "store"):
            self.register("action", name, _once(argparse._StoreAction))

    def add_argument(self, *args, **kwargs):
        if kwargs.get("help") is None and shown_default(kwargs.get("default")):
            kwargs["help"] = "(default: %(default)s)"  # argparse prints no help line, so no default, without one
        return super().add_argument(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._given = {}  # dest -> value, per parse (a subcommand is parsed by its own parser)
        try:
            return super().parse_known_args(args, namespace)
        finally:
            del self._given

    def error(self, message):  # argparse prints usage + message over two lines; one line is enough
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def pick_device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise UsageError(f"--device {name}: no such device on this machine (try --device cpu)")
    return name


def pick_dtype(name: str, device: str):
    import torch

    if name == "auto":
        name = "fp32" if device == "cpu" else "fp16"
    if name == "fp16" and str(device).split(":")[0] == "cpu":  # refused before any weights are read
        raise UsageError("fp16 is not accelerated on the CPU: use --dtype bf16 or fp32")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_limits(width: int, height: int, num_images: int, no_limits: bool = False, unit: str = "--no-limits"):
    """`checks.check_limits` as a usage error that says how to lift the limit, unless `no_limits`."""
    if no_limits:
        return
    try:
        checks.check_limits(width, height, num_images)
    except ValueError as e:
        raise UsageError(f"{e}; pass {unit} to try anyway") from None


def int_range(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]; argparse names the flag in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}" if high is not None
                                             else f"must be >= {low}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def finite_float(low: float | None = None, high: float | None = None):
    """An argparse type: a finite number in [low, high] (NaN and infinity refused)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"from {low} to {high}" if low is not None and high is not None else (
                f">= {low}" if low is not None else f"<= {high}")
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value:g}")
        return value
    parse.__name__ = "number"
    return parse


def utf8_text(value: str) -> str:
    """An argparse type: text that is valid UTF-8. The shell hands bytes of another encoding over as lone surrogates
    (U+DC80 … U+DCFF), which no tokenizer or PNG text chunk can take: refused here, naming the byte."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        what = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise argparse.ArgumentTypeError(f"not valid UTF-8 ({what} at character {e.start + 1}); give the text in "
                                         f"UTF-8") from None
    return value


utf8_text.__name__ = "text"


def png_path(text: str, flag: str = "--out") -> Path:
    """An output image path checked before any work (`outputs.png_file`'s rules: `.png` added to a name without a
    suffix; another suffix, a folder or an empty name refused), in a folder that can be written."""
    try:
        path = png_file(text)
    except ValueError as e:
        raise UsageError(f"{flag} {e}") from None
    writable_folder(path.parent, flag)
    return path


def writable_folder(folder: Path, flag: str):
    """UsageError unless `folder` is a writable folder, or could be created (its nearest existing parent is)."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag}: {existing} is a file, not a folder")
    try:  # a real write: permission bits do not stop root, but a read-only file system does
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"{flag}: cannot write in the folder {existing} ({e.strerror or e})") from None


# `generate --dtype auto` on such a CPU: fp32 (images equal the reference's), with a one-line hint. The factor is
# measured with tests/benchmarks/bench.py on an AMD EPYC with avx512_bf16 (docs/performance.md, "fp32 and bf16 on
# the CPU": ours in bf16 took 0.49× the fp32 time at 256 px, 0.54× at 512 px).
BF16_SPEEDUP = "about 2×"


def native_bf16() -> str | None:
    """The CPU feature that computes bf16 natively (`amx_bf16` or `avx512_bf16`, from /proc/cpuinfo), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((name for name in ("amx_bf16", "avx512_bf16") if name in flags), None)
