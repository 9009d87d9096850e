"""The settings of a run: one dataclass per script, built and checked once from the command line
(or in Python), then passed down whole and recorded whole in resumable checkpoints and result
files. Plain Python, no torch: a script checks its arguments before it loads anything heavy."""
import math
import os
from dataclasses import asdict, dataclass, fields, replace

from protocol import (IMAGES_PER_CLASS, MAX_PARAMETERS, NUM_BACKGROUND, NUM_EVALUATION, NUM_OUTPUTS, ConfigError,
                      check_choice, check_device, check_path, check_positive, check_seed, check_sizes, network_name,
                      prior_name, prior_values)

BACKENDS = ("auto", "higher", "func", "graph")  # auto: graph on CUDA, func elsewhere
# How the meta-test learns: in sequence, shuffled, a closed-form last layer, the nearest class mean,
# streaming LDA, a Gaussian per class (fastpath/generative_heads.py).
METHODS = ("seq", "iid", "lstsq", "ncm", "slda", "gaussian")
DISTANCES = ("euclidean", "cosine")  # ncm's distances to the class means
SHRINKAGES = (1e-4, 1e-2, 0.1, 0.5)  # slda's default grid with selection runs (the first: Hayes & Kanan's)
PRIORS = ("1,1", "1,0.1", "10,1", "100,10")  # gaussian's alpha0,beta0[,kappa0]: the default grid with selection runs
PREDICTIONS = ("bayes", "map")  # gaussian: the posterior predictive (Student-t), or the MAP Gaussian
GRID_FLAGS = {"lstsq": "--ridge", "ncm": "--distance", "slda": "--shrinkage", "gaussian": "--prior"}
OWN_FLAGS = {"ridges": "lstsq", "distances": "ncm", "shrinkages": "slda", "priors": "gaussian", "prediction": "gaussian"}
SCHEDULES = ("iid", "asb")  # pretraining: i.i.d. minibatches; alternating sequential and batch (Frati et al.)
CONV_INITS = ("torch", "kaiming")  # pretraining's convolutions: PyTorch's default draw; kaiming_normal_ (Frati et al.)
ARCHS = ("anml", "oml")  # meta-training: ANML's network, or OML's (oml.py)
MAX_EPOCHS_IID = 1000


def max_threads():
    """The most CPU threads a run may ask for: this machine's CPUs (more only wait for a core, and torch
    crashes outright on a count such as 100000)."""
    return os.cpu_count() or 1


def resolve_backend(backend, device):
    """The backend that runs on `device`: "auto" is "graph" on CUDA and "func" elsewhere."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "graph" if device == "cuda" else "func"
    return backend


def rate_name(rate):
    """A rate in a folder name, different for any two different rates: six significant digits where
    they give the rate back exactly (0.001, 1e+09), else Python's shortest exact form (0.0010000001,
    which six digits would print as 0.001, the name of another rate's folder)."""
    short = f"{rate:g}"
    return short if float(short) == rate else repr(float(rate))


def backend_refusal(backend, arch="anml", first_order=False, several=False, device=None):
    """Why meta-training cannot run with this backend, or None: the one place each impossible
    combination is refused (MetaTrainConfig at the command line, anml.meta_loss for a caller).
    `several`: several models or tasks an iteration (--seeds, rate lists, --meta-batch)."""
    if backend == "graph" and device not in (None, "cuda"):
        return "--backend graph replays CUDA graphs: it needs -d cuda (on the CPU use auto or func)"
    if backend != "higher":
        return None
    if first_order:
        return ("--first-order is implemented by the func and graph backends (--backend auto, func), not by higher, "
                "the second-order reference")
    if arch == "oml":
        return "--arch oml trains on the func and graph backends (--backend auto, func), not on higher"
    if several:
        return ("--seeds, several rates and --meta-batch run on the func and graph backends (--backend auto, func), "
                "not on higher, which trains one model one task at a time")
    return None


@dataclass(frozen=True)
class Session:
    """How one invocation runs (free to change between the calls that make one run)."""
    device: str = "cpu"
    threads: int | None = None  # None: chosen from the free cores (runtime.choose_threads)
    data_root: str | None = None
    download: bool = True

    def as_dict(self):
        """The whole configuration, as checkpoints and result files record it."""
        return asdict(self)

    def check_session(self):
        check_device(self.device)
        if self.threads is not None:
            check_positive("--threads", self.threads, integer=True)
            if self.threads > max_threads():
                raise ConfigError(f"--threads must be at most {max_threads()} (this machine's CPUs), got {self.threads}")
        check_path("--data-root", self.data_root)


