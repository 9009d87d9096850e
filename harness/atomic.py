"""Atomic file writes: every file the project writes (checkpoints, logs, JSON, downloads, caches)
is written beside its target under a temporary name, then renamed into place.

Outputs go to regular files or new paths only: a folder, a FIFO, a device or a socket is refused
(it would be replaced by the rename). A symbolic link is written through: its target is replaced
atomically and the link stays."""
import os
import stat
from pathlib import Path

TMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """A file could not be written (full disk, or any failure of its writer: torch.save raises
    RuntimeError); the target, if it existed, is untouched."""


def temporary_path(path, pid=None):
    """`.{name}.{pid}.tmp` beside `path`: hidden, and naming the process that writes it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}{TMP_SUFFIX}")


def output_target(path):
    """The file that writing `path` replaces: a symbolic link's target (the links followed), else `path`."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)


def not_a_regular_file(path):
    """What `path` is when it exists and is not a regular file ("a folder", "a FIFO", ...), else None."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a new path (or under a file: refused by its parent)
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def check_output(path, flag):
    """Refuse now, before any work, in one line (ValueError naming `flag`), an output `path` that a
    later write_atomic could not or should not replace: anything but a regular file or a new path
    (a symbolic link is judged by its target), or a folder where no file can be created. Returns
    the file that will be written (`output_target`)."""
    try:
        target = output_target(path)
        kind = not_a_regular_file(target)
    except OSError as e:  # a loop of links, a path too long
        raise ValueError(f"cannot write {flag} {path}: {e.strerror or e}") from None
    if kind == "a folder":
        raise ValueError(f"{flag} {path} is a folder: give a file name")
    if kind:
        raise ValueError(f"{flag} {path} is {kind}: outputs are written only to regular files or new paths")
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"cannot write {flag} {path}: {blocking} is a file, not a folder")
    try:
        probe_writable(target.parent)
    except OSError as e:
        raise ValueError(f"cannot write {flag} {path}: {e.strerror or e}") from None
    return target


def write_atomic(path, write):
    """Call write(temporary path) beside `path`, then rename it into place: a crash never
    leaves a truncated file, and a failed write leaves the old file (if any) as it was. A symbolic
    link is written through (its target replaced); anything but a regular file is refused."""
    path = output_target(path)
    kind = not_a_regular_file(path)
    if kind:
        raise WriteError(f"{path} is {kind}: it is not replaced by a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def one_line(error):
    """The first line of an exception's message, with its type when the message says little."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if not isinstance(error, OSError) or not text else text


def pid_alive(pid):
    """Whether a process with this pid exists (a pid of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_pid(tmp):
    """The pid in a `.{name}.{pid}.tmp` file name, or None when the name has none."""
    stem = tmp.name.removesuffix(TMP_SUFFIX)
    pid = stem.rsplit(".", 1)[-1]
    return int(pid) if tmp.name.startswith(".") and tmp.name.endswith(TMP_SUFFIX) and pid.isdigit() else None


def remove_stale_temporaries(folder, name=None):
    """Delete the `.*.tmp` files in `folder` (of the file `name` alone, if given) left by processes that
    no longer run (a kill during a save); returns their paths. Files of live processes are left alone."""
    removed = []
    for tmp in Path(folder).glob(f".{'*' if name is None else glob_escape(name) + '.*'}{TMP_SUFFIX}"):
        pid = writer_pid(tmp)
        if name is not None and pid is not None and tmp.name != temporary_path(tmp.parent / name, pid).name:
            continue  # another file's, whose name starts with `name`
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def glob_escape(name):
    """`name` matched literally by Path.glob (its *, ? and [ in brackets)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def probe_writable(folder):
    """Create `folder` if needed and write (then remove) a temporary file in it: raises OSError
    now, before any work, where a later write would fail (read-only, /proc, not a folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(folder / ".write-test")
    try:
        tmp.write_bytes(b"")
    finally:
        tmp.unlink(missing_ok=True)
