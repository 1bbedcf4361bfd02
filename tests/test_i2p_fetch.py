"""`sld-minimal i2p fetch` against a local fake hub (no network): the files land where the classifiers look, a
broken-off download resumes, a wrong checksum is refused in one line and leaves no file behind; offline, classify
names every missing file at once, each with the command that fetches it."""
import hashlib
import http.server
import os
import pickle
import socket
import threading
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import numpy as np
import pytest
from huggingface_hub.hf_api import RepoFile, RepoFolder

from sld_minimal.app import cli
from sld_minimal.app.i2p import classify as C, clipmodels, fetch as FE, prompts as P
from sld_minimal.testing.i2p import make_run, write_i2p_csv

COMMIT = "c" * 40
PROMPTS = pickle.dumps(np.arange(2 * 768, dtype=np.float32).reshape(2, 768))  # a stand-in for Q16's file


class Hub:
    """What the fake hub serves: {repo: {path: bytes}}, and what it lists as their hashes (`published`, by default
    the hashes of what it serves). Large files (*.safetensors) are listed as LFS files with their SHA-256, the others
    with their git blob id, as the hub does."""

    def __init__(self, repos):
        self.served = {repo: dict(files) for repo, files in repos.items()}
        self.published = {repo: dict(files) for repo, files in repos.items()}
        self.downloads = []

    def list_repo_tree(self, repo_id, repo_type=None, recursive=False, **kwargs):
        yield RepoFolder(path="onnx", oid="0" * 40)
        for path, data in self.published[repo_id].items():
            blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
            lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            yield RepoFile(path=path, size=len(data), oid=blob, lfs=lfs if path.endswith(".safetensors") else None)

    def hf_hub_download(self, repo_id, filename, repo_type=None, **kwargs):
        """The hub cache's layout: blobs/<hash>, snapshots/<commit>/<file> linking to it, refs/main."""
        self.downloads.append((repo_id, filename))
        data = self.served[repo_id][filename]
        root = Path(huggingface_hub.constants.HF_HUB_CACHE) / (
            f"{'datasets' if repo_type == 'dataset' else 'models'}--{repo_id.replace('/', '--')}")
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / COMMIT / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(COMMIT)
        return str(link)


CLIP_REPO = {"config.json": b'{"projection_dim": 768}', "preprocessor_config.json": b"{}",
             "tokenizer_config.json": b"{}", "vocab.json": b"{}", "merges.txt": b"#version: 0.2\n",
             "special_tokens_map.json": b"{}", "model.safetensors": b"weights " * 100,
             "pytorch_model.bin": b"pickled weights: never fetched"}


class Server(http.server.ThreadingHTTPServer):
    """Serves `files` {url path: bytes} with HTTP Range requests (unless `ranges` is False); `cut` > 0: sends only
    that many bytes of a body and closes the connection, the Content-Length promising all of it."""
    files, ranges, cut, seen = {}, True, 0, []


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        s = self.server
        data = s.files.get(self.path)
        s.seen.append(self.headers.get("Range"))
        if data is None:
            return self.send_error(404)
        start = int(self.headers["Range"][len("bytes="):-1]) if self.headers.get("Range") and s.ranges else 0
        if start >= len(data) > 0:
            return self.send_error(416)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:start + s.cut] if s.cut else data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    s = Server(("127.0.0.1", 0), Handler)
    s.files, s.seen = {"/prompts.p": PROMPTS}, []
    thread = threading.Thread(target=s.serve_forever, daemon=True)
    thread.start()
    yield s
    s.shutdown()
    s.server_close()


@pytest.fixture
def hub(monkeypatch, tmp_path, server):
    """The fake hub behind huggingface_hub's functions, an empty hub cache, Q16's file at the local server with its
    pinned hash replaced by the stand-in's."""
    fake = Hub({FE.I2P_REPO: {FE.I2P_FILE: write_i2p_csv(tmp_path / "i2p.csv").read_bytes()},
                clipmodels.DEFAULT_CLIP: CLIP_REPO, "someone/small": {"config.json": b'{"a": 1}'}})
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", lambda self, *a, **k: fake.list_repo_tree(*a, **k))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{server.server_address[1]}/prompts.p"
    for module in (FE, clipmodels):  # clipmodels checks the cached file against the same pin
        monkeypatch.setattr(module, "Q16_PROMPTS_URL", url)
        monkeypatch.setattr(module, "Q16_PROMPTS_SHA256", hashlib.sha256(PROMPTS).hexdigest())
    return fake


