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


@pytest.mark.parametrize("command", ["tiny", "convert"])
def test_a_killed_writer_leaves_a_temporary_that_the_next_run_removes(tmp_path, tiny_ckpt, command):
    """kill -9 while the folder is being written: the hidden temporary stays; the next run to the same destination
    removes it, and only it."""
    dst = tmp_path / ("out" if command == "tiny" else "out.safetensors")
    user = tmp_path / ".notes.tmp"
    user.write_text("mine")
    # the child kills itself (SIGKILL) the moment its temporary folder exists: as kill -9 mid-write, at a known time
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
