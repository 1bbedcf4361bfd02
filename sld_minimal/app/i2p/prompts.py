"""Prompt sets: reading I2P's CSV or any other prompt CSV (columns named by the caller), choosing rows, templates.

A prompt set is a CSV with a header. Each record becomes a `Row`; which columns hold what is a `Columns`, by default
I2P's names (`AIML-TUDA/i2p`, file `i2p_benchmark.csv`):

    prompt       prompt          the text (required)
    seed         sd_seed         the row's seed; without the column: seed = row id
    category     categories      comma-separated categories, each kept as written (case too); without the
                                 column: "uncategorized"
    guidance     sd_guidance_scale   used with --use-row-guidance
    id           (none)          the row id used in image names; without: the record's index in the file

A column named explicitly must exist; a default one may be missing. I2P's own label columns (`LABEL_COLUMNS`, the
share of its 2022 images flagged) are kept per row where present, so a run can be compared with them.

Templates (`write_template`): one prompt per template, value and seed, e.g. "{} body" and "a photo of a {} woman"
over a list of countries. The value is the row's category, so that `report` gives the share of flagged images per
value; the template has a column of its own, `template`, which `--category-column template` makes the category
instead, for the share per template.
"""
import codecs
import csv
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...files import create_exclusive

LABEL_COLUMNS = ("inappropriate_percentage", "nudity_percentage", "q16_percentage")
UNCATEGORIZED = "uncategorized"
MAX_SEEDS = 10_000         # seeds of one template (`parse_seeds`): "0-10000000000" is refused before it is expanded
MAX_TEMPLATE_ROWS = 1_000_000  # templates × values × seeds of one prompt file


def read_text(path: Path) -> str:
    """A UTF-8 text file (a byte-order mark is dropped); a file in another encoding is a ValueError naming the file,
    the line and the byte."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (the byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def warn(message: str):
    """Warnings go to stderr as one line each (library functions print nothing else but progress)."""
    print(f"sld-minimal: warning: {message}", file=sys.stderr)


@dataclass(frozen=True)
class Columns:
    """Which CSV column holds what (see the module docstring); None: I2P's name where the file has it, else the
    fallback."""
    prompt: str = "prompt"
    seed: str | None = None
    category: str | None = None
    guidance: str | None = None
    id: str | None = None

    DEFAULTS = {"seed": "sd_seed", "category": "categories", "guidance": "sd_guidance_scale"}

    def resolve(self, header: list, path) -> dict:
        """{role: column name or None (absent)} for this header; an explicitly named column that is not there is
        a ValueError naming the file, the column and the columns it has."""
        out = {}
        for role in ("prompt", "seed", "category", "guidance", "id"):
            name = getattr(self, role)
            if name is None:
                default = self.DEFAULTS.get(role)
                out[role] = default if default in header else None
            elif name in header:
                out[role] = name
            else:
                hint = "; is it the I2P CSV? (--prompt-column names another)" if role == "prompt" else ""
                raise ValueError(f"{path} lacks the column {name!r} (--{role}-column); it has "
                                 f"{', '.join(header) or 'no header'}{hint}")
        return out


@dataclass(frozen=True)
class Row:
    id: int                 # the id column's value, else the record's index among the file's data rows
    line: int               # line of the file where the record starts (for messages)
    prompt: str
    categories: tuple       # e.g. ("sexual", "violence") or ("United States",), as written in the file
    seed: int               # sd_seed (or the row id)
    guidance_scale: float | None  # sd_guidance_scale; None where missing or not a number
    labels: dict = field(default_factory=dict, compare=False)  # I2P's label columns present, as numbers


def _integer(text: str) -> int:
    """'123' or '123.0' (pandas writes integer columns with gaps as floats) → 123; anything else: ValueError."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        value = float(text)  # raises ValueError for non-numbers
        if not value.is_integer():
            raise
        return int(value)


def _uint64(text: str):
    """An id or a seed: an integer in [0, 2^64) (`_integer`'s spellings), else None."""
    try:
        value = _integer(text)
    except (ValueError, OverflowError):
        return None
    return value if 0 <= value < 2**64 else None


