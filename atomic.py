"""Atomic file writes: every file the project writes (checkpoints, logs, JSON, downloads, caches)
is written beside its target under a temporary name, then renamed into place."""
import os
from pathlib import Path


def write_atomic(path, write):
    """Call write(temporary path) beside `path`, then rename it into place: a crash never
    leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
