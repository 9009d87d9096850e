"""The command line shared by every script: argument types, the device and data flags, one
`error:` line instead of a traceback, and the facts a result records (file hash, device name)."""
import argparse
import hashlib
import math
import platform
import sys

import numpy
import sklearn
import torch

from datasets import DataError
from model import check_sizes


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


def positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_common_args(parser):
    """-d/--device, --data-root and --no-download, as both scripts take them."""
    parser.add_argument("-d", "--device", choices=("cpu", "cuda"), default=default_device(),
                        help="default: cuda if available, else cpu (here: %(default)s)")
    parser.add_argument("--data-root", metavar="DIR",
                        help="folder with images_background.zip and images_evaluation.zip "
                             "(default: $OMNIGLOT_ROOT, else a per-user cache)")
    parser.add_argument("--no-download", action="store_true",
                        help="fail instead of downloading Omniglot when it is not in the data root")


def add_size_args(parser):
    """--rln, --nm and --mask, the network's sizes, with the paper's defaults."""
    parser.add_argument("--rln", type=positive_int, default=256, help="RLN channels (%(default)s)")
    parser.add_argument("--nm", type=positive_int, default=112, help="NM channels (%(default)s)")
    parser.add_argument("--mask", type=positive_int, default=2304, help="NM gate size, 9 x --rln (%(default)s)")


def check_size_args(parser, args):
    """A usage error (one line, exit 2) for sizes that do not make an ANML."""
    try:
        check_sizes(args.rln, args.nm, args.mask)
    except ValueError as e:
        parser.error(str(e))


def check_device(parser, device):
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("-d cuda: CUDA is not available on this machine (use -d cpu)")


def run_cli(main):
    """Run main(); a library ValueError / DataError, an OSError (an unwritable output, say) or Ctrl-C
    becomes a short message on stderr and a non-zero exit, never a traceback."""
    try:
        main()
    except (ValueError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "scikit-learn": sklearn.__version__}