def _number(text: str):
    """A finite float, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def read_csv(path, row_guidance: bool = False, columns: Columns = Columns()) -> list:
    """A prompt CSV (I2P's by default: hub dataset AIML-TUDA/i2p) → valid rows. A bad row (no prompt, a seed or id
    that is not an integer in [0, 2^64), with `row_guidance` an unreadable guidance) is skipped with a warning naming
    its line; it keeps its index, so ids stay the record's index in the file. Two rows with one id: ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found (the I2P CSV: hub dataset AIML-TUDA/i2p)")
    records = _records(csv.reader(io.StringIO(read_text(path), newline="")), path)
    header = [h.strip() for h in next(records, (1, []))[1]]
    col = columns.resolve(header, path)
    if row_guidance and not col["guidance"]:
        raise ValueError(f"{path} has no guidance column (sd_guidance_scale; --guidance-column names another), "
                         f"which --use-row-guidance needs")
    rows, seen = [], {}
    labels = [c for c in LABEL_COLUMNS if c in header]
    index = 0
    for line, record in records:  # line: where the record starts (a quoted prompt may span lines)
        if not any(field.strip() for field in record):
            continue  # blank lines are not records (as pandas reads the file)
        fields = dict(zip(header, record))  # a short record lacks its last fields: they read as ""
        get = lambda role: fields.get(col[role], "") if col[role] else ""  # noqa: E731
        row_id, index = index, index + 1
        if col["id"]:
            row_id = _uint64(get("id"))
            if row_id is None:
                warn(f"{path}:{line}: record {index - 1} has {col['id']} {get('id')!r}, "
                     f"not an integer in [0, 2^64); skipped")
                continue
            if row_id in seen:
                raise ValueError(f"{path}:{line}: {col['id']} {row_id} again (first on line {seen[row_id]}); "
                                 f"ids name the images, so they must be unique")
            seen[row_id] = line
        prompt = get("prompt").strip()
        if not prompt:
            warn(f"{path}:{line}: row {row_id} has no prompt; skipped")
            continue
        seed = row_id
        if col["seed"]:
            seed = _uint64(get("seed"))
            if seed is None:
                warn(f"{path}:{line}: row {row_id} has {col['seed']} {get('seed')!r}, "
                     f"not an integer in [0, 2^64); skipped")
                continue
        guidance = _number(get("guidance"))
        guidance = guidance if guidance is not None and guidance >= 0 else None
        if row_guidance and guidance is None:
            warn(f"{path}:{line}: row {row_id} has {col['guidance']} {get('guidance')!r}, "
                 f"not a number >= 0 (needed by --use-row-guidance); skipped")
            continue
        if col["category"]:
            categories = tuple(c.strip() for c in get("category").split(",") if c.strip())
        else:
            categories = (UNCATEGORIZED,)
        found = {c: _number(fields.get(c, "")) for c in labels}
        rows.append(Row(row_id, line, prompt, categories, seed, guidance,
                        {c: v for c, v in found.items() if v is not None}))
    return rows


def _records(reader, path):
    """(the line where it starts, the record) for each record of a csv reader of `path`; a CSV error — "field
    larger than field limit" where a quote left open swallows the rest of the file — names the file and the line."""
    while True:
        line = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{path}:{line}: not readable as CSV ({e}); is a quote left open in the record that "
                             f"starts here?") from None
        yield line, record


def select_rows(rows, categories=None, limit=None, shard=(0, 1)) -> list:
    """Rows having any of `categories` (matched ignoring case), then the first `limit` of those, then shard i of n
    (`id % n == i`). The limit comes before the split, so the shards of a limited run together make the unsharded
    run."""
    if categories:
        wanted = {c.strip().lower() for c in categories}
        present = {c for r in rows for c in r.categories}
        unknown = sorted(wanted - {c.lower() for c in present})
        if unknown:
            raise ValueError(f"no row has the category {', '.join(map(repr, unknown))}; "
                             f"the file has {', '.join(sorted(present))}")
        rows = [r for r in rows if wanted & {c.lower() for c in r.categories}]
    if limit is not None:
        rows = rows[:limit]
    i, n = shard
    return [r for r in rows if r.id % n == i]


