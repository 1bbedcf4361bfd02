"""Every file this package writes goes through here: whole or not at all.

`write_atomic` writes beside the target under a hidden temporary name, fsyncs, then renames (a rename within one
folder is atomic on POSIX and Windows), so a reader — or a rerun after kill -9 or a full disk — sees the old file or
the new one, never a truncated one. `atomic_folder` does the same for a folder: it is filled as a hidden sibling
and renamed when complete. Errors are `OSError`s whose message names the file; `remove_orphans` clears the hidden
temporaries a killed process left behind.
"""
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"  # hidden temporaries: f".{name}.{pid}.{8 hex digits}.tmp", the one pattern (`TEMPORARY`)
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def temp_name(path: Path) -> Path:
    """The hidden temporary beside `path` that this process writes before renaming it to `path`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def _named(e: OSError, path: Path) -> OSError:
    """The same error, its message naming `path` (OSError's own text often names the temporary or nothing)."""
    reason = e.strerror or str(e) or type(e).__name__
    err = type(e)(e.errno, f"cannot write {path}: {reason}") if e.errno is not None else OSError(f"cannot write {path}: {reason}")
    return err


def _write_temporary(path: Path, data) -> Path:
    """`data` written and fsynced to a new hidden temporary beside `path` (`temp_name`), which is returned; on any
    error the temporary is gone and the error names `path`."""
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _named(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def usual_mode(path) -> Path:
    """Give a written file the permissions a plain `open(path, "w")` would (0666 less the umask): safetensors'
    `save_file` writes its files 0600, which other users of a shared model folder could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)


def write_atomic(path, data) -> Path:
    """Write `data` (bytes, str, or a function taking a binary file object) to `path` atomically, replacing a file of
    that name; returns `path`."""
    path = Path(path)
    tmp = _write_temporary(path, data)
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise _named(e, path) from e
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename
    return path


def create_exclusive(path, data) -> bool:
    """Create `path` holding `data` (as `write_atomic` takes it) only if no file of that name exists, atomically:
    of concurrent writers the first wins and the others change nothing. Returns whether we created it."""
    path = Path(path)
    tmp = _write_temporary(path, data)
    try:
        os.link(tmp, path)  # fails if the name exists: the file another process made stays
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create (O_EXCL), written in one call
        try:
            with open(path, "xb") as f:
                try:
                    f.write(tmp.read_bytes())
                    f.flush()
                    os.fsync(f.fileno())
                except BaseException:
                    os.unlink(path)  # ours (O_EXCL made it): no partial file stays
                    raise
            return True
        except FileExistsError:
            return False
        except OSError as e:
            raise _named(e, path) from e
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(dst, overwrite: bool = False):
    """Yield a hidden temporary folder beside `dst` (`temp_name`); when the block ends without an error it becomes
    `dst`. A non-empty `dst` is refused (FileExistsError naming it) unless `overwrite`, which replaces it only at the
    end. The temporaries of a killed earlier writer of `dst` are removed first (`remove_orphans`). An `OSError`
    names the file as it would be in `dst`, never the temporary."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(dst.parent, of=dst.name)
    tmp = temp_name(dst)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = temp_name(dst)
            os.rename(dst, old)  # the old folder goes only once the new one is complete
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except OSError as e:
        raise _renamed(e, tmp, dst) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _renamed(e: OSError, tmp: Path, dst: Path) -> OSError:
    """The same error with the temporary folder `tmp` read as `dst` in its message: what it was writing there."""
    if e.errno is not None and e.strerror:
        message = e.strerror if e.filename is None else f"cannot write {e.filename}: {e.strerror}"
        return type(e)(e.errno, message.replace(str(tmp), str(dst)))
    return type(e)(str(e).replace(str(tmp), str(dst)))


def remove_orphans(folder, of: str | None = None) -> list:
    """Remove the hidden temporaries (`TEMPORARY`: `.name.pid.xxxxxxxx.tmp`) that killed writers left in `folder`
    (only those of the file or folder `of`, if given); returns them. Nothing else is touched — a user's own
    `.notes.tmp` does not match — and only temporaries of processes no longer alive on this machine are removed, so
    a concurrent writer keeps its own. (Shards on several machines sharing one folder over a network file system
    cannot see each other's processes: start them one after another there, or give each its own folder.)"""
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        m = TEMPORARY.match(p.name)
        if not m or (of is not None and m["name"] != of):
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _alive(pid):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_replaceable(folder, names: set, marker: str):
    """ValueError unless `folder` is absent, or a folder that a writer of `names` made: every entry in it one of
    `names`, `marker` among them. Never the current folder, one of its ancestors, the home folder or /. What
    `--overwrite` checks before it replaces a whole folder: no command deletes what it did not write."""
    path = Path(folder).resolve()
    if not path.exists():
        return
    cwd = Path.cwd().resolve()
    if path in (cwd, *cwd.parents, Path.home().resolve(), Path(path.anchor)):
        raise ValueError(f"{folder} is the current folder, one of its parents or the home folder: never replaced")
    found = {p.name for p in path.iterdir()} if path.is_dir() else None
    if found is None or not found <= set(names) or marker not in found:
        raise ValueError(f"{folder} holds files this command did not write (it would replace only a folder it made: "
                         f"{', '.join(sorted(names))}); choose a new folder")