def go_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_fetch_lands_files_where_the_classifiers_look(hub, tmp_path, capsys, monkeypatch):
    assert cli.main(["i2p", "fetch"]) == 0
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    snapshot = tmp_path / "hf" / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / COMMIT
    csv = tmp_path / "hf" / "hub" / "datasets--AIML-TUDA--i2p" / "snapshots" / COMMIT / FE.I2P_FILE
    q16 = tmp_path / "cache" / "sld_minimal" / "q16" / "ViT-L-14" / "prompts.p"
    assert out == {"csv": str(csv), "q16": str(q16), "clip": str(snapshot)}
    assert ("openai/clip-vit-large-patch14", "pytorch_model.bin") not in hub.downloads  # safetensors only
    # offline now: the classifiers find everything without the network
    go_offline(monkeypatch)
    assert clipmodels.find_clip(clipmodels.DEFAULT_CLIP) == str(snapshot)
    array, sha = clipmodels.load_q16_prompts()
    assert array.shape == (2, 768) and sha == hashlib.sha256(PROMPTS).hexdigest()
    clipmodels.find_all(None, [clipmodels.DEFAULT_CLIP], q16=True)  # nothing missing
    assert len(P.read_csv(out["csv"])) == len(P.read_csv(tmp_path / "i2p.csv"))
    # a cached prompts file that is not the published one is refused, never used
    q16.write_bytes(pickle.dumps(np.zeros((2, 768), np.float32)))
    with pytest.raises(ValueError, match=f"^{q16} is not Q16's published prompts file .* run `sld-minimal i2p fetch "
                                         f"--only q16`$"):
        clipmodels.load_q16_prompts()


