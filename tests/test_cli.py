"""Bad input to every script, in-process: one `error:` line naming the mistake, exit 2, no traceback,
and for what can be checked without the data, nothing loaded first. (tests/test_scripts.py checks
the same contract end to end, in real processes, for a few cases.)"""
import pytest
import torch

import anml
import bench
import eval_omni
import plot_comparisons
import plot_results
import pretrain_omni
import train_omni
from harness.cli import as_typed, run_cli
from conftest import TINY_FLAGS, assert_one_error
from model import ANML

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """Fails the test if a script loads Omniglot; the data flags point at an empty folder."""
    def load(*args, **kwargs):
        raise AssertionError("the data was loaded before the bad input was reported")
    for module in (anml, eval_omni, pretrain_omni, bench):
        monkeypatch.setattr(module, "OmniSampler", load)
    (tmp_path / "empty").mkdir()
    return ["--data-root", str(tmp_path / "empty"), "--no-download"]


def error_of(main, argv, capsys):
    """What a script prints on stderr when `main(argv)` ends with exit 2 (as `run_cli` runs it)."""
    with pytest.raises(SystemExit) as done:
        run_cli(lambda: main([str(a) for a in argv]))
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    return err


NOT_READ = ["-m", "missing.pth"]  # a model path that the argument errors must not get as far as reading
ARGUMENT_ERRORS = {  # id: (script's main, argv, expected message)
    "classes-0": (eval_omni.main, [*NOT_READ, "-c", "0"], r"--classes must be in 1\.\.659 .*got 0$"),
    "classes-660": (eval_omni.main, [*NOT_READ, "-c", "10", "660"], r"--classes must be in 1\.\.659 .*got 10 660$"),
    "train-examples-0": (eval_omni.main, [*NOT_READ, "-t", "0"], r"--train-examples must be in 1\.\.19 .*got 0"),
    "train-examples-20": (eval_omni.main, [*NOT_READ, "-t", "20"], r"--train-examples must be in 1\.\.19 .*got 20"),
    "eval-lr-0": (eval_omni.main, [*NOT_READ, "-l", "0.001", "0"], r"argument -l/--lr: must be a finite number > 0"),
    "eval-lr-inf": (eval_omni.main, [*NOT_READ, "-l", "inf"], r"argument -l/--lr: must be a finite number > 0"),
    "runs-0": (eval_omni.main, [*NOT_READ, "-r", "0"], r"argument -r/--runs: must be at least 1"),
    "selection-one-lr": (eval_omni.main, [*NOT_READ, "--selection-runs", "3"], r"give several with --lr"),
    "selection-one-ridge": (eval_omni.main, [*NOT_READ, "--method", "lstsq", "--selection-runs", "2"],
                            r"give several with --ridge"),
    "lr-with-lstsq": (eval_omni.main, [*NOT_READ, "--method", "lstsq", "-l", "0.01"], r"lstsq takes --ridge"),
    "ridge-with-seq": (eval_omni.main, [*NOT_READ, "--ridge", "1"], r"--ridge is for --method lstsq"),
    "ridge-0": (eval_omni.main, [*NOT_READ, "--method", "lstsq", "--ridge", "0"], r"argument --ridge"),
    "epochs-iid-with-seq": (eval_omni.main, [*NOT_READ, "--epochs-iid", "2"], r"--epochs-iid is for --method iid"),
    "epochs-iid-0": (eval_omni.main, [*NOT_READ, "--method", "iid", "--epochs-iid", "0"], r"argument --epochs-iid"),
    "epochs-iid-huge": (eval_omni.main, [*NOT_READ, "--method", "iid", "--epochs-iid", "1000000"],
                        r"--epochs-iid must be at most 1000, got 1000000"),
    "seed-and-seeds": (train_omni.main, [*TINY_FLAGS, "--seed", "1", "--seeds", "2", "3"],
                       r"argument --seeds: not allowed with argument --seed"),
    "original-loop-iid": (eval_omni.main, [*NOT_READ, "--method", "iid", "--original-loop"], r"only runs --method seq"),
    "method-unknown": (eval_omni.main, [*NOT_READ, "--method", "knn"], r"argument --method: invalid choice"),
    "lr-with-ncm": (eval_omni.main, [*NOT_READ, "--method", "ncm", "-l", "0.001"],
                    r"--lr is the Adam learning rate of seq and iid: --method ncm learns no rate"),
    "ridge-with-ncm": (eval_omni.main, [*NOT_READ, "--method", "ncm", "--ridge", "1"],
                       r"--ridge is for --method lstsq, not ncm"),
    "distance-with-seq": (eval_omni.main, [*NOT_READ, "--distance", "cosine"],
                          r"--distance is for --method ncm, not seq"),
    "distance-unknown": (eval_omni.main, [*NOT_READ, "--method", "ncm", "--distance", "manhattan"],
                         r"argument --distance: invalid choice: 'manhattan'"),
    "distance-twice": (eval_omni.main, [*NOT_READ, "--method", "ncm", "--distance", "cosine", "cosine"],
                       r"--distance takes distinct values among euclidean, cosine, got cosine cosine"),
    "selection-one-distance": (eval_omni.main, [*NOT_READ, "--method", "ncm", "--distance", "cosine",
                                                "--selection-runs", "2"],
                               r"chooses among distances: give several with --distance"),
    "no-freeze-lstsq": (eval_omni.main, [*NOT_READ, "--method", "lstsq", "--no-freeze"],
                        r"--no-freeze lets every parameter learn by Adam steps: it runs --method seq or iid, "
                        r"not lstsq"),
    "no-freeze-ncm": (eval_omni.main, [*NOT_READ, "--method", "ncm", "--no-freeze"],
                      r"--no-freeze .* not ncm, which learns on frozen"),
    "eval-seed-huge": (eval_omni.main, [*NOT_READ, "--seed", str(2**64)], r"--seed must be a whole number in 0\.\.4294967295"),
    "json-empty": (eval_omni.main, [*NOT_READ, "--json", ""], r"--json must name a file"),
    "model-empty": (eval_omni.main, ["-m", ""], r"-m must name a file"),
    "mask-not-9x-rln": (train_omni.main, ["--rln", "4", "--nm", "3", "--mask", "35"], r"--mask must be 36"),
    "nm-huge": (train_omni.main, ["--nm", "30000"], r"--rln 256 --nm 30000 makes a network of \d+\.\d billion parameters \(\d+ GiB of weights\)"),
    "epochs-0": (train_omni.main, ["--epochs", "0"], r"argument --epochs: must be at least 1"),
    "inner-lr-0": (train_omni.main, ["--inner-lr", "0"], r"argument --inner-lr"),
    "outer-lr-negative": (train_omni.main, ["--outer-lr", "-1e-3"], r"argument --outer-lr"),
    "time-limit-0": (train_omni.main, ["--time-limit", "0"], r"argument --time-limit"),
    "save-minutes-0": (train_omni.main, ["--save-minutes", "0"], r"argument --save-minutes"),
    "train-seed-huge": (train_omni.main, [*TINY_FLAGS, "--seed", str(2**64)],
                        r"--seed must be a whole number in 0\.\.4294967295, got 18446744073709551616"),
    "first-order-higher": (train_omni.main, [*TINY_FLAGS, "--first-order", "--backend", "higher"], r"not by higher"),
    "graph-on-cpu": (train_omni.main, [*TINY_FLAGS, "--backend", "graph", "-d", "cpu"], r"--backend graph .* -d cuda"),
    "out-dir-empty": (train_omni.main, [*TINY_FLAGS, "--out-dir", ""], r"--out-dir must name a folder"),
    "threads-0": (train_omni.main, [*TINY_FLAGS, "--threads", "0"], r"argument --threads: must be at least 1"),
    "pretrain-batch-0": (pretrain_omni.main, ["--batch-size", "0"], r"argument --batch-size"),
    "pretrain-mask": (pretrain_omni.main, ["--rln", "4", "--nm", "3", "--mask", "35"], r"--mask must be 36"),
    "pretrain-lr-0": (pretrain_omni.main, ["--lr", "0"], r"argument --lr"),
    "pretrain-out-dir-empty": (pretrain_omni.main, [*TINY_FLAGS, "--out-dir", " "], r"--out-dir must name a folder"),
    "bench-mask": (bench.main, ["--rln", "4", "--nm", "3", "--mask", "35"], r"--mask must be 36"),
    "bench-classes": (bench.main, [*TINY_FLAGS, "--classes", "0"], r"--classes must be in 1\.\.659"),
}


