"""`sld-minimal i2p fetch`: everything I2P evaluation downloads, fetched once, so that the machine works offline after.

    csv   the I2P prompts, `i2p_benchmark.csv` of the hub dataset AIML-TUDA/i2p          → the hub cache
    q16   Q16's learned prompts for CLIP ViT-L/14, `prompts.p` of github.com/ml-research/Q16
                                                                             → ~/.cache/sld_minimal/q16/ViT-L-14
    clip  the CLIP model Q16 runs on, openai/clip-vit-large-patch14 (configs, tokenizer, safetensors) → the hub cache

Each lands where the classifiers look for it (`clipmodels.find_clip`, `clipmodels.load_q16_prompts`), so a machine
fetched once classifies with the default classifiers without a network. Every file is checked before it is kept:
hub files against the hub's own hashes (the SHA-256 of a large, LFS-stored file; the git blob hash of a small one),
Q16's file against the SHA-256 pinned here. A file that does not match is removed, never used. An interrupted
download resumes where it stopped: the hub's from its `.incomplete` blob, Q16's from its hidden `.part` file.
"""
import fnmatch
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

I2P_REPO, I2P_FILE = "AIML-TUDA/i2p", "i2p_benchmark.csv"
Q16_PROMPTS_URL = "https://raw.githubusercontent.com/ml-research/Q16/main/data/ViT-L-14/prompts.p"
# SHA-256 of that file as the Q16 repository holds it (git blob 975ddc99…, unchanged since its commit of 2022-04-28)
Q16_PROMPTS_SHA256 = "9b6c411824c2f64e0f847aa3c9f2b15b8e3a6c75e0efd82f2f672670c97ccad5"
# what a CLIP folder needs (safetensors only: pickled weights are never read, as everywhere in this package)
CLIP_FILES = ["config.json", "preprocessor_config.json", "tokenizer*", "vocab.json", "merges.txt",
              "special_tokens_map.json", "*.safetensors"]
RESOURCES = ("csv", "q16", "clip")  # what `fetch` can fetch, in this order
CHUNK = 1 << 20


def command(what: str, clip: str | None = None) -> str:
    """The command line that fetches one resource (`clip`: a CLIP other than the default one)."""
    return f"sld-minimal i2p fetch --only {what}" + (f" --clip {clip}" if clip else "")


def hub_offline() -> bool:
    """Whether the hub is set offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE): then nothing is downloaded."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def q16_prompts_path() -> Path:
    """Where Q16's published prompts file is kept once downloaded: ~/.cache/sld_minimal/q16/ViT-L-14/prompts.p."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sld_minimal" / "q16" / "ViT-L-14" / "prompts.p"


