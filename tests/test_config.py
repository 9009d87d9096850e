"""The configurations: what each checks, what a run records and compares, and the derived values."""
import dataclasses

import pytest

from harness.config import EvalConfig, MetaTrainConfig, PretrainConfig, resolve_backend
from model import ANML
from protocol import ConfigError, check_sizes, parameter_count


@pytest.mark.parametrize("sizes", [(4, 3, 36), (8, 4, 72), (256, 112, 2304), (16, 1, 144)])
def test_parameter_count_is_the_networks(sizes):
    assert parameter_count(*sizes) == sum(p.numel() for p in ANML(*sizes).parameters())
    assert parameter_count(256, 112, 2304) == 6_041_800


@pytest.mark.parametrize("sizes, message", [
    ((256, 112, 2000), "mask size 2000 does not fit: the RLN with 256 channels gives 9 x 256 = 2304 features"),
    ((4, 3, 37), "--mask must be 36"),
    ((0, 3, 0), "--rln must be a positive integer, got 0"),
    ((4, 0, 36), "--nm must be a positive integer, got 0"),
    ((4, 3.0, 36), "--nm must be a positive integer, got 3.0"),
    ((256, 30000, 2304), "makes a network of 16.8 billion parameters (63 GiB of weights): at most 1,000,000,000"),
])
def test_sizes_the_network_cannot_have_are_refused_with_the_reason(sizes, message):
    with pytest.raises(ConfigError) as error:
        check_sizes(*sizes)
    assert message in str(error.value)
    with pytest.raises(ConfigError):
        MetaTrainConfig(rln=sizes[0], nm=sizes[1], mask=sizes[2])


def test_backend_resolution():
    assert resolve_backend("auto", "cuda") == "graph" and resolve_backend("auto", "cpu") == "func"
    assert resolve_backend("higher", "cuda") == "higher"
    with pytest.raises(ConfigError, match="unknown backend 'jax'"):
        resolve_backend("jax", "cpu")
    assert MetaTrainConfig(device="cpu").resolved_backend == "func"


def test_meta_train_config_checks_and_records():
    config = MetaTrainConfig(rln=4, nm=3, mask=36, epochs=5, seed=2**32 - 1, out_dir="x")
    assert config.name == "4_3_36" and config.total_steps == 5 and config.epochs_for(7) == 7
    assert config.run_settings() == {"arch": "anml", "rln": 4, "nm": 3, "mask": 36, "inner_lr": 0.1, "outer_lr": 1e-3,
                                     "seed": 2**32 - 1, "backend": "auto", "first_order": False, "meta_batch": 1,
                                     "epochs": 5}
    recorded = config.as_dict()
    assert recorded["out_dir"] == "x" and recorded["device"] == "cpu" and recorded["rln"] == 4
    assert MetaTrainConfig(**recorded) == config  # recorded whole: it rebuilds the same configuration
    for bad, message in [(dict(seed=2**32), "--seed must be a whole number"), (dict(seed=-1), "--seed"),
                         (dict(epochs=0), "--epochs must be a whole number > 0"),
                         (dict(inner_lr=float("nan")), "--inner-lr must be a finite number > 0"),
                         (dict(outer_lr=0.0), "--outer-lr"), (dict(time_limit=-1.0), "--time-limit"),
                         (dict(save_minutes=0), "--save-minutes"), (dict(out_dir=""), "--out-dir must name"),
                         (dict(first_order=True, backend="higher"), "not by higher"),
                         (dict(backend="graph", device="cpu"), "needs -d cuda"), (dict(device="tpu"), "-d must be"),
                         (dict(threads=0), "--threads")]:
        with pytest.raises(ConfigError, match=message):
            MetaTrainConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3


def test_pretrain_config_counts_steps_in_epochs():
    config = PretrainConfig(rln=4, nm=3, mask=36, epochs=2, batch_size=1024)
    assert config.steps_per_epoch == 19 and config.total_steps == 38  # 19,280 images, the last batch partial
    assert config.epochs_for(38) == 2 and config.epochs_for(39) == 3
    assert set(config.run_settings()) == {"rln", "nm", "mask", "lr", "batch_size", "lobotomize", "seed", "epochs",
                                          "schedule", "zap", "open_gate", "conv_init"}  # not asb's episodes, seq_lr
    assert (config.kind, config.unit, config.length_flag) == ("pretrain", "step", "--epochs")
    asb = PretrainConfig(rln=4, nm=3, mask=36, schedule="asb", episodes=30)
    assert (asb.kind, asb.log_name, asb.unit, asb.total_steps, asb.epochs_for(31)) == ("asb", "asb_log", "episode", 30, 31)
    with pytest.raises(ConfigError, match="--batch-size"):
        PretrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="unknown --schedule 'sgd'"):
        PretrainConfig(schedule="sgd")
    with pytest.raises(ConfigError, match="unknown --conv-init 'xavier': choose one of torch, kaiming"):
        PretrainConfig(conv_init="xavier")
    with pytest.raises(ConfigError, match="--lobotomize is the iid schedule's"):
        PretrainConfig(schedule="asb", lobotomize=True)


def test_an_oml_run_is_named_by_its_channels_and_checked_as_oml():
    config = MetaTrainConfig(arch="oml", rln=8, nm=3, mask=35)  # ANML's sizes play no part
    assert (config.name, config.kind) == ("8", "OML")
    with pytest.raises(ConfigError, match="makes a network of"):
        MetaTrainConfig(arch="oml", rln=100000)
    with pytest.raises(ConfigError, match="unknown --arch"):
        MetaTrainConfig(arch="maml")


