"""The machine a run is on: the device, torch's CPU threads, the facts a result records (the
device's name, the package versions, a file's hash), and the progress bars on its terminal or in
its logs (`progress_bar`)."""
import hashlib
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.distributed as dist
from tqdm import tqdm


def resolve_device(parser, device):
    """-d as given (cuda refused, as a usage error, where CUDA is missing), else cuda if available;
    float32 arithmetic in full on either (use_float32)."""
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("-d cuda: CUDA is not available on this machine (use -d cpu)")
    use_float32()
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def use_float32():
    """Full float32 in CUDA's matrix products and convolutions, as on the CPU: the paper's numbers are
    float32, and PyTorch would otherwise run cuDNN's convolutions in TF32 (10-bit mantissa) on Ampere
    and later GPUs. Returns the precisions set."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch 2.9 and later
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def free_cores(interval=0.2):
    """The cores this process may use, less those busy with other work now: the machine's CPU time
    over `interval` seconds (this process sleeps meanwhile), else the last minute's load average."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        busy = busy_cores(interval)
    except (OSError, ValueError, ZeroDivisionError):
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - round(busy)))


def busy_cores(interval):
    """How many of the machine's cores worked during the next `interval` seconds (Linux /proc/stat)."""
    def times():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all, idle + iowait
    total0, idle0 = times()
    time.sleep(interval)
    total1, idle1 = times()
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


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


# ----------------------------------------------------------------------------- torchrun


@dataclass(frozen=True)
class Ranks:
    """This process's place among those torchrun started (rank 0 of 1 without torchrun), and
    whether torchrun restarted it after a failure (`--max-restarts`)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    restarted: bool = False
    local_world: int = 1  # the processes on this node


def torchrun_ranks(environ=os.environ):
    """The Ranks torchrun's environment variables describe."""
    number = lambda key, default: int(environ.get(key, default))
    return Ranks(number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0),
                 number("TORCHELASTIC_RESTART_COUNT", 0) > 0, number("LOCAL_WORLD_SIZE", 1))


class TooFewGPUs(ValueError):
    """torchrun started more processes on a node than it has GPUs."""


def join_processes(ranks, device, connect=True):
    """Under torchrun: this process's GPU (its local rank's) and, if `connect`, torch.distributed's
    process group (gloo on the CPU, nccl on CUDA). Nothing without torchrun. Raises TooFewGPUs
    where the local rank has no GPU of its own."""
    if ranks.world == 1:
        return
    if device == "cuda":
        gpus = torch.cuda.device_count()
        if max(ranks.local_world, ranks.local_rank + 1) > gpus:  # every process refuses, not only the extra ones
            raise TooFewGPUs(f"torchrun started {max(ranks.local_world, ranks.local_rank + 1)} processes on a node "
                             f"with {gpus} GPU{'s' if gpus != 1 else ''}: give --nproc_per_node at most {gpus} "
                             f"with -d cuda (one GPU each), or -d cpu")
        torch.cuda.set_device(ranks.local_rank)
    if connect and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")


def leave_processes():
    """Close torch.distributed's process group, if this process joined one (at the script's end)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def any_process(flag, device):
    """True where `flag` is True in any process of the group (the processes of one run stop together)."""
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def progress_bar(iterable=None, *, desc, total=None, disable=False, **options):
    """Every script's progress bar, named by `desc` (what it counts): tqdm's on a terminal; where
    stderr is not one (a log file, a pipe), no carriage-return frames but a few plain lines
    (`PlainProgress`); nothing with `disable`. `options`: tqdm's (`initial` and `unit` read by both)."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, disable=disable, **options)
    return PlainProgress(iterable, desc, total, options.get("initial", 0), options.get("unit", "it"))


class PlainProgress:
    """A progress bar for stderr that is not a terminal: one line as it starts and one at each quarter
    of `total`, `{desc}: 50% (300/600 steps, 2.1s)`. Used as tqdm is: iterated, or `update(n)` inside
    a `with` block."""

    def __init__(self, iterable, desc, total=None, initial=0, unit="it"):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = len(iterable) + initial if total is None and iterable is not None else total
        self.n, self.start = initial, time.perf_counter()
        self.quarter = self._quarter()
        self._say()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.close()

    def update(self, n=1):
        """Count `n` more; a line where a quarter of the total is passed."""
        self.n += n
        if self._quarter() > self.quarter:
            self.quarter = self._quarter()
            self._say()

    def close(self):
        pass  # every line is written as it comes: nothing to clear

    def _quarter(self):
        return 4 * self.n // self.total if self.total else 0

    def _say(self):
        of = f"{100 * self.n // self.total}% ({self.n}/{self.total} " if self.total else f"({self.n} "
        seconds = time.perf_counter() - self.start
        print(f"{self.desc}: {of}{self.unit}s{f', {seconds:.1f}s' if self.n else ''})", file=sys.stderr, flush=True)

