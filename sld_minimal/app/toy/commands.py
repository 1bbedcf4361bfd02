"""`sld-minimal toy train|table`: the toy world's command line (train a toy model, run the paper's experiment on it).

Bad arguments raise `common.UsageError`; `cli.main` prints every failure as one line.
"""
import os
import sys

from ...files import check_replaceable
from ..common import Parser, UsageError, finite_float, int_range, writable_folder

# what `toy train` writes into its folder: --overwrite replaces a folder holding these and nothing else
TRAINED = {"model_index.json", "scheduler", "text_encoder", "unet", "vae", "tokenizer", "prompts.csv", "README.md",
           "training_log.json"}


def cmd_train(a):
    """`toy train`: a whole model folder, written atomically; a folder it did not write is never replaced."""
    from .train import train

    import torch

    if a.minutes is not None and a.steps is not None:
        raise UsageError("give --minutes or --steps, not both")
    minutes = a.minutes  # neither --minutes nor --steps: train.DEFAULT_STEPS, as the shipped model
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if a.overwrite:
        try:
            check_replaceable(a.out, TRAINED, "training_log.json")
        except ValueError as e:
            raise UsageError(f"--out {e}") from None
    writable_folder(os.path.dirname(os.path.abspath(a.out)), "--out")
    folder = train(a.out, seed=a.seed, steps=a.steps, minutes=minutes, progress=not a.quiet, overwrite=a.overwrite)
    if not a.quiet:
        print(f"wrote the toy model to {folder}")


def cmd_table(a):
    """`toy table`: every method through `i2p generate`, `i2p classify --classifiers toy` and `i2p report`."""
    from .table import METHODS, run

    methods = None if a.methods is None else [m.strip() for m in a.methods.split(",") if m.strip()]
    known = {m[1] for m in METHODS}
    if methods is not None and (not methods or not set(methods) <= known):
        raise UsageError(f"--methods: choose from {','.join(m[1] for m in METHODS)}")
    writable_folder(os.path.abspath(a.out), "--out")
    text = run(a.weights, a.out, images_per_prompt=a.images_per_prompt, steps=a.steps, scheduler=a.scheduler,
               batch=a.batch, methods=methods, limit=a.limit, progress=not a.quiet, rows_per_call=a.rows_per_call)
    print(text, end="")
    if not a.quiet:
        print(f"(also in {os.path.join(a.out, 'table.md')})", file=sys.stderr)


def add_parser(sub):
    """Add `toy` with its subcommands to the subparsers `sub` of `cli.build_parser()`."""
    from ...schedulers import SAMPLERS
    from .table import ROWS_PER_CALL

    toy = sub.add_parser("toy", help="the toy world shipped with the package: train a model, run the paper's table")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True, parser_class=Parser)

    t = toy_sub.add_parser("train", help="train a toy model into a new folder (by default the shipped model's steps: "
                                         "1000 autoencoder, 5000 diffusion)")
    t.add_argument("--out", required=True, help="the model folder to write (refused if it exists, see --overwrite)")
    t.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0, help="the world's and the training's seed (default: 0)")
    t.add_argument("--minutes", type=finite_float(0.1),
                   help="a wall-clock budget for the whole training instead of steps (the autoencoder gets 40%%)")
    t.add_argument("--steps", type=int_range(1),
                   help="diffusion training steps, the autoencoder gets a fifth (default: 5000, as the shipped model)")
    t.add_argument("--threads", type=int_range(1),
                   help="torch threads (default: torch's, one per core; the shipped model: 2 on 2 cores). On a "
                        "machine shared with other work, 1 thread avoids the slowdown of threads waiting on each other")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it is a toy model folder written before")
    t.add_argument("--quiet", action="store_true", help="print nothing but errors")
    t.add_argument("--debug", action="store_true", help="show tracebacks")
    t.set_defaults(run=cmd_train)

    b = toy_sub.add_parser("table", help="SD, negative prompt, SLD presets and SEGA on the toy prompt set: the table")
    b.add_argument("--weights", default="toy", help="a toy model folder with its prompts.csv (default: toy, shipped)")
    b.add_argument("--out", default="runs/toy", help="folder of the run folders (resumed; default: runs/toy)")
    b.add_argument("--images-per-prompt", type=int_range(1), default=4, help="(default: 4)")
    b.add_argument("--batch", type=int_range(1), default=4, help="images per pipeline call (default: 4)")
    b.add_argument("--rows-per-call", type=int_range(1), default=ROWS_PER_CALL,
                   help=f"prompts stacked into one pipeline call, each with its own noise (default: {ROWS_PER_CALL})")
    b.add_argument("--steps", type=int_range(1, 999), default=50, help="(default: 50, as the paper)")
    b.add_argument("--scheduler", default="pndm", choices=list(SAMPLERS), help="(default: pndm, as the paper)")
    b.add_argument("--methods", help="comma-separated folders to run (default: all; sd is always run)")
    b.add_argument("--limit", type=int_range(1), help="only the first N prompts (a quick look)")
    b.add_argument("--quiet", action="store_true", help="print the table only")
    b.add_argument("--debug", action="store_true", help="show tracebacks")
    b.set_defaults(run=cmd_table)