def test_fetch_resumes_a_broken_off_download(hub, server, tmp_path, capsys):
    q16 = tmp_path / "cache" / "sld_minimal" / "q16" / "ViT-L-14" / "prompts.p"
    part = q16.with_name(".prompts.p.part")
    server.cut = 1000  # the connection breaks off after 1000 bytes
    assert cli.main(["i2p", "fetch", "--only", "q16", "--quiet"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sld-minimal: error: could not fetch q16 (OSError: the download of {FE.Q16_PROMPTS_URL} broke off "
                   f"after 1000 of {len(PROMPTS)} bytes); `sld-minimal i2p fetch --only q16` tries again, resuming "
                   f"what was downloaded"]
    assert part.read_bytes() == PROMPTS[:1000] and not q16.exists()
    server.cut = 0
    assert cli.main(["i2p", "fetch", "--only", "q16", "--quiet"]) == 0
    assert server.seen == [None, "bytes=1000-"]  # the second request asked only for the rest
    assert q16.read_bytes() == PROMPTS and not part.exists()
    # a server that ignores the range sends the whole file again: still whole
    part.write_bytes(PROMPTS[:500])
    q16.unlink()
    server.ranges = False
    assert FE.download(FE.Q16_PROMPTS_URL, q16, hashlib.sha256(PROMPTS).hexdigest(), progress=False) == q16
    assert q16.read_bytes() == PROMPTS and not part.exists()
    # a part that is already whole (the server answers 416) is checked and kept
    part.write_bytes(PROMPTS)
    q16.unlink()
    server.ranges = True
    assert FE.download(FE.Q16_PROMPTS_URL, q16, hashlib.sha256(PROMPTS).hexdigest(), progress=False) == q16
    assert q16.read_bytes() == PROMPTS


def test_a_wrong_checksum_is_refused_and_nothing_kept(hub, server, tmp_path, capsys, monkeypatch):
    q16 = tmp_path / "cache" / "sld_minimal" / "q16" / "ViT-L-14" / "prompts.p"
    server.files["/prompts.p"] = PROMPTS[:-4] + b"evil"
    got = hashlib.sha256(PROMPTS[:-4] + b"evil").hexdigest()
    assert cli.main(["i2p", "fetch", "--only", "q16", "--quiet"]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sld-minimal: error: {FE.Q16_PROMPTS_URL}: the downloaded file has SHA-256 {got}, not the published "
        f"{hashlib.sha256(PROMPTS).hexdigest()}; not kept"]
    assert not q16.parent.exists() or list(q16.parent.iterdir()) == []  # no file, no part
    # a hub file that is not what the hub lists: removed from the cache (blob and link), named in one line
    hub.served[clipmodels.DEFAULT_CLIP]["model.safetensors"] = b"tampered"
    assert cli.main(["i2p", "fetch", "--only", "clip", "--quiet"]) == cli.EXIT_ERROR
    want = hashlib.sha256(CLIP_REPO["model.safetensors"]).hexdigest()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sld-minimal: error: openai/clip-vit-large-patch14/model.safetensors: the downloaded file has sha256 "
        f"{hashlib.sha256(b'tampered').hexdigest()}, not the hub's {want}; not kept"]
    root = tmp_path / "hf" / "hub" / "models--openai--clip-vit-large-patch14"
    assert not (root / "snapshots" / COMMIT / "model.safetensors").is_symlink()
    assert not (root / "blobs" / hashlib.sha256(b"tampered").hexdigest()).exists()
    # so the classifiers do not take the half-fetched snapshot for a CLIP
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(clipmodels.ModelMissing):
        clipmodels.find_clip(clipmodels.DEFAULT_CLIP)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # a small (non-LFS) file is checked against its git blob id
    hub.served["someone/small"]["config.json"] = b"{}"
    want, got = hashlib.sha1(b'blob 8\0{"a": 1}').hexdigest(), hashlib.sha1(b"blob 2\0{}").hexdigest()
    with pytest.raises(ValueError, match=f"^someone/small/config.json: the downloaded file has git-sha1 {got}, not "
                                         f"the hub's {want}; not kept$"):
        FE.hub_files("someone/small", ["*.json"])
    assert not (tmp_path / "hf" / "hub" / "models--someone--small" / "snapshots" / COMMIT / "config.json").exists()


def test_fetch_usage_errors_and_offline(hub, capsys, monkeypatch):
    for argv, message in (
            (["--only", "q16,weights"], "--only: unknown weights; choose from csv,q16,clip"),
            (["--only", ","], "--only: unknown (none); choose from csv,q16,clip"),
            (["--clip", "./my-clip"], "--clip ./my-clip: fetch takes a hub id (owner/name), e.g. "
                                      "openai/clip-vit-large-patch14"),
            (["--only", "q16", "--clip", "openai/clip-vit-base-patch32"],
             "--clip names the CLIP to fetch: it needs clip in --only")):
        assert cli.main(["i2p", "fetch", *argv]) == cli.EXIT_USAGE
        assert capsys.readouterr().err.strip().splitlines() == [f"sld-minimal: error: {message}"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["i2p", "fetch"]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [
        "sld-minimal: error: the hub is set offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE): unset it to fetch"]
    assert hub.downloads == []


def test_offline_classify_names_every_missing_file_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    go_offline(monkeypatch)
    run = make_run(tmp_path / "run", {0: ("hate", [0], {})})
    (run / "labels.csv").unlink()
    q16 = tmp_path / "cache" / "sld_minimal" / "q16" / "ViT-L-14" / "prompts.p"
    offline = "the hub is set offline (HF_HUB_OFFLINE)"
    assert cli.main(["i2p", "classify", str(run), "--classifiers", "q16,clipscore", "--clipscore-clip",
                     "openai/clip-vit-base-patch32", "--quiet"]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sld-minimal: error: 3 files the classifiers need are missing: Q16's prompts file {q16} is not cached and "
        f"cannot be downloaded from {FE.Q16_PROMPTS_URL} ({offline}) (fetch it with `sld-minimal i2p fetch --only "
        f"q16`); the CLIP model openai/clip-vit-large-patch14 (for Q16 and CLIP score) is not in the hub cache and "
        f"cannot be downloaded ({offline}) (fetch it with `sld-minimal i2p fetch --only clip`); the CLIP model "
        f"openai/clip-vit-base-patch32 (for Q16 and CLIP score) is not in the hub cache and cannot be downloaded "
        f"({offline}) (fetch it with `sld-minimal i2p fetch --only clip --clip openai/clip-vit-base-patch32`); run "
        f"these with a network, or pass --q16-prompts FILE or classify with --classifiers nudenet or pass --clip "
        f"FOLDER (for CLIP score --clipscore-clip FOLDER), a local CLIP folder (transformers' save_pretrained layout)"]
    assert not (run / "classify.json").exists() and not (run / "labels.csv").exists()  # nothing written
    with pytest.raises(clipmodels.ModelMissing) as missing:  # from Python: the same, with the items to act on
        C.load_models(["q16"])
    assert [fetch for _, fetch in missing.value.items] == ["sld-minimal i2p fetch --only q16",
                                                          "sld-minimal i2p fetch --only clip"]
