"""CLIP's tokenizer: prompts to token ids (`tokenize`), and its files, read from a model's `tokenizer/` folder or
derived from a packaged merges list.

`load_tokenizer` reads the folder a model carries (transformers' CLIPTokenizer: the only part not written here).

A single-file SD 1.x checkpoint holds the three models but no tokenizer. Rather than download one, the package
carries `data/bpe_simple_vocab_16e6.txt.gz` (1.3 MB): the byte-level BPE merges list of OpenAI's CLIP (MIT licence,
see `data/CLIP_BPE_LICENSE.txt`; the same file open-clip-torch and OpenAI's `clip` package ship). CLIP's vocabulary
is a function of that list — Radford et al.'s `simple_tokenizer.py` builds it as:

    the 256 byte symbols, the same 256 with the end-of-word mark `</w>`,
    one token per merge for the first 49152 − 256 − 2 = 48894 merges (the lines after the header),
    <|startoftext|> (49406) and <|endoftext|> (49407)            → 49408 tokens, SD 1.4's `vocab_size`

`write_clip_tokenizer` writes that vocabulary as the `vocab.json` + `merges.txt` that transformers'
`CLIPTokenizer` reads (the published `tokenizer/` folder of SD 1.4 has the same content); `clip_tokenizer()` loads
it from a temporary folder. A caller's own tokenizer folder (`tokenizer=` / `--tokenizer DIR`) always wins.
`byte_alphabet` and `write_tokenizer_files` also serve `testing/tiny.py`, whose random checkpoints carry a small BPE.
"""
import gzip
import json
import tempfile
from pathlib import Path

import torch

from .checks import warn
from .weights import WeightsError

BPE_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges: 2·256 byte symbols + merges + 2 specials = 49408
CLIP_VOCAB_SIZE = 2 * 256 + N_MERGES + 2  # 49408 tokens: the vocabulary `clip_tokenizer` derives
SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
           "unk_token": "<|endoftext|>"}  # SD 1.4 pads with <|endoftext|>


def byte_alphabet() -> list:
    """The code points byte-level BPE uses for bytes 0..255 (printable ones map to themselves)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    table = dict(zip(printable, printable)) | {b: 256 + i for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


def clip_vocab_and_merges() -> tuple[list, list]:
    """CLIP's vocabulary (token list, index = id) and merges ("a b" strings, in priority order)."""
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]  # line 0 is a version header
    # the byte symbols in CLIP's order: printable bytes as themselves, then the rest mapped to U+0100.. (ascending)
    symbols = [chr(c) for c in sorted(byte_alphabet())]
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    return vocab + ["<|startoftext|>", "<|endoftext|>"], merges


def write_tokenizer_files(folder, vocab: list, merges: list) -> Path:
    """A `tokenizer/` folder as SD 1.4 publishes it: vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**SPECIAL, "model_max_length": 77, "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
         "tokenizer_class": "CLIPTokenizer"}, indent=2))
    return folder


def write_clip_tokenizer(folder) -> Path:
    return write_tokenizer_files(folder, *clip_vocab_and_merges())


def load_tokenizer(folder):
    """transformers' CLIPTokenizer from `folder/tokenizer` or `folder` itself (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    sub = Path(folder) / "tokenizer"
    if not sub.is_dir() and (Path(folder) / "vocab.json").is_file():
        sub = Path(folder)
    for name in ("vocab.json", "merges.txt"):
        if not (sub / name).is_file():
            raise WeightsError(f"{sub / name} is missing; the model folder is incomplete — download it again")
    check_files(sub)
    try:
        return CLIPTokenizer.from_pretrained(str(sub))
    except Exception as e:  # noqa: BLE001 — transformers raises many kinds, naming no file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"{sub}: vocab.json / merges.txt cannot be read as a CLIP tokenizer ({first}); "
                           f"download the model again or pass another --tokenizer") from None


def check_files(sub: Path):
    """WeightsError unless `sub`'s vocab.json is a non-empty JSON object of token → id and its merges.txt holds at
    least one merge: transformers loads an empty list of either without a word, and then spells every prompt byte
    by byte (another image) or fails on its first token."""
    again = "download the model again or pass another --tokenizer"
    try:
        vocab = json.loads((sub / "vocab.json").read_text(encoding="utf-8"))
        merges = (sub / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{sub}: vocab.json / merges.txt cannot be read as a CLIP tokenizer ({e}); {again}") from None
    if not (isinstance(vocab, dict) and vocab and all(type(i) is int and i >= 0 for i in vocab.values())):
        raise WeightsError(f"{sub / 'vocab.json'} must be a non-empty JSON object of token → id (an integer >= 0); "
                           f"{again}")
    if not any(line.strip() and not line.startswith("#version") for line in merges):  # the header is no merge
        raise WeightsError(f"{sub / 'merges.txt'} holds no merges, so every word would be spelt byte by byte; {again}")


def check_vocab_size(tokens: int, vocab_size: int, model):
    """WeightsError unless ids 0..tokens−1 fit the text encoder's embedding table of `vocab_size` rows (a smaller
    vocabulary, trained on a few words, is fine): a larger id would fail deep inside the model."""
    if tokens > vocab_size:
        raise WeightsError(f"the tokenizer has {tokens} tokens but the text encoder of {model} embeds only "
                           f"{vocab_size}; pass this model's tokenizer (tokenizer= / --tokenizer DIR)")


def size(tokenizer) -> int:
    """The rows an embedding table needs for the tokenizer's ids: its largest id + 1 (its length, for CLIP's)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def clip_tokenizer():
    """transformers' CLIPTokenizer with CLIP's vocabulary, derived from the packaged merges list."""
    with tempfile.TemporaryDirectory(prefix="sld-minimal-clip-") as tmp:
        return load_tokenizer(write_clip_tokenizer(tmp))


def tokenize(tokenizer, prompts: list[str], max_length: int = 77, what: str = "prompt") -> torch.Tensor:
    """Prompts -> (B, 77) int64 ids: <|startoftext|> ... <|endoftext|>, padded with the tokenizer's pad token
    (SD 1.4's is <|endoftext|>) and truncated. Truncation is announced in one line naming the text (`what`: "prompt",
    "negative prompt", "safety concept", ...) and the words it drops."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
    for prompt in prompts:
        full = tokenizer(prompt, truncation=False, verbose=False).input_ids  # with start and end tokens
        if len(full) > max_length:
            dropped = tokenizer.decode(full[max_length - 1:-1])
            warn(f"the {what} is longer than {max_length} tokens; CLIP sees only its start, this part is dropped: "
                 f"{dropped!r}")
    return ids