@pytest.mark.parametrize("case", ARGUMENT_ERRORS)
def test_argument_errors_are_one_line_before_any_data(case, no_data, capsys):
    main, argv, expected = ARGUMENT_ERRORS[case]
    assert_one_error(error_of(main, [*argv, *no_data], capsys), expected)


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
@pytest.mark.parametrize("main", [train_omni.main, eval_omni.main, pretrain_omni.main])
def test_asking_for_cuda_without_it_is_one_line(main, no_data, capsys):
    argv = [*NOT_READ] if main is eval_omni.main else []
    assert_one_error(error_of(main, [*argv, "-d", "cuda", *no_data], capsys),
                     r"-d cuda: CUDA is not available on this machine \(use -d cpu\)")


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    """A text file, a state_dict of the wrong shapes, one with a key missing, one with a NaN."""
    tmp = tmp_path_factory.mktemp("models")
    (tmp / "text.pth").write_text("not a checkpoint\n")
    (tmp / "empty.pth").write_bytes(b"")
    reshaped = ANML(8, 3, 72).state_dict()
    reshaped["fc.weight"] = reshaped["fc.weight"].reshape(2000, 36)
    torch.save(reshaped, tmp / "reshaped.pth")
    missing_keys = ANML(4, 3, 36).state_dict()
    del missing_keys["nm.fc.bias"]
    torch.save(missing_keys, tmp / "missing_keys.pth")
    nan = ANML(4, 3, 36).state_dict()
    nan["rln.convBlock1.conv.weight"][0] = float("nan")
    torch.save(nan, tmp / "nan.pth")
    torch.save(ANML(4, 3, 36).state_dict(), tmp / "model.pth")
    return tmp


