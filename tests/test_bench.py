"""bench.py as a user runs it: a smoke test on a tiny network (no timing assertions)."""
import re

from test_scripts import run, script_env


def test_bench_prints_every_case_with_ratios(omniglot_root):
    proc = run("bench.py", "--rln", 4, "--nm", 3, "--mask", 36, "--iters", 1, "--classes", 3, "-d", "cpu",
               "--data-root", omniglot_root, env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("device: ")
    rows = dict(re.findall(r"^(\S+)\s+[\d.]+ms\s+([\d.]+)x\s+\d+MiB$", proc.stdout, re.M))
    assert set(rows) == {"iteration-higher", "iteration-func", "meta-test-seed", "meta-test-fast"}
    assert rows["iteration-higher"] == rows["meta-test-seed"] == "1.0"