def sha256_file(path) -> str:
    """The SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path) -> str:
    """The git blob hash of a file: SHA-1 of b"blob <size>\\0" and the bytes (how the hub names a small file)."""
    h = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- a URL with a pinned SHA-256

def download(url: str, path, sha256: str, timeout: float = 30, progress: bool = True) -> Path:
    """`url` into `path`, kept only if its SHA-256 is `sha256`. A file already there with that hash is kept as it
    is. The bytes go to the hidden `.<name>.part` beside `path` first; an interrupted download resumes from it (an
    HTTP Range request; a server that ignores it sends the whole file again). A wrong hash: the part is removed and
    a ValueError says so in one line. Network errors raise OSError, the part kept for the next try."""
    from tqdm.auto import tqdm

    path = Path(path)
    if path.is_file() and sha256_file(path) == sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:  # 416: nothing past `have`, the part is whole
            raise
        response = None
    if response is not None:
        with response, open(part, "ab" if response.status == 206 else "wb") as f:
            have = have if response.status == 206 else 0
            size, came = response.headers.get("Content-Length"), 0
            with tqdm(total=have + int(size) if size else None, initial=have, unit="B", unit_scale=True,
                      desc=path.name, disable=not progress) as bar:
                try:
                    while chunk := response.read(CHUNK):
                        f.write(chunk)
                        came += len(chunk)
                        bar.update(len(chunk))
                except http.client.HTTPException as e:
                    size = f"{size} ({type(e).__name__})"
            if size is not None and str(came) != size:  # the connection broke off: what came is kept in the part
                raise OSError(f"the download of {url} broke off after {came} of {size} bytes")
    got = sha256_file(part)
    if got != sha256:
        part.unlink()
        raise ValueError(f"{url}: the downloaded file has SHA-256 {got}, not the published {sha256}; not kept")
    os.replace(part, path)
    return path


# ----------------------------------------------------------------------------- hub files, checked against the hub

def _hub_hash(entry) -> tuple:
    """(algorithm, hex digest) of a hub file listing entry: the LFS SHA-256 where it has one, else the git blob id."""
    lfs = getattr(entry, "lfs", None)
    sha = getattr(lfs, "sha256", None) or (lfs.get("sha256") if isinstance(lfs, dict) else None)
    return ("sha256", str(sha).lower()) if sha else ("git-sha1", str(entry.blob_id).lower())


def hub_files(repo: str, patterns, repo_type: str = "model") -> Path:
    """Download the files of hub repository `repo` matching `patterns` into the hub cache (resumed by the hub's
    own client), each checked against the hash the hub lists for it; returns the snapshot folder. A file that does
    not match is removed from the cache and named in a ValueError."""
    from huggingface_hub import HfApi, hf_hub_download

    entries = [e for e in HfApi().list_repo_tree(repo, repo_type=repo_type, recursive=True)
               if hasattr(e, "blob_id") and any(fnmatch.fnmatch(e.path, p) for p in patterns)]
    if not entries:
        raise FileNotFoundError(f"the hub repository {repo} holds no file matching {', '.join(patterns)}")
    folder = None
    for entry in entries:
        local = Path(hf_hub_download(repo, entry.path, repo_type=repo_type))
        algorithm, want = _hub_hash(entry)
        got = sha256_file(local) if algorithm == "sha256" else git_blob_sha1(local)
        if got != want:
            blob = local.resolve()
            local.unlink(missing_ok=True)  # the snapshot's link, then the blob it names
            blob.unlink(missing_ok=True)
            raise ValueError(f"{repo}/{entry.path}: the downloaded file has {algorithm} {got}, not the hub's {want}; "
                             f"not kept")
        folder = folder or Path(str(local)[:-len(entry.path)])  # the snapshot: the file's path less its name
    return folder


# ----------------------------------------------------------------------------- all of it

def fetch(what, clip: str, progress: bool = True) -> dict:
    """Fetch the resources `what` (a subset of RESOURCES) into the caches the classifiers read; `clip`: the hub id
    of the CLIP to fetch (the classifiers' default: `clipmodels.DEFAULT_CLIP`). Returns {resource: where it now
    is}. With the hub set offline (HF_HUB_OFFLINE): a RuntimeError at once."""
    unknown = [w for w in what if w not in RESOURCES]
    if unknown:
        raise ValueError(f"unknown resource {', '.join(unknown)}; choose from {', '.join(RESOURCES)}")
    if hub_offline():
        raise RuntimeError("the hub is set offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE): unset it to fetch")
    found = {}
    for name in (w for w in RESOURCES if w in what):
        try:
            if name == "csv":
                found[name] = hub_files(I2P_REPO, [I2P_FILE], repo_type="dataset") / I2P_FILE
            elif name == "q16":
                found[name] = download(Q16_PROMPTS_URL, q16_prompts_path(), Q16_PROMPTS_SHA256, progress=progress)
            else:
                found[name] = hub_files(clip, CLIP_FILES)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 — no network, no such repository, …: one line naming what failed
            detail = str(e).splitlines()[0] if str(e) else "no detail"
            raise RuntimeError(f"could not fetch {name} ({type(e).__name__}: {detail}); "
                               f"`{command(name, clip if name == 'clip' else None)}` tries again, resuming what was "
                               f"downloaded") from None
    return found
