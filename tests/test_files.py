"""Atomic files (files.py): a write that fails or is killed half-way leaves no partial target, only a hidden
temporary that `remove_orphans` clears."""
import errno
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sld_minimal import files

ROOT = Path(__file__).resolve().parents[1]


def listing(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


def test_write_atomic_failing_half_way_leaves_nothing(tmp_path):
    target = tmp_path / "a.png"

    def half(f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device"):
        files.write_atomic(target, half)
    assert listing(tmp_path) == []


def test_kill_9_while_saving_leaves_no_partial_file(tmp_path):
    """A writer killed mid-file leaves only a hidden temporary, never a truncated target; remove_orphans clears it."""
    target = tmp_path / "k-1.png"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from sld_minimal.files import write_atomic
        def slow(f):
            f.write(b"x" * 198)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        write_atomic({str(target)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    left = listing(tmp_path)
    assert len(left) == 1 and left[0].startswith(".k-1.png.") and left[0].endswith(".tmp")
    assert [p.name for p in files.remove_orphans(tmp_path)] == left and listing(tmp_path) == []


def test_create_exclusive_failing_names_the_target_not_the_temporary(tmp_path):
    target = tmp_path / "p.csv"

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as e:
        files.create_exclusive(target, full)
    assert str(e.value) == f"[Errno {errno.ENOSPC}] cannot write {target}: No space left on device"
    assert listing(tmp_path) == []
    assert files.create_exclusive(target, "a") and not files.create_exclusive(target, "b")
    assert target.read_text() == "a" and listing(tmp_path) == ["p.csv"]


def test_atomic_folder_errors_name_the_destination_not_the_temporary(tmp_path):
    dst = tmp_path / "model"
    with pytest.raises(OSError) as e:
        with files.atomic_folder(dst) as tmp:
            files.write_atomic(tmp / "weights.bin", b"x")
            open(tmp / "missing" / "config.json", "rb")
    assert str(e.value) == f"[Errno {errno.ENOENT}] cannot write {dst}/missing/config.json: No such file or directory"
    with pytest.raises(OSError) as e:
        with files.atomic_folder(dst) as tmp:
            def full(f):
                raise OSError(errno.ENOSPC, "No space left on device")
            files.write_atomic(tmp / "unet.safetensors", full)
    assert str(e.value) == f"[Errno {errno.ENOSPC}] cannot write {dst}/unet.safetensors: No space left on device"
    assert listing(tmp_path) == []