@dataclass(frozen=True)
class RunSettings(Session):
    """A training run's invocation: where its files go, where it resumes from, when it stops."""
    out_dir: str = "runs"
    resume: str | None = None  # a resumable checkpoint's path, or "latest"
    time_limit: float | None = None  # seconds
    save_minutes: float | None = 5

    def check_run(self):
        """What every training checks: the session, the files, the network, its length and its seed."""
        self.check_session()
        check_path("--out-dir", self.out_dir, required=True)
        check_path("--resume", self.resume)
        if self.time_limit is not None:
            check_positive("--time-limit", self.time_limit)
        if self.save_minutes is not None:
            check_positive("--save-minutes", self.save_minutes)
        self.check_network()
        check_positive("--epochs", self.epochs, integer=True)
        check_seed(self.seed)

    def check_network(self):
        check_sizes(self.rln, self.nm, self.mask)

    @property
    def name(self):
        return network_name(self.rln, self.nm, self.mask)

    def run_settings(self):
        """The settings that make the run what it is, as its resumable checkpoints check them: the
        RUN_KEYS that this kind of run reads (a flag it ignores neither blocks a resume nor is checked)."""
        return {k: getattr(self, k) for k in self.RUN_KEYS if k not in self.unused_settings()}

    def unused_settings(self):
        """The RUN_KEYS this run does not read."""
        return ()


@dataclass(frozen=True)
class MetaTrainConfig(RunSettings):
    """train_omni.py: ANML meta-training."""
    rln: int = 256
    nm: int = 112
    mask: int = 2304
    epochs: int = 30000  # meta-training iterations, as higherANML calls them
    inner_lr: float = 0.1
    outer_lr: float = 1e-3
    seed: int = 1
    backend: str = "auto"
    first_order: bool = False
    arch: str = "anml"  # anml, or oml: OML's network (--rln: its channels), its inner loop over the last layer
    seeds: tuple | None = None  # several models trained together, one run each in {out_dir}/seed{s}
    inner_lrs: tuple | None = None  # several inner rates, one model each (with each seed)
    outer_lrs: tuple | None = None  # several outer rates, one model each (with each seed and inner rate)
    meta_batch: int = 1  # tasks per iteration, the mean of their meta-gradients (1: the paper's)

    log_name = "train_log"
    unit = "iteration"
    length_flag = "--epochs"
    RUN_KEYS = ("arch", "rln", "nm", "mask", "inner_lr", "outer_lr", "seed", "backend", "first_order", "meta_batch",
                "epochs")
    diverged_rates = "--outer-lr"  # what to lower when the loss diverged

    def unused_settings(self):
        return ("nm", "mask") if self.arch == "oml" else ()  # OML has no NM

    def __post_init__(self):
        self.check_run()
        check_positive("--inner-lr", self.inner_lr)
        check_positive("--outer-lr", self.outer_lr)
        for flag, values in (("--inner-lr", self.inner_lrs), ("--outer-lr", self.outer_lrs)):
            if values is not None:
                for value in values:
                    check_positive(flag, value)
                if len(set(values)) < len(values):
                    raise ConfigError(f"{flag} values must differ, got {' '.join(map(str, values))}")
        check_positive("--meta-batch", self.meta_batch, integer=True)
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(self.seeds))
            if not self.seeds:
                raise ConfigError("--seeds needs at least one seed")
            for seed in self.seeds:
                check_seed(seed, "--seeds")
            if len(set(self.seeds)) < len(self.seeds):
                raise ConfigError(f"--seeds must differ, got {' '.join(map(str, self.seeds))}")
        check_choice("--arch", self.arch, ARCHS)
        refusal = backend_refusal(resolve_backend(self.backend, self.device), self.arch, self.first_order,
                                  self.several or self.meta_batch > 1, self.device)
        if refusal:
            raise ConfigError(refusal)
        if self.arch == "oml" and (self.several or self.meta_batch > 1):
            raise ConfigError("--arch oml trains one model, one task an iteration: not with --seeds, several rates "
                              "or --meta-batch")

    @property
    def kind(self):
        """In checkpoint names: {name}_ANML-{iteration}.pth, or {channels}_OML-{iteration}.pth."""
        return "OML" if self.arch == "oml" else "ANML"

    @property
    def name(self):
        return str(self.rln) if self.arch == "oml" else network_name(self.rln, self.nm, self.mask)

    def check_network(self):
        if self.arch != "oml":
            return check_sizes(self.rln, self.nm, self.mask)
        check_positive("--rln", self.rln, integer=True)
        count = 9 * self.rln + 5 * (9 * self.rln * self.rln + self.rln) + (9 * self.rln + 1) * NUM_OUTPUTS
        if count > MAX_PARAMETERS:
            raise ConfigError(f"--arch oml --rln {self.rln} makes a network of {count / 1e9:.1f} billion parameters: "
                              f"at most {MAX_PARAMETERS:,}")

    @property
    def several(self):
        """Several runs (--seeds, or several --inner-lr or --outer-lr values), each in a folder of its own."""
        return any(v is not None for v in (self.seeds, self.inner_lrs, self.outer_lrs))

    def members(self):
        """The runs this configuration trains: itself, or one per seed and rate (every combination), each
        in {out_dir}/seed{s}[_inner-lr{i}][_outer-lr{o}] with its own files, exactly as a single run with
        those flags writes them there."""
        if not self.several:
            return [self]
        runs = []
        for seed in sorted(self.seeds or (self.seed,)):  # one order however the list is given: a resume is exact
            for inner in sorted(self.inner_lrs or (self.inner_lr,)):
                for outer in sorted(self.outer_lrs or (self.outer_lr,)):
                    folder = f"seed{seed}" + (f"_inner-lr{rate_name(inner)}" if self.inner_lrs else "") + \
                        (f"_outer-lr{rate_name(outer)}" if self.outer_lrs else "")
                    runs.append(replace(self, seed=seed, inner_lr=inner, outer_lr=outer, seeds=None, inner_lrs=None,
                                        outer_lrs=None, out_dir=os.path.join(self.out_dir, folder)))
        return runs

    @property
    def resolved_backend(self):
        return resolve_backend(self.backend, self.device)

    @property
    def total_steps(self):
        return self.epochs

    def epochs_for(self, steps):
        return steps

    @property
    def length(self):
        return self.epochs