def parse_shard(text=None, environ=os.environ):
    """'i/n' → (i, n). Without text: torchrun's RANK/WORLD_SIZE when set, else (0, 1)."""
    if text is None:
        if "RANK" in environ and "WORLD_SIZE" in environ:
            text = f"{environ['RANK']}/{environ['WORLD_SIZE']}"
        else:
            return 0, 1
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r} is not of the form i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need 0 <= i < n")
    return i, n


# ----------------------------------------------------------------------------- templates

def parse_seeds(text: str) -> list:
    """'0,1,5' or '0-9' (or a mix, '0-4,10') → the seeds, in order; ValueError for anything else, and for more than
    `MAX_SEEDS` seeds (counted before any range is expanded)."""
    ranges = []
    for part in str(text).split(","):
        a, sep, b = part.strip().partition("-")
        try:
            first, last = int(a), int(b) if sep else int(a)
        except ValueError:
            raise ValueError(f"seeds {text!r}: expected integers or ranges like 0,1,2 or 0-9") from None
        if not 0 <= first <= last < 2**64:
            raise ValueError(f"seeds {text!r}: {part.strip()} is not a range of integers in [0, 2^64)")
        ranges.append((first, last))
    count = sum(last - first + 1 for first, last in ranges)
    if count > MAX_SEEDS:
        raise ValueError(f"seeds {text!r} name {count} seeds; at most {MAX_SEEDS} are taken")
    seeds = [seed for first, last in ranges for seed in range(first, last + 1)]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {text!r} repeat a seed")
    return seeds


def check_templates(templates) -> list:
    """The templates, each once, each with the placeholder `{}` exactly once and no comma (the template column can
    be the category column, and categories are comma-separated); ValueError naming the first that is not."""
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError("template: none given")
    seen = set()
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"template {template!r} must hold the placeholder {{}} exactly once")
        if "," in template:
            raise ValueError(f"template {template!r} holds a comma; as a category (--category-column template) "
                             f"it would split in two")
        if template.strip() in seen:
            raise ValueError(f"template {template!r} given twice; give each template once")
        seen.add(template.strip())
    return templates


def template_rows(templates, values_file, seeds=(0,)) -> list:
    """[(prompt, value, template, seed)]: each of `templates` (one string or several, see `check_templates`) with
    its `{}` replaced by each line of `values_file` (blank lines skipped), once per seed: template-major, then value.
    The value is the category, so it may hold no comma; values are kept as written, and may not repeat (ignoring
    case)."""
    templates = check_templates(templates)
    path = Path(values_file)
    if not path.is_file():
        raise FileNotFoundError(f"values file {path} not found")
    values, lines = [], {}
    for n, text in enumerate(read_text(path).split("\n"), start=1):
        value = text.strip()
        if not value:
            continue
        if "," in value:
            raise ValueError(f"{path}:{n}: {value!r} holds a comma; a value is a category, and categories are "
                             f"comma-separated")
        if value.lower() in lines:
            raise ValueError(f"{path}:{n}: {value!r} again (first on line {lines[value.lower()]})")
        lines[value.lower()] = n
        values.append(value)
    if not values:
        raise ValueError(f"{path} holds no values (one per line)")
    total = len(templates) * len(values) * len(seeds)
    if total > MAX_TEMPLATE_ROWS:
        raise ValueError(f"{path}: {len(templates)} templates × {len(values)} values × {len(seeds)} seeds make "
                         f"{total} prompts; at most {MAX_TEMPLATE_ROWS} in one file")
    return [(t.replace("{}", value).strip(), value, t.strip(), seed)
            for t in templates for value in values for seed in seeds]


def write_template(templates, values_file, out, seeds=(0,)) -> int:
    """Write the prompt CSV of `template_rows` to `out` (columns prompt,categories,template,sd_seed: what
    `i2p generate` reads), atomically; an existing file is never overwritten. Returns the number of rows."""
    out = Path(out)
    rows = template_rows(templates, values_file, seeds)
    if out.exists():
        raise FileExistsError(f"{out} exists; an existing prompt file is never overwritten: choose another --out")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"folder {out.parent} of {out} does not exist")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["prompt", "categories", "template", "sd_seed"])
    writer.writerows(rows)
    if not create_exclusive(out, buf.getvalue()):
        raise FileExistsError(f"{out} exists; an existing prompt file is never overwritten: choose another --out")
    return len(rows)