@pytest.mark.parametrize("name, expected", [
    ("missing", r"model file not found: .*missing\.pth"),
    ("text", r"text\.pth is not a PyTorch checkpoint"),
    ("empty", r"empty\.pth is not a PyTorch checkpoint"),
    ("reshaped", r"reshaped\.pth does not fit the ANML architecture: mask size 36 does not fit"),
    ("missing_keys", r"missing_keys\.pth does not fit the ANML architecture: .*nm\.fc\.bias"),
    ("nan", r"nan\.pth holds non-finite weights \(NaN or inf in rln\.convBlock1\.conv\.weight\)"),
])
def test_a_bad_checkpoint_is_one_line_before_any_data(bad_models, name, expected, no_data, capsys):
    assert_one_error(error_of(eval_omni.main, ["-m", bad_models / f"{name}.pth", *no_data], capsys), expected)


def test_a_folder_or_the_same_weights_twice_is_one_line_before_any_data(bad_models, tmp_path, no_data, capsys):
    """-m FOLDER names it a folder; -m M M, or a copy of M, counts the same model twice: refused."""
    assert_one_error(error_of(eval_omni.main, ["-m", bad_models, *no_data], capsys),
                     r"models0 is a folder, not a model file")
    model = bad_models / "model.pth"
    (tmp_path / "copy.pth").write_bytes(model.read_bytes())
    for second in (model, tmp_path / "copy.pth"):
        assert_one_error(error_of(eval_omni.main, ["-m", model, second, *no_data], capsys),
                         rf"-m: {model} and {second} hold the same weights: give each model once")


def test_output_paths_are_checked_before_any_data(bad_models, tmp_path, no_data, capsys):
    model = ["-m", bad_models / "model.pth"]
    assert_one_error(error_of(eval_omni.main, [*model, "--json", tmp_path, *no_data], capsys),
                     rf"--json {tmp_path} is a folder: give a file name")
    assert_one_error(error_of(eval_omni.main, [*model, "--json", "/proc/anml.json", *no_data], capsys),
                     r"cannot write --json /proc/anml\.json")
    assert_one_error(error_of(eval_omni.main, [*model, "--json", bad_models / "text.pth" / "r.json", *no_data], capsys),
                     r"cannot write --json .*r\.json: .*text\.pth is a file, not a folder")
    for main in (train_omni.main, pretrain_omni.main):
        assert_one_error(error_of(main, [*TINY_FLAGS, "--out-dir", bad_models / "text.pth", *no_data], capsys),
                         r"--out-dir .*text\.pth is not a folder")
        assert_one_error(error_of(main, [*TINY_FLAGS, "--out-dir", "/proc/anml", *no_data], capsys),
                         r"cannot write to --out-dir /proc/anml")