@dataclass(frozen=True)
class PretrainConfig(RunSettings):
    """pretrain_omni.py: the same network trained the ordinary way (the meta-test's baseline)."""
    rln: int = 256
    nm: int = 112
    mask: int = 2304
    epochs: int = 6  # passes over the background images (iid)
    lr: float = 1e-3  # Adam: of every minibatch (iid), of each episode's batch step (asb)
    batch_size: int = 128
    lobotomize: bool = False
    seed: int = 1
    init_only: bool = False
    schedule: str = "iid"  # iid: shuffled minibatches; asb: alternating sequential and batch episodes
    zap: bool = False  # iid: the whole last layer re-initialised every epoch; asb: the episode's class row
    episodes: int = 9000  # asb
    seq_lr: float = 0.1  # asb: SGD rate of the sequential steps
    open_gate: bool = False  # the NM's gate fixed at 1 (model.open_gate): the RLN and last layer alone
    conv_init: str = "torch"  # torch: PyTorch's default; kaiming: kaiming_normal_ (model.kaiming_convs)

    RUN_KEYS = ("rln", "nm", "mask", "schedule", "zap", "lr", "batch_size", "lobotomize", "seq_lr", "open_gate",
                "conv_init", "seed", "epochs", "episodes")

    def unused_settings(self):
        return ("batch_size", "lobotomize", "epochs") if self.schedule == "asb" else ("episodes", "seq_lr")

    @property
    def diverged_rates(self):
        """What to lower when the loss diverged: the rates this schedule trains with (asb: its
        sequential SGD steps' and its batch Adam step's; iid: Adam's)."""
        return "--seq-lr or --lr" if self.schedule == "asb" else "--lr"

    def __post_init__(self):
        self.check_run()
        check_positive("--lr", self.lr)
        check_positive("--batch-size", self.batch_size, integer=True)
        check_choice("--schedule", self.schedule, SCHEDULES)
        check_choice("--conv-init", self.conv_init, CONV_INITS)
        check_positive("--episodes", self.episodes, integer=True)
        check_positive("--seq-lr", self.seq_lr)
        if self.lobotomize and self.schedule == "asb":
            raise ConfigError("--lobotomize is the iid schedule's: --schedule asb re-initialises its episodes' rows "
                              "with --zap")

    @property
    def kind(self):
        """In file names: {name}_pretrain-{epoch}.pth (iid), {name}_asb-{episode}.pth (asb)."""
        return "asb" if self.schedule == "asb" else "pretrain"

    @property
    def log_name(self):
        return f"{self.kind}_log"

    @property
    def unit(self):
        return "episode" if self.schedule == "asb" else "step"

    @property
    def length_flag(self):
        return "--episodes" if self.schedule == "asb" else "--epochs"

    @property
    def images_per_epoch(self):
        return NUM_BACKGROUND * IMAGES_PER_CLASS

    @property
    def steps_per_epoch(self):
        return math.ceil(self.images_per_epoch / self.batch_size)

    @property
    def total_steps(self):
        return self.episodes if self.schedule == "asb" else self.epochs * self.steps_per_epoch

    def epochs_for(self, steps):
        """The --epochs (--episodes for asb) that covers `steps` steps."""
        return steps if self.schedule == "asb" else math.ceil(steps / self.steps_per_epoch)

    @property
    def length(self):
        return self.episodes if self.schedule == "asb" else self.epochs


