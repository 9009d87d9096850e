"""The bottom of the project, plain Python that imports nothing of it (every other module may read it):
Omniglot's and ANML's protocol's numbers, the network's size checks, the checks of a setting's value
and the error they raise."""
import math

# Omniglot, and the numbers of ANML's protocol.
NUM_BACKGROUND = 964  # meta-training classes (images_background)
NUM_EVALUATION = 659  # meta-test classes (images_evaluation)
IMAGES_PER_CLASS = 20  # drawers per character: a meta-training episode takes one inner step per image
REMEMBER_SIZE = 64  # remembered background images in each outer loss, beside the episode's 20
NUM_OUTPUTS = 1000  # the last layer's classes
MAX_SEED = 2**32 - 1
MAX_PARAMETERS = 10**9  # a network above this (4 GB of weights, four times that to train) is a typo


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag."""


def check_sizes(rln, nm, mask):
    """Refuse sizes the architecture cannot build, or cannot hold in memory, saying why."""
    for name, value in (("rln", rln), ("nm", nm), ("mask", mask)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
    if mask != 9 * rln:
        raise ConfigError(f"mask size {mask} does not fit: the RLN with {rln} channels gives "
                          f"9 x {rln} = {9 * rln} features, so --mask must be {9 * rln}")
    count = parameter_count(rln, nm, mask)
    if count > MAX_PARAMETERS:
        raise ConfigError(f"--rln {rln} --nm {nm} makes a network of {count / 1e9:.1f} billion parameters "
                          f"({4 * count / 2**30:.0f} GiB of weights): at most {MAX_PARAMETERS:,} "
                          f"(the paper's 256/112/2304 has 6,041,800)")


def parameter_count(rln, nm, mask):
    """Parameters of ANML(rln, nm, mask): two stacks of three conv blocks, the NM's gate layer, fc."""
    blocks = lambda chs: (9 * chs + chs) + 2 * (9 * chs * chs + chs) + 3 * 2 * chs
    return blocks(rln) + blocks(nm) + (9 * nm + 1) * mask + (mask + 1) * NUM_OUTPUTS


def network_name(rln, nm, mask):
    """The network's name in every file of a run: `{rln}_{nm}_{mask}`, as higherANML writes it."""
    return f"{rln}_{nm}_{mask}"


# ----------------------------------------------------------------------------- a setting's value


def check_positive(flag, value, integer=False):
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else \
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise ConfigError(f"{flag} must be a {'whole' if integer else 'finite'} number > 0, got {value!r}")


def check_choice(flag, value, choices):
    if value not in choices:
        raise ConfigError(f"unknown {flag} {value!r}: choose one of {', '.join(choices)}")


def check_seed(value, flag="--seed"):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{flag} must be a whole number in 0..{MAX_SEED}, got {value!r}")


def check_device(device):
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"-d must be cpu or cuda, got {device!r}")


def check_path(flag, value, required=False):
    if value is None and not required:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{flag} must name a {'file' if flag in ('--json', '-m') else 'folder'}, got {value!r}")


def prior_values(text):
    """(alpha0, beta0, kappa0) of a --prior "ALPHA,BETA[,KAPPA]": alpha0, beta0 > 0, kappa0 >= 0 (default 0)."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) == 2:
        values.append(0.0)
    if len(values) != 3 or not all(math.isfinite(v) for v in values) or min(values[:2]) <= 0 or values[2] < 0:
        raise ConfigError(f"--prior takes ALPHA,BETA[,KAPPA] (alpha0, beta0 > 0, kappa0 >= 0), got {text!r}")
    return tuple(values)


def prior_name(values):
    """A prior as the grid shows it: "alpha0,beta0", and ",kappa0" where kappa0 is not 0."""
    return ",".join(f"{v:g}" for v in (values if values[2] else values[:2]))
