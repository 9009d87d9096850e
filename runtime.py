"""The machine a run is on: the device, torch's CPU threads, and the facts a result records (the
device's name, the package versions, a file's hash)."""
import hashlib
import os
import platform
from importlib import metadata

import torch


def resolve_device(parser, device):
    """-d as given (cuda refused, as a usage error, where CUDA is missing), else cuda if available."""
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("-d cuda: CUDA is not available on this machine (use -d cpu)")
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def free_cores():
    """The cores this process may use, less those busy with other work (the last minute's load)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


def set_threads(requested=None):
    """Set torch's CPU threads: `requested` (--threads), else $OMP_NUM_THREADS as torch read it, else
    the free cores. torch's threads busy-wait for each other, so a thread more than the free cores
    makes every operation wait for a core (docs/speed.md measures it). Returns the number set."""
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = requested or free_cores()
    torch.set_num_threads(threads)
    return threads


def device_name(device):
    """The GPU's name, or the CPU's model name where Linux tells it."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def versions():
    """The versions a result depends on."""
    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": version("numpy"),
            "scikit-learn": version("scikit-learn")}


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