def test_the_shipped_files_are_never_written_by_a_training(no_data, capsys):
    """The folder of the shipped model and baseline holds their files but no resumable checkpoint: a
    new run of either kind there is refused before any data is loaded, and nothing changes."""
    from harness.cli import REPO
    shipped = REPO / "trained_anmls"
    before = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()}
    assert_one_error(error_of(train_omni.main, ["--out-dir", shipped, *no_data], capsys),
                     r"already holds files of another ANML run of 256_112_2304 \(256_112_2304_ANML-21678\.pth, "
                     r"256_112_2304_train_log\.csv\): a new run there would overwrite or mix with them")
    assert_one_error(error_of(pretrain_omni.main, ["--out-dir", shipped, *no_data], capsys),
                     r"already holds files of another pretrain run of 256_112_2304")
    assert {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} == before


def test_resume_latest_without_a_run_is_one_line_before_any_data(tmp_path, no_data, capsys):
    assert_one_error(error_of(train_omni.main, [*TINY_FLAGS, "--out-dir", tmp_path, "--resume", "latest", *no_data],
                              capsys), rf"--resume latest: no 4_3_36_ANML-\*_resume\.pt in {tmp_path}")
    assert_one_error(error_of(pretrain_omni.main, [*TINY_FLAGS, "--out-dir", tmp_path, "--resume", "latest",
                                                   *no_data], capsys),
                     rf"--resume latest: no 4_3_36_pretrain-\*_resume\.pt in {tmp_path}")


