"""No command deletes what it did not write: `--overwrite` replaces only a folder of the command's own making, and
only temporaries of the one pattern (`files.TEMPORARY`, with the writer's process id) are ever removed."""
import os
import signal
import subprocess
import sys

import pytest

from sld_minimal import files
from sld_minimal.app import cli
from sld_minimal.testing import tiny


def _user_folder(path):
    path.mkdir()
    (path / "mywork.txt").write_text("x")
    return path


def test_tiny_overwrite_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    mine = _user_folder(tmp_path / "s")
    assert cli.main(["tiny", str(mine), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err and (mine / "mywork.txt").read_text() == "x"


def test_tiny_overwrite_never_replaces_the_current_folder(tmp_path, capsys, monkeypatch):
    mine = tiny.write_checkpoint(tmp_path / "ckpt")  # a checkpoint folder, but the one we stand in
    monkeypatch.chdir(mine)
    assert cli.main(["tiny", str(mine), "--overwrite"]) == 2
    assert "current folder" in capsys.readouterr().err and (mine / "model_index.json").is_file()
    monkeypatch.chdir(mine / "unet")  # nor an ancestor of it
    assert cli.main(["tiny", str(mine), "--overwrite"]) == 2


def test_tiny_overwrite_replaces_its_own_folder_with_the_usual_permissions(tmp_path):
    folder = tiny.write_checkpoint(tmp_path / "ckpt")
    assert cli.main(["tiny", str(folder), "--overwrite"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700
    for weights in folder.glob("*/*.safetensors"):  # not safetensors' own 0600
        assert (weights.stat().st_mode & 0o777) == 0o666 & ~umask, weights
    single = tmp_path / "model.safetensors"
    assert cli.main(["convert", str(folder), str(single)]) == 0
    assert (single.stat().st_mode & 0o777) == 0o666 & ~umask


def test_orphan_removal_keeps_a_users_own_tmp_files(tmp_path):
    own = tmp_path / ".notes.tmp"
    own.write_text("mine")
    other = tmp_path / ".labels.csv.x.12345678.tmp"  # no process id: not ours either
    other.write_text("mine too")
    dead = tmp_path / ".labels.csv.999999999.0123abcd.tmp"  # a process id no process has
    dead.write_text("a killed writer's")
    assert files.remove_orphans(tmp_path) == [dead]
    assert own.read_text() == "mine" and other.read_text() == "mine too" and not dead.exists()


def test_i2p_generate_keeps_a_users_tmp_file_in_its_folder(tiny_ckpt, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,categories,sd_seed\na photo of the cat,x,3\n")
    out = tmp_path / "run"
    (out / "images").mkdir(parents=True)
    for where in (out, out / "images"):
        (where / ".notes.tmp").write_text("mine")
    assert cli.main(["i2p", "generate", "--prompts", str(prompts), "--weights", str(tiny_ckpt), "--out", str(out),
                     "--safety", "off", "--steps", "1", "--images-per-prompt", "1", "--batch", "1", "--quiet"]) == 0
    assert (out / ".notes.tmp").read_text() == "mine" and (out / "images" / ".notes.tmp").read_text() == "mine"


@pytest.mark.parametrize("command", ["tiny", "convert", "i2p import"])
def test_a_killed_writer_leaves_a_temporary_that_the_next_run_removes(tmp_path, tiny_ckpt, command):
    """kill -9 while the folder is being written: the hidden temporary stays; the next run to the same destination
    removes it, and only it."""
    dst = tmp_path / ("out.safetensors" if command == "convert" else "out")
    user = tmp_path / ".notes.tmp"
    user.write_text("mine")
    # the child kills itself (SIGKILL) the moment its temporary folder exists: as kill -9 mid-write, at a known time
    if command == "i2p import":
        from PIL import Image

        (tmp_path / "made").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / "made" / "0-0.png")
        (tmp_path / "p.csv").write_text("prompt,sd_seed\na cat,1\n")
        args = ["i2p", "import", "--prompts", str(tmp_path / "p.csv"), "--images", str(tmp_path / "made"),
                "--out", str(dst), "--quiet"]
    else:
        args = ["tiny", str(dst)] if command == "tiny" else ["convert", str(tiny_ckpt), str(dst)]
    code = ("import os, signal, sys\n"
            "from sld_minimal import files\n"
            "mkdir = files.Path.mkdir\n"
            "def stop(self, *a, **k):\n"
            "    mkdir(self, *a, **k)\n"
            "    if files.TEMPORARY.match(self.name): os.kill(os.getpid(), signal.SIGKILL)\n"
            "files.Path.mkdir = stop\n"
            "from sld_minimal.app.cli import main\n"
            f"sys.exit(main({args!r}))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if files.TEMPORARY.match(p.name)]
    assert len(left) == 1 and not dst.exists()
    assert cli.main(args) == 0
    assert [p for p in tmp_path.iterdir() if files.TEMPORARY.match(p.name)] == [] and dst.exists()
    assert user.read_text() == "mine"


# ----------------------------------------------------------------------------- two writers of one output

def test_generate_refuses_a_file_another_process_wrote_meanwhile(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Two `generate --out same.png` at once: both pass the check for an existing file; the one that finishes second
    must not replace the first one's image (create without replace), and says so as the check would have."""
    from sld_minimal.pipeline import StableDiffusion

    out = tmp_path / "same.png"
    call = StableDiffusion.__call__

    def other_process_finishes_first(self, *a, **k):
        result = call(self, *a, **k)
        out.write_bytes(b"the other process's image")
        return result
    monkeypatch.setattr(StableDiffusion, "__call__", other_process_finishes_first)
    code = cli.main(["generate", "x", "--weights", str(tiny_ckpt), "--out", str(out), "--height", "32", "--width",
                     "32", "--steps", "1", "--seed", "1", "--quiet"])
    err = capsys.readouterr().err
    assert (code, err) == (2, f"sld-minimal: error: {out} already exists; choose another --out or pass --overwrite\n")
    assert out.read_bytes() == b"the other process's image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"]  # no temporary left


def test_save_without_overwrite_lets_one_of_concurrent_writers_win(tmp_path):
    """Eight threads save to the same name at once with overwrite=False: exactly one writes, the others raise
    FileExistsError naming the file, and the file is the winner's, whole."""
    import threading

    import numpy as np
    import torch

    from sld_minimal.outputs import Output

    target, barrier, results = tmp_path / "same.png", threading.Barrier(8), {}

    def writer(k):
        out = Output(np.full((1, 8, 8, 3), k / 10, np.float32), torch.zeros(1, 4, 1, 1), k)
        barrier.wait()
        try:
            out.save(target, overwrite=False)
            results[k] = "wrote"
        except FileExistsError as e:
            results[k] = str(e)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [k for k, r in results.items() if r == "wrote"]
    assert len(winners) == 1 and len(results) == 8
    assert {r for r in results.values() if r != "wrote"} == {
        f"{target} already exists; nothing was replaced (overwrite=True replaces it)"}
    from PIL import Image
    assert np.asarray(Image.open(target))[0, 0, 0] == round(winners[0] / 10 * 255)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"]


def test_save_without_overwrite_takes_back_its_own_files_when_one_name_is_taken(tmp_path):
    import numpy as np
    import torch

    from sld_minimal.outputs import Output

    (tmp_path / "cat-1.png").write_bytes(b"mine")
    out = Output(np.zeros((2, 8, 8, 3), np.float32), torch.zeros(2, 4, 1, 1), 0)
    with pytest.raises(FileExistsError, match="cat-1.png already exists; nothing was replaced"):
        out.save(tmp_path / "cat.png", overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-1.png"]
    assert (tmp_path / "cat-1.png").read_bytes() == b"mine"
    assert out.save(tmp_path / "cat.png")[1].read_bytes() != b"mine"  # overwrite=True (the default) replaces
