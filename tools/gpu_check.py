"""One check of every CUDA path, for a machine with one NVIDIA GPU: `make gpu-check`.

    python tools/gpu_check.py --data-root DIR            # on the GPU: full-size network, a few iterations
    python tools/gpu_check.py --device cpu --data-root DIR   # the same steps at tiny sizes (CI runs it)

Runs, in priority order and each under its own time limit: the CUDA tests, the benchmark of the
iteration (with its operation count) and of several models and tasks, short trainings of every
kind each followed by `--resume latest`, a run moved from the CPU to the device and back, an
evaluation of several models, one with every parameter learning in lanes, and torchrun with two
processes; with --device cpu, last, the slow test that `make test` leaves out (`pytest -m slow`: the
comparison script end to end at tiny scale). Prints one line per check (PASS or FAIL, seconds, what it ran), keeps each check's
output in --logs, and exits 1 if any check failed.
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--rln", "4", "--nm", "3", "--mask", "36"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--data-root", metavar="DIR", help="the folder with Omniglot's two zips")
    parser.add_argument("--logs", metavar="DIR", help="where each check's output goes (default: a new temporary folder)")
    parser.add_argument("--work", metavar="DIR", help="the trainings' folders (default: a new temporary folder)")
    parser.add_argument("--only", nargs="+", metavar="CHECK", help="run the checks whose names start so")
    return parser.parse_args(argv)


def checks(device, work, data):
    """[(name, time limit in seconds, [commands])] in priority order. On the CPU the network is tiny."""
    py = [sys.executable]
    cpu = device == "cpu"
    size = TINY if cpu else []
    oml_size = ["--rln", "4"] if cpu else []
    common = ["-d", device, "--threads", "1" if cpu else "2", *data]
    train = lambda out, *flags: py + ["train_omni.py", *size, *flags, "--out-dir", str(work / out), *common]
    pretrain = lambda out, *flags: py + ["pretrain_omni.py", *size, *flags, "--out-dir", str(work / out), *common]
    resumed = lambda command, *flags: command + ["--resume", "latest", *flags]
    tests = (py + ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda_guards.py"] if cpu else
             py + ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests"])
    slow_tests = py + ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow", "tests"]
    bench = py + ["bench.py", *size, "--iters", "2", "-d", device, *data]
    out = []
    out.append(("tests", 300, [tests]))
    out.append(("bench iteration", 180, [bench + ["--only", "iteration", "--count-ops"]]))
    out.append(("bench models and tasks", 180, [bench + ["--models", "1", "2", "4", "8", "--meta-batch", "4"]]))
    kinds = [("train graphed ANML", "anml", train, []),
             ("train --seeds 1 2", "seeds", train, ["--seeds", "1", "2"]),
             ("train --outer-lr A B", "rates", train, ["--outer-lr", "0.001", "0.002"]),
             ("train --meta-batch 4", "meta_batch", train, ["--meta-batch", "4"]),
             ("train --first-order", "first_order", train, ["--first-order"]),
             ("train --arch oml", "oml", lambda o, *f: py + ["train_omni.py", "--arch", "oml", *oml_size, *f,
                                                             "--out-dir", str(work / o), *common], []),
             ("pretrain asb --zap", "asb_zap", pretrain, ["--schedule", "asb", "--zap"]),
             ("pretrain asb --open-gate", "asb", pretrain, ["--schedule", "asb", "--open-gate"]),
             ("pretrain iid --zap", "iid_zap", pretrain, ["--zap", "--batch-size", "512"])]
    for name, folder, make, flags in kinds:
        length, longer = (["--episodes", "3"], ["--episodes", "5"]) if "asb" in folder else \
            (["--epochs", "1"], ["--epochs", "2"]) if folder == "iid_zap" else (["--epochs", "3"], ["--epochs", "5"])
        first = make(folder, *flags, *length)
        out.append((name, 240, [first, resumed(make(folder, *flags, *longer))]))
    moved = lambda d, n: py + ["train_omni.py", *size, "--epochs", str(n), "--out-dir", str(work / "moved"), "-d", d,
                               "--threads", "1", *data]
    out.append(("resume from the CPU on the device and back", 240,
                [moved("cpu", 2), resumed(moved(device, 4)), resumed(moved("cpu", 6))]))
    name = "4_3_36" if cpu else "256_112_2304"
    models = [str(work / "seeds" / f"seed{s}" / f"{name}_ANML-4.pth") for s in (1, 2)]
    out.append(("eval_omni.py of two models", 240,
                [py + ["eval_omni.py", "-m", *models, "-c", "5", "10", "-l", "0.001", "0.0005", "-r", "2",
                       "--selection-runs", "2", "--json", str(work / "eval.json"), *common]]))
    out.append(("eval_omni.py --no-freeze --lanes 4", 240,
                [py + ["eval_omni.py", "-m", models[0], "-c", "3", "5", "-l", "0.001", "0.0005", "-r", "2",
                       "--no-freeze", "--lanes", "4", "--json", str(work / "eval_lanes.json"), *common]]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    out.append(("torchrun with two processes", 240,
                [torchrun + ["train_omni.py", *size, "--seeds", "1", "2", "--epochs", "2",
                             "--out-dir", str(work / "torchrun"), *common]]))
    if cpu:  # not a CUDA path, so not a GPU's time: the slow test that make test leaves out
        out.append(("make_comparisons.sh at tiny scale (pytest -m slow)", 300, [slow_tests]))
    return out


def refused_in_one_line(proc):
    """torchrun with two processes on one GPU is refused by each process with one `error:` line (torchrun's
    own report of the failed processes follows)."""
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    return len(lines) == 2 and all("give --nproc_per_node at most" in line for line in lines)


def run_check(name, limit, commands, log, device, data_root=None):
    """Run the commands one after another within `limit` seconds in all; True if each exits 0."""
    start = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1" if device == "cpu" else os.environ.get("OMP_NUM_THREADS", "2"),
           **({"OMNIGLOT_ROOT": data_root} if data_root else {})}
    ok = True
    with open(log, "w") as f:
        for command in commands:
            left = limit - (time.monotonic() - start)
            f.write(f"$ {shlex.join(command)}\n")
            f.flush()
            try:
                proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(left, 1))
            except subprocess.TimeoutExpired as e:
                f.write(f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {limit} s\n")
                ok = False
                break
            f.write(proc.stdout + proc.stderr)
            if proc.returncode != 0 and not (name.startswith("torchrun") and device == "cuda"
                                              and refused_in_one_line(proc)):
                f.write(f"\nexit {proc.returncode}\n")
                ok = False
                break
    return ok, time.monotonic() - start


def main(argv=None):
    args = parse_args(argv)
    data = ["--data-root", args.data_root, "--no-download"] if args.data_root else []
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    logs = Path(args.logs or tempfile.mkdtemp(prefix="gpu_check_logs_"))
    logs.mkdir(parents=True, exist_ok=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    failed = []
    print(f"gpu-check on {args.device}; each check's output in {logs}/", flush=True)
    for i, (name, limit, commands) in enumerate(checks(args.device, work, data)):
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        log = logs / f"{i:02d}_{name.replace(' ', '_').replace('/', '_')}.log"
        ok, seconds = run_check(name, limit, commands, log, args.device, args.data_root)
        print(f"{'PASS' if ok else 'FAIL'} {seconds:6.1f}s  {name}", flush=True)
        if not ok:
            failed.append(name)
            print("    " + "\n    ".join(log.read_text().splitlines()[-8:]), flush=True)
    print(f"{len(failed)} failed: {', '.join(failed)}" if failed else "all checks passed", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)  # the trainings' folders; the logs stay
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