def test_eval_config_grid_and_method_flags():
    seq = EvalConfig(model="m.pth", classes=(100, 10, 10))
    assert seq.classes == (10, 100) and seq.grid == (1e-3,) and seq.hyperparameter == "lr"
    lstsq = EvalConfig(model="m.pth", method="lstsq", ridges=(0.1, 10.0))
    assert lstsq.grid == (0.1, 10.0) and lstsq.hyperparameter == "ridge" and lstsq.lrs is None
    assert EvalConfig(model="m.pth", method="iid").iid_epochs == 1
    ncm = EvalConfig(model="m.pth", method="ncm")
    assert ncm.grid == ("euclidean",) and ncm.hyperparameter == "distance"
    assert EvalConfig(model="m.pth", method="ncm", selection_runs=3).grid == ("euclidean", "cosine")
    assert EvalConfig(model="m.pth", method="ncm", distances=["cosine"]).grid == ("cosine",)
    for method in ("seq", "iid"):
        assert EvalConfig(model="m.pth", method=method, no_freeze=True).no_freeze
    assert EvalConfig(model="m.pth", no_freeze=True, original_loop=True).grid == (1e-3,)  # the same loop
    assert EvalConfig(model="m.pth", train_examples=12).test_examples == 8
    for bad, message in [(dict(classes=()), "--classes must be in 1..659"), (dict(classes=(0, 5)), "got 0 5"),
                         (dict(method="lstsq", lrs=(0.1,)), "takes --ridge"), (dict(ridges=(1.0,)), "--ridge is for"),
                         (dict(lrs=(0.0,)), "--lr must be a finite number > 0"),
                         (dict(method="lstsq", ridges=(float("inf"),)), "--ridge must be a finite"),
                         (dict(epochs_iid=2), "--epochs-iid is for --method iid"),
                         (dict(method="iid", epochs_iid=1001), "at most 1000"),
                         (dict(selection_runs=2), "give several with --lr"), (dict(runs=0), "--runs"),
                         (dict(train_examples=20), "--train-examples must be in 1..19"),
                         (dict(original_loop=True, method="iid"), "only runs --method seq"),
                         (dict(method="ncm", lrs=(0.1,)), "--method ncm learns no rate"),
                         (dict(method="ncm", distances=("cityblock",)), "--distance takes distinct values"),
                         (dict(method="ncm", distances=()), "got none"),
                         (dict(distances=("cosine",)), "--distance is for --method ncm, not seq"),
                         (dict(method="lstsq", no_freeze=True), "it runs --method seq or iid, not lstsq"),
                         (dict(method="ncm", no_freeze=True), "it runs --method seq or iid, not ncm"),
                         (dict(model=""), "-m must name a file"), (dict(json=""), "--json must name a file")]:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
            EvalConfig(**{"model": "m.pth", **bad})


def test_several_seeds_and_rates_are_one_run_each_in_its_own_folder():
    config = MetaTrainConfig(rln=4, nm=3, mask=36, seeds=(1, 2), outer_lrs=(1e-3, 3e-3), out_dir="runs")
    runs = config.members()
    assert [(r.seed, r.outer_lr, r.out_dir) for r in runs] == [
        (1, 1e-3, "runs/seed1_outer-lr0.001"), (1, 3e-3, "runs/seed1_outer-lr0.003"),
        (2, 1e-3, "runs/seed2_outer-lr0.001"), (2, 3e-3, "runs/seed2_outer-lr0.003")]
    assert all(not r.several and r.inner_lr == 0.1 for r in runs)
    assert [r.out_dir for r in MetaTrainConfig(seeds=(7,), out_dir="x").members()] == ["x/seed7"]
    assert MetaTrainConfig(out_dir="x").members()[0].out_dir == "x"


def test_runs_are_the_same_whatever_order_they_are_given_in_and_rates_that_print_alike_get_their_own_folder():
    """--seeds 2 1 trains (and resumes) the runs of --seeds 1 2, in one order; 0.001 and 0.0010000001
    are two runs in two folders."""
    runs = lambda **kw: [(r.seed, r.outer_lr, r.out_dir) for r in MetaTrainConfig(out_dir="r", **kw).members()]
    assert runs(seeds=(2, 1), outer_lrs=(3e-3, 1e-3)) == runs(seeds=(1, 2), outer_lrs=(1e-3, 3e-3))
    folders = [r[2] for r in runs(outer_lrs=(1e-3, 0.0010000001, 1e9, 3e-5))]
    assert folders == ["r/seed1_outer-lr3e-05", "r/seed1_outer-lr0.001", "r/seed1_outer-lr0.0010000001",
                       "r/seed1_outer-lr1e+09"]


def test_a_switch_left_off_reads_naturally_in_the_resume_messages():
    """A switch that is off is `--open-gate off`: never "not no --open-gate", nor "--backend auto no --first-order"."""
    from harness.run_start import check_settings
    gated = PretrainConfig(rln=4, nm=3, mask=36, open_gate=False)
    stored = {**dataclasses.replace(gated, open_gate=True).run_settings()}
    with pytest.raises(ValueError, match=r"was trained with --open-gate, not --open-gate off: ") as error:
        check_settings(stored, gated, "run_resume.pt")
    assert "no --" not in str(error.value)
    with pytest.raises(ValueError, match=r"cannot be checked against .*--backend auto --first-order off ") as error:
        check_settings(None, MetaTrainConfig(rln=4, nm=3, mask=36), "old_resume.pt")
    assert "no --" not in str(error.value)


def test_a_diverged_pretraining_names_the_rates_of_its_schedule():
    assert PretrainConfig(schedule="asb").diverged_rates == "--seq-lr or --lr"
    assert PretrainConfig(schedule="iid").diverged_rates == "--lr"
    assert MetaTrainConfig().diverged_rates == "--outer-lr"