def test_plot_scripts_refuse_bad_files_in_one_line(tmp_path, capsys):
    """Missing, empty, non-JSON and malformed results files, and an empty or missing log."""
    bad = {"null.json": "null", "empty_rows.json": '{"rows": []}', "keys.json": '{"rows": [{"classes": 10}]}',
           "none.json": '{"rows": [{"classes": 10, "best_on_reported_runs": {"test_mean": null}}]}',
           "text.json": "not json"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    expected = {"null.json": "holds NoneType, not an object", "empty_rows.json": "it has no rows",
                "keys.json": "the row of 10 classes has no 'best_on_reported_runs'",
                "none.json": "has no finite 'test_mean' \\(got None\\)", "text.json": "is not JSON"}
    for name, message in expected.items():
        err = error_of(plot_results.main, ["--results", tmp_path / name, "--out-dir", tmp_path, "--baselines"], capsys)
        assert_one_error(err, message)
        assert_one_error(error_of(plot_comparisons.main, [tmp_path / name, "-o", tmp_path / "c.png"], capsys), message)
    assert_one_error(error_of(plot_results.main, ["--results", tmp_path / "nothing.json", "--baselines"], capsys),
                     r"results file not found: .*nothing\.json \(make it with eval_omni\.py --json\)")
    (tmp_path / "log.csv").write_text("")
    good = tmp_path / "good.json"
    good.write_text('{"rows": [{"classes": 10, "best_on_reported_runs": {"test_mean": 0.9, "test_std": 0.1, '
                    '"train_mean": 1.0, "train_std": 0.0}}]}')
    assert_one_error(error_of(plot_results.main, ["--results", good, "--log", tmp_path / "log.csv", "--out-dir",
                                                  tmp_path, "--baselines"], capsys), r"log\.csv is not a train_omni\.py log")
    assert_one_error(error_of(plot_comparisons.main, [good, "-o", ""], capsys), r"-o must name a file")
    assert_one_error(error_of(plot_comparisons.main, [good, "-o", tmp_path], capsys), r"is a folder")


def test_the_recorded_command_is_what_a_user_types_again(tmp_path):
    from harness.cli import REPO
    argv = ["-m", str(REPO / "trained_anmls" / "x.pth"), "-c", "10", "--data-root", "/data/omni", "--no-download",
            "--json", str(tmp_path / "scratch" / "out.json"), "-l", "0.001", "--data-root=/elsewhere"]
    assert as_typed("/usr/bin/eval_omni.py", argv, paths=("-m", "--json"), dropped=("--data-root", "--no-download")) \
        == "python eval_omni.py -m trained_anmls/x.pth -c 10 --json out.json -l 0.001"


def test_a_restarted_process_of_a_shared_meta_batch_says_what_to_run(monkeypatch, no_data, capsys):
    """Processes that share one run's --meta-batch cannot reconnect after torchrun restarts them: each
    says so in one line, with the command that continues the run, before it joins any group."""
    for key, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"),
                       ("TORCHELASTIC_RESTART_COUNT", "1")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(train_omni, "join_processes", lambda *a, **k: pytest.fail("joined a process group"))
    err = error_of(train_omni.main, [*TINY_FLAGS, "--meta-batch", "2", "-d", "cpu", *no_data], capsys)
    assert_one_error(err, r"cannot reconnect after one of them died: run the same command again with --resume latest")


def test_gate_stats_refuses_an_oml_checkpoint_in_one_line_before_any_data(tmp_path, monkeypatch, capsys):
    """OML's network has no NM gate: tools/gate_stats.py names the file and says so (exit 2), whether
    it is given alone or among ANML checkpoints, before it loads Omniglot."""
    from model import seeded_oml
    from tools import gate_stats
    monkeypatch.setattr(gate_stats, "OmniSampler", lambda *a, **k: pytest.fail("the data was loaded"))
    oml, anml_path = tmp_path / "4_OML-0.pth", tmp_path / "4_3_36_ANML-0.pth"
    torch.save(seeded_oml(4, 0).state_dict(), oml)
    torch.save(ANML(4, 3, 36).state_dict(), anml_path)
    for models in ([oml], [anml_path, oml]):
        err = error_of(gate_stats.main, [*models, "--data-root", tmp_path], capsys)
        assert_one_error(err, rf"{oml} holds OML's network, which has no NM gate to measure: give ANML checkpoints")


@pytest.mark.parametrize("main", [train_omni.main, eval_omni.main, pretrain_omni.main, bench.main])
def test_more_threads_than_the_machine_has_cpus_is_one_line(main, no_data, capsys):
    """--threads 100000 made torch crash (exit 139, no message): at most the machine's CPUs."""
    import os
    argv = [*NOT_READ] if main is eval_omni.main else [*TINY_FLAGS]
    err = error_of(main, [*argv, "--threads", 100000, *no_data], capsys)
    assert_one_error(err, rf"argument --threads: must be at most {os.cpu_count()} \(this machine's CPUs\), "
                          rf"got 100000$")


def test_the_configs_refuse_more_threads_than_cpus_and_take_as_many():
    import os
    from harness.config import MetaTrainConfig
    from protocol import ConfigError
    with pytest.raises(ConfigError, match=rf"--threads must be at most {os.cpu_count()} \(this machine's CPUs\)"):
        MetaTrainConfig(threads=100000)
    assert train_omni.parse_args([*TINY_FLAGS, "-d", "cpu", "--threads", str(os.cpu_count())])[0].threads == \
        os.cpu_count()


def test_the_start_ups_quiet_exit_gives_way_to_pythons_handlers_after_main():
    """quiet_start's immediate exit is for the start only: once run_cli's main has returned, a stop
    signal (say, during the interpreter's shutdown) meets Python's own handlers again."""
    import signal
    from harness.cli import run_cli
    from harness.quiet_start import STOP_SIGNALS, quiet_start, stop_quietly
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        for sig in STOP_SIGNALS:  # as a script starts (a test runner may have set its own)
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        quiet_start()
        assert all(signal.getsignal(sig) is stop_quietly for sig in STOP_SIGNALS)
        run_cli(lambda: None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- model files, by their content

SHIPPED = "trained_anmls/256_112_2304_ANML-21678.pth"


@pytest.fixture(scope="module")
def not_models(tmp_path_factory):
    """Files a user may give as --model by mistake, made from the project's real files: the training
    CSV, a text file, the shipped checkpoint cut short, a zip of arrays, other bytes, a state_dict of
    another network, a whole pickled network, an empty file."""
    import shutil
    import numpy as np
    from harness.cli import REPO
    tmp = tmp_path_factory.mktemp("not_models")
    shutil.copy(REPO / "trained_anmls" / "256_112_2304_train_log.csv", tmp / "train_log.csv")
    (tmp / "notes.txt").write_text("\n  ANML notes: the model is in trained_anmls/\n")
    with open(REPO / SHIPPED, "rb") as f:
        (tmp / "cut.pth").write_bytes(f.read(1 << 20))
    np.savez(tmp / "arrays.npz", x=np.zeros(3))
    (tmp / "image.pth").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    torch.save(torch.nn.Linear(2, 3).state_dict(), tmp / "linear.pth")
    torch.save(ANML(4, 3, 36), tmp / "pickled.pth")
    torch.save({"iteration": 3, "loss": 0.5}, tmp / "numbers.pth")
    (tmp / "empty.pth").write_bytes(b"")
    return tmp


@pytest.mark.parametrize("name, expected", [
    ("train_log.csv", r"train_log\.csv is not a PyTorch checkpoint but a CSV file \(header "
                      r"`iteration,loss,accuracy,seconds`, a training log\): give a model file"),
    ("notes.txt", r"notes\.txt is not a PyTorch checkpoint but a text file \(first line `ANML notes: the model "
                  r"is in trained_anmls/`\)"),
    ("cut.pth", r"cut\.pth is a truncated or damaged PyTorch checkpoint \(its zip archive does not read"),
    ("arrays.npz", r"arrays\.npz is a zip archive, not a PyTorch checkpoint \(it holds no data\.pkl\)"),
    ("image.pth", r"image\.pth is not a PyTorch checkpoint but a binary file of another kind \(it starts with "
                  r"89 50 4e 47"),
    ("linear.pth", r"linear\.pth is a state_dict of another network \(keys weight, bias\), not of an ANML"),
    ("pickled.pth", r"pickled\.pth is a PyTorch file that holds Python objects other than tensors \(a whole "
                    r"pickled model\?\), not a state_dict"),
    ("numbers.pth", r"numbers\.pth holds a dict without tensors \(keys iteration, loss\), not a state_dict"),
    ("empty.pth", r"empty\.pth is not a PyTorch checkpoint but an empty file \(0 bytes\)"),
])
def test_a_file_that_is_no_model_is_named_by_its_content_in_one_line(not_models, name, expected):
    """Judged by content, whatever the name; one line naming the file, never PyTorch's advice about
    weights_only, which a user of these scripts cannot act on."""
    import re
    from harness.checkpoints import load_model
    with pytest.raises(ValueError) as failure:
        load_model(not_models / name)
    message = str(failure.value)
    assert re.match(rf"{re.escape(str(not_models))}/{expected}", message), message
    assert "\n" not in message and "weights_only" not in message


def test_higheranmls_checkpoint_name_names_the_shipped_model(no_data, monkeypatch, capsys):
    """-m trained_anmls/256_112_2304_ANML-29999.pth (higherANML's README) is not shipped: the error
    names the checkpoint that is, and its iterations (read from its name)."""
    from harness.cli import REPO
    monkeypatch.chdir(REPO)
    err = error_of(eval_omni.main, ["-m", "trained_anmls/256_112_2304_ANML-29999.pth", *no_data], capsys)
    line = assert_one_error(err, "model file not found")
    assert line == ("error: model file not found: trained_anmls/256_112_2304_ANML-29999.pth (higherANML's name for "
                    "its 30,000-iteration model; the model shipped here is trained_anmls/256_112_2304_ANML-21678.pth, "
                    "21,679 iterations)")


def test_a_remembered_data_root_that_is_gone_is_one_line(bad_models, tmp_path, monkeypatch, capsys):
    """eval_omni.py with no data flag, after the root an earlier run read was deleted: one line naming it."""
    monkeypatch.setenv("HIGHERANML_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("OMNIGLOT_ROOT", raising=False)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "omniglot_root.txt").write_text(f"{tmp_path / 'omniglot'}\n")
    err = error_of(eval_omni.main, ["-m", bad_models / "model.pth", "--no-download"], capsys)
    assert_one_error(err, rf"^error: the remembered data root {tmp_path / 'omniglot'} \(kept in "
                          rf"{tmp_path / 'cache' / 'omniglot_root.txt'}\) does not exist .*: give --data-root DIR "
                          rf"\(or set OMNIGLOT_ROOT=DIR\) .*, or remove .*omniglot_root\.txt to use the per-user cache")
