"""bench.py as a user runs it: a smoke test on a tiny network (no timing assertions)."""
import re

import pytest

from conftest import run, script_env

ROW = r"^(\S+)\s+([\d.]+)ms\s+([\d.]+)x\s+\d+MiB$"


def test_bench_prints_every_case_with_ratios(omniglot_root):
    proc = run("bench.py", "--rln", 4, "--nm", 3, "--mask", 36, "--iters", 1, "--classes", 3, "-d", "cpu",
               "--data-root", omniglot_root, env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("device: ")
    rows = {case: (float(ms), float(ratio)) for case, ms, ratio in re.findall(ROW, proc.stdout, re.M)}
    assert set(rows) == {"iteration-higher", "iteration-func", "meta-test-seed", "meta-test-fast"}
    for case, (ms, ratio) in rows.items():  # each ratio is its comparison's seed-style time over its own
        baseline = rows["iteration-higher" if case.startswith("iteration") else "meta-test-seed"][0]
        assert ratio == pytest.approx(baseline / ms, abs=0.051 + 0.0005 * baseline / ms)


def test_bench_bad_input_is_one_clear_error(tmp_path):
    proc = run("bench.py", "--mask", 35, "--rln", 4, "--data-root", tmp_path, "--no-download", env=script_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--mask must be 36" in errors[0], proc.stderr
    missing = run("bench.py", "--rln", 4, "--nm", 3, "--mask", 36, "--data-root", tmp_path, "--no-download",
                  env=script_env())
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Omniglot not found" in errors[0], missing.stderr