# The flag of each run setting, for messages.
FLAGS = {"rln": "--rln", "nm": "--nm", "mask": "--mask", "inner_lr": "--inner-lr", "outer_lr": "--outer-lr",
         "seed": "--seed", "backend": "--backend", "first_order": "--first-order", "epochs": "--epochs",
         "lr": "--lr", "batch_size": "--batch-size", "lobotomize": "--lobotomize", "meta_batch": "--meta-batch",
         "schedule": "--schedule", "zap": "--zap", "episodes": "--episodes", "seq_lr": "--seq-lr", "arch": "--arch",
         "open_gate": "--open-gate", "conv_init": "--conv-init"}
MAY_CHANGE_ON_RESUME = ("epochs", "episodes")  # a run may be continued further than first planned


@dataclass(frozen=True)
class EvalConfig(Session):
    """eval_omni.py: meta-test runs of one checkpoint, or of several (`models`) on the same runs."""
    model: str = ""
    models: tuple | None = None  # several checkpoints (meta-training seeds): each evaluated, then across them
    classes: tuple = (10,)  # several counts are scored along one sequence per run
    method: str = "seq"
    lrs: tuple | None = None  # seq and iid: the Adam learning rates compared (default 0.001)
    ridges: tuple | None = None  # lstsq: the regularisers compared (default 1.0)
    distances: tuple | None = None  # ncm: the distances compared (default both with selection runs, else euclidean)
    shrinkages: tuple | None = None  # slda: the covariance shrinkages compared (default: see grid)
    priors: tuple | None = None  # gaussian: the "alpha0,beta0[,kappa0]" priors compared (default: see grid)
    prediction: str | None = None  # gaussian: "bayes" (default) or "map"
    epochs_iid: int | None = None  # iid: passes over the shuffled images (default 1)
    runs: int = 10
    selection_runs: int = 0
    train_examples: int = 15
    seed: int = 0
    original_loop: bool = False  # higherANML's full-network loop instead of the frozen-feature one
    no_freeze: bool = False  # seq, iid: Adam over every parameter (RLN, NM, fc), the original ANML code's baseline
    lanes: int = 1  # --no-freeze seq: (run, rate) pairs learning at once (fastpath/full_network.py)
    json: str | None = None

    def __post_init__(self):
        self.check_session()
        check_path("-m", self.model, required=True)
        for path in self.models or ():
            check_path("-m", path, required=True)
        object.__setattr__(self, "classes", tuple(sorted({int(n) for n in self.classes})))
        if not self.classes or not all(1 <= n <= NUM_EVALUATION for n in self.classes):
            raise ConfigError(f"--classes must be in 1..{NUM_EVALUATION} (Omniglot's evaluation classes), "
                              f"got {' '.join(map(str, self.classes)) or 'none'}")
        check_choice("--method", self.method, METHODS)
        self.check_method_flags()
        if self.method not in ("ncm", "gaussian"):
            for value in self.grid:
                check_positive(f"--{self.hyperparameter}", value)
        if self.method == "slda" and max(self.grid) > 1:
            raise ConfigError(f"--shrinkage must be in (0, 1], got {' '.join(f'{v:g}' for v in self.grid)}")
        if self.epochs_iid is not None:
            check_positive("--epochs-iid", self.epochs_iid, integer=True)
            if self.epochs_iid > MAX_EPOCHS_IID:
                raise ConfigError(f"--epochs-iid must be at most {MAX_EPOCHS_IID}, got {self.epochs_iid}")
        check_positive("--runs", self.runs, integer=True)
        if not isinstance(self.selection_runs, int) or self.selection_runs < 0:
            raise ConfigError(f"--selection-runs must be 0 or more, got {self.selection_runs!r}")
        if self.selection_runs and len(self.grid) < 2:
            what = {"lr": "learning rates", "ridge": "regularisers"}.get(self.hyperparameter, self.hyperparameter + "s")
            raise ConfigError(f"--selection-runs chooses among {what}: give several with --{self.hyperparameter}")
        if not (isinstance(self.train_examples, int) and 1 <= self.train_examples <= IMAGES_PER_CLASS - 1):
            raise ConfigError(f"--train-examples must be in 1..{IMAGES_PER_CLASS - 1} (each class has "
                              f"{IMAGES_PER_CLASS} images, one at least is kept for testing), "
                              f"got {self.train_examples}")
        check_seed(self.seed)
        check_path("--json", self.json)

    def check_method_flags(self):
        """Each method's own flags, and no other's."""
        method = self.method
        if method == "lstsq" and self.lrs:
            raise ConfigError("--lr is the Adam learning rate of seq and iid: --method lstsq takes --ridge")
        if method in ("ncm", "slda", "gaussian") and self.lrs:
            raise ConfigError(f"--lr is the Adam learning rate of seq and iid: --method {method} learns no rate (it "
                              f"takes {GRID_FLAGS[method]})")
        for field, owner in OWN_FLAGS.items():
            if getattr(self, field) and method != owner:
                raise ConfigError(f"--{field.rstrip('s')} is for --method {owner}, not {method}")
        check_choice("--prediction", self.prediction or PREDICTIONS[0], PREDICTIONS)
        if self.priors is not None:
            object.__setattr__(self, "priors", tuple(prior_name(prior_values(p)) for p in self.priors))
            if not self.priors or len(set(self.priors)) < len(self.priors):
                raise ConfigError(f"--prior takes distinct priors, got {' '.join(self.priors) or 'none'}")
        if self.epochs_iid is not None and method != "iid":
            raise ConfigError(f"--epochs-iid is for --method iid, not {method}")
        if self.original_loop and method != "seq":
            raise ConfigError("--original-loop is higherANML's sequential loop: it only runs --method seq")
        if self.no_freeze and method not in ("seq", "iid"):
            raise ConfigError(f"--no-freeze lets every parameter learn by Adam steps: it runs --method seq or iid, "
                              f"not {method}, which learns on frozen features")
        check_positive("--lanes", self.lanes, integer=True)
        if self.lanes > 1 and not (self.no_freeze and method == "seq"):
            raise ConfigError("--lanes batches the runs where every parameter learns: give it with --no-freeze and "
                              "--method seq (the frozen-feature methods batch their runs already)")
        if self.lanes > 1 and self.original_loop:
            raise ConfigError("--original-loop is higherANML's loop, one run at a time: leave out --lanes")
        if self.distances is not None:
            object.__setattr__(self, "distances", tuple(self.distances))
            unknown = [d for d in self.distances if d not in DISTANCES]
            if unknown or not self.distances or len(set(self.distances)) < len(self.distances):
                raise ConfigError(f"--distance takes distinct values among {', '.join(DISTANCES)}, got "
                                  f"{' '.join(map(str, self.distances)) or 'none'}")

    @property
    def hyperparameter(self):
        """What the grid holds: "lr" (seq, iid), "ridge", "distance", "shrinkage" or "prior" (GRID_FLAGS)."""
        return {"lstsq": "ridge", "ncm": "distance", "slda": "shrinkage", "gaussian": "prior"}.get(self.method, "lr")

    @property
    def grid(self):
        """The values compared on the same runs: learning rates, ridge regularisers for lstsq; distances (ncm),
        shrinkages (slda), priors (gaussian): by default all of DISTANCES, SHRINKAGES, PRIORS when there are
        selection runs to choose on, else the first."""
        if self.method == "lstsq":
            return tuple(self.ridges or (1.0,))
        if self.method in ("ncm", "slda", "gaussian"):
            default = {"ncm": DISTANCES, "slda": SHRINKAGES, "gaussian": PRIORS}[self.method]
            return tuple(getattr(self, self.hyperparameter + "s") or (default if self.selection_runs else default[:1]))
        return tuple(self.lrs or (1e-3,))

    @property
    def iid_epochs(self):
        return self.epochs_iid or 1

    @property
    def test_examples(self):
        return IMAGES_PER_CLASS - self.train_examples


def field_names(cls):
    return [f.name for f in fields(cls)]
