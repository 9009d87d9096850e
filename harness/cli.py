"""The command line every script shares: argument types, the device, thread and data flags, building
a script's configuration with one `error:` line for a bad value, `run_cli`, which turns the errors
a user can fix into one line instead of a traceback. Plain Python: the plotting scripts parse their
arguments without loading torch."""
import argparse
import contextlib
import math
import shlex
import signal
import sys
import threading
from pathlib import Path


from harness.config import field_names, max_threads
from harness.quiet_start import STOP_SIGNALS, replaceable, stop_quietly
from protocol import ConfigError

REPO = Path(__file__).resolve().parents[1]


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def thread_count(text):
    """--threads: 1 up to this machine's CPUs."""
    value = positive_int(text)
    if value > max_threads():
        raise argparse.ArgumentTypeError(f"must be at most {max_threads()} (this machine's CPUs), got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_session_args(parser):
    """-d/--device, --threads, --data-root and --no-download, as every script that loads data takes them."""
    parser.add_argument("-d", "--device", choices=("cpu", "cuda"),
                        help="cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=thread_count, metavar="N",
                        help=f"CPU threads for torch, at most {max_threads()} (default: $OMP_NUM_THREADS, else the "
                             f"cores not busy with other work)")
    parser.add_argument("--data-root", metavar="DIR",
                        help="the folder that holds Omniglot: images_background.zip and images_evaluation.zip, "
                             "or DIR/omniglot with them; remembered for later runs (default: $OMNIGLOT_ROOT, else the "
                             "root remembered from an earlier run, else a per-user cache that is downloaded into)")
    parser.add_argument("--no-download", action="store_true",
                        help="fail instead of downloading Omniglot into the per-user cache when it is not there")


def add_run_args(parser, step="iteration"):
    """--out-dir, --resume, --save-minutes and --time-limit, as every training script takes them
    (`step`: what one step of its run is called)."""
    parser.add_argument("--out-dir", default="runs", help="where checkpoints and the log are written (%(default)s)")
    parser.add_argument("--resume", metavar="PATH|latest",
                        help="continue a stopped run exactly from its resumable checkpoint (latest: the newest "
                             "in --out-dir); with the run's own flags (checked), --epochs may be raised")
    parser.add_argument("--save-minutes", type=positive_float, default=5, metavar="MINUTES",
                        help="also write a resumable checkpoint this often (%(default)s), so that a crash or a "
                             "kill -9 loses minutes, not hours")
    parser.add_argument("--time-limit", type=positive_float, metavar="SECONDS",
                        help=f"stop cleanly after the {step} in flight once this much time has passed")


def add_size_args(parser):
    """--rln, --nm and --mask, the network's sizes, with the paper's defaults."""
    parser.add_argument("--rln", type=positive_int, default=256, help="RLN channels (%(default)s)")
    parser.add_argument("--nm", type=positive_int, default=112, help="NM channels (%(default)s)")
    parser.add_argument("--mask", type=positive_int, default=2304, help="NM gate size, 9 x --rln (%(default)s)")


def build_config(parser, cls, args, **values):
    """cls(...) from the parsed `args` (every field of cls that args has, then `values`); a value the
    configuration refuses is a usage error (one line, exit 2)."""
    names = set(field_names(cls))
    settings = {k: v for k, v in vars(args).items() if k in names}
    if "download" in names and hasattr(args, "no_download"):
        settings["download"] = not args.no_download
    settings.update(values)
    try:
        return cls(**settings)
    except ConfigError as e:
        parser.error(str(e))


def peer_lost(error):
    """Whether `error` is torch.distributed's word that another process of the job is gone (gloo raises
    a plain RuntimeError for it, newer versions a DistBackendError)."""
    text = str(error).lower()
    return type(error).__name__ in ("DistBackendError", "DistNetworkError", "DistError") or \
        "closed by peer" in text or "reset by peer" in text or "remote worker crashing" in text


def out_of_memory(error):
    """Whether `error` says the CPU or GPU ran out of memory (torch raises RuntimeErrors for it)."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or \
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def notice(message):
    """One `notice: ...` line on stderr: something the user should know, not an error."""
    print(f"notice: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_signals_interrupt():
    """Inside the block, Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt (a signal set aside on purpose
    stays so); the handlers before are put back after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    old = {sig: signal.signal(sig, signal.default_int_handler) for sig in STOP_SIGNALS
           if replaceable(signal.getsignal(sig))}
    try:
        yield
    finally:
        for sig, handler in old.items():  # quiet_start's exit is for the start only, not for the shutdown
            signal.signal(sig, handler if handler != stop_quietly else default_handler(sig))


def default_handler(sig):
    """Python's own handler of a stop signal: KeyboardInterrupt for Ctrl-C, the system's for the others."""
    return signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL


def run_cli(main):
    """Run main(); a library ValueError, an OSError (missing data, an unwritable output), Ctrl-C or
    SIGTERM becomes a short message on stderr and a non-zero exit, never a traceback."""
    try:
        with stop_signals_interrupt():
            main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:
        if peer_lost(e):
            print(f"error: another process of this torchrun job stopped ({str(e).strip().splitlines()[0][:160]}): "
                  f"run the same command again with --resume latest (the last resumable checkpoints continue the "
                  f"runs exactly)", file=sys.stderr)
            sys.exit(2)
        if not out_of_memory(e):
            raise
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"error: out of memory ({detail}): ask for less at once (fewer --seeds or rates, a smaller "
              f"--meta-batch or network, fewer classes or runs)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def interrupted_by_signals():
    """SIGTERM and SIGHUP (a closed terminal) raise KeyboardInterrupt inside the block, as Ctrl-C does,
    so that a script stops through the same clean-up."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    old = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def report_end(stopped, lasts):
    """A training script's end: `done: {each run's last checkpoint}`. A run stopped early has already
    said, in one line, after which step and how to continue it (`TrainingRuns.save`): nothing is
    repeated here, and an interruption exits 130."""
    if stopped is None:
        print(f"done: {', '.join(map(str, lasts))}")
    elif not stopped.startswith("time limit"):
        sys.exit(130)


def as_typed(script, argv, paths=(), dropped=()):
    """The command as a user would type it again: `python {script} ...` with no interpreter path;
    the options in `paths` relative to the repository when inside it, else by their file name
    alone; the options in `dropped` (where the data lives on this machine) left out."""
    out, args = [], list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        option, eq, inline = arg.partition("=")
        if option in dropped:
            takes_value = option != "--no-download"
            i += 1 if eq or not takes_value else 2
            continue
        if option in paths and (eq or i + 1 < len(args)):
            value = inline if eq else args[i + 1]
            out.append(f"{option}={portable_path(value)}" if eq else option)
            if not eq:
                out.append(portable_path(value))
            i += 1 if eq else 2
            continue
        out.append(arg)
        i += 1
    return shlex.join(["python", Path(script).name] + out)


def portable_path(path):
    """A path as it reads on any clone: relative to the repository when inside it, else its name."""
    resolved = Path(path).expanduser().resolve()
    try:
        return str(resolved.relative_to(REPO))
    except ValueError:
        return Path(path).name
