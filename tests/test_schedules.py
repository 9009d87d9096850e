"""Pretraining's schedules (`pretrain_omni.py`): alternating sequential and batch learning (ASB) and
zapping, against direct computations."""
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anml
import pretrain_omni
from harness.config import PretrainConfig
from conftest import INNER_LR, TINY
from model import seeded_network


def episode(sampler, seed=4):
    sampler.rng = np.random.default_rng(seed)
    train_data, train_class, (valid_ims, valid_labels) = sampler.sample_train()
    return [(im.double(), label) for im, label in train_data], train_class, (valid_ims.double(), valid_labels)


def reference_episode(model, batch, zap):
    """ASB written plainly: the class row re-initialised (if zap), one torch.optim.SGD step per image
    over the RLN and the last layer, then one Adam step over everything on the episode's batch."""
    train_data, train_class, (valid_ims, valid_labels) = batch
    if zap:
        anml.lobotomize(model.fc, train_class)
    sgd = torch.optim.SGD([p for n, p in model.named_parameters() if n.startswith(("rln.", "fc."))], lr=INNER_LR)
    for im, label in train_data:
        sgd.zero_grad()
        F.cross_entropy(model(im), label).backward()
        sgd.step()
    after_sequence = copy.deepcopy(model.state_dict())
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    adam.zero_grad()
    F.cross_entropy(model(valid_ims), valid_labels).backward()
    adam.step()
    return after_sequence


@pytest.mark.parametrize("zap", [False, True])
def test_an_asb_episode_is_sequential_sgd_then_one_batch_adam_step(sampler, zap):
    batch = episode(sampler)
    start = seeded_network(*TINY.values(), 3).double()
    reference, ours = copy.deepcopy(start), copy.deepcopy(start)
    torch.manual_seed(9)
    after_sequence = reference_episode(reference, batch, zap)
    torch.manual_seed(9)
    pretrain_omni.asb_episode(ours, torch.optim.Adam(ours.parameters(), lr=1e-3), batch, INNER_LR, zap)
    for name, p in ours.state_dict().items():
        torch.testing.assert_close(p, reference.state_dict()[name], rtol=1e-12, atol=1e-14)
    for name, p in start.state_dict().items():  # the sequence adapts the RLN and fc, not the NM
        moved = (after_sequence[name] - p).abs().max()
        if name.startswith("nm."):
            assert moved == 0, name
        elif not name.endswith("conv.bias"):  # a norm removes those biases: their gradient is rounding
            assert moved > 1e-6, name


class FewClasses:
    """The sampler's first 50 background classes: an epoch of pretraining in a moment."""

    def __init__(self, sampler):
        self.background, self.rng = sampler.background[:50], sampler.rng


def test_iid_zapping_draws_the_last_layer_afresh_every_epoch(sampler, tmp_path, monkeypatch):
    """With an Adam rate too small to move anything, a zapping run's last layer ends as a new Kaiming
    draw, the other weights where they started; without zapping the last layer stays put."""
    from harness import config
    monkeypatch.setattr(config, "NUM_BACKGROUND", 50)
    finals = {}
    for zap in (False, True):
        settings = PretrainConfig(**TINY, epochs=2, batch_size=500, lr=1e-12, zap=zap, out_dir=str(tmp_path / str(zap)))
        [model], _, _ = pretrain_omni.pretrain(settings, FewClasses(sampler), quiet=True)
        finals[zap] = model.state_dict()
    start = seeded_network(*TINY.values(), 1).state_dict()
    for name in start:
        if name != "fc.weight":
            torch.testing.assert_close(finals[True][name], start[name], atol=1e-9, rtol=0)
    torch.testing.assert_close(finals[False]["fc.weight"], start["fc.weight"], atol=1e-9, rtol=0)
    drawn = finals[True]["fc.weight"]
    assert (drawn - start["fc.weight"]).abs().mean() > 0.1
    assert drawn.std().item() == pytest.approx(anml.kaiming_std(drawn), rel=0.05)


def test_an_open_gate_passes_every_feature_and_never_moves(sampler, tmp_path):
    """--open-gate: the NM outputs exactly 1 on real images, so the network is fc(rln(x)); ASB episodes
    (and the Adam steps over everything) leave every NM weight exactly where it was, while the RLN and
    the last layer learn; the checkpoint is an ANML that any script reads, its gate still open."""
    from harness.checkpoints import load_model
    settings = PretrainConfig(**TINY, schedule="asb", zap=True, episodes=3, open_gate=True, out_dir=str(tmp_path))
    start = pretrain_omni.initial_model(settings)
    gated = pretrain_omni.initial_model(PretrainConfig(**TINY, schedule="asb"))
    sampler.rng = np.random.default_rng(0)
    [model], _, _ = pretrain_omni.pretrain(settings, sampler, quiet=True)
    ims = sampler.evaluation[:4, :3].flatten(0, 1)
    with torch.no_grad():
        assert torch.equal(model.nm(ims), torch.ones(len(ims), TINY["mask"]))
        assert torch.equal(model(ims), model.fc(model.rln(ims)))
        assert torch.equal(model.double().nm(ims.double()), torch.ones(len(ims), TINY["mask"], dtype=torch.float64))
    model.float()
    for name, p in start.state_dict().items():
        moved = (model.state_dict()[name] - p).abs().max()
        assert (moved == 0) if name.startswith("nm.") else (moved > 1e-6 or name.endswith("conv.bias")), name
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from gate_stats import gate_statistics
    mean, above, norm = gate_statistics(model, ims)
    assert (mean, above) == (1.0, 1.0) and norm == pytest.approx(model.rln(ims).pow(2).sum(1).mean().item())
    assert gate_statistics(start.float(), ims)[:2] == (1.0, 1.0)
    assert gate_statistics(gated, ims)[0] < 0.9  # a gate that learns starts half open
    saved = load_model(tmp_path / "4_3_36_asb-2.pth")
    with torch.no_grad():
        assert torch.equal(saved.nm(ims), torch.ones(len(ims), TINY["mask"]))
    assert all(torch.equal(p, gated.state_dict()[n]) for n, p in start.state_dict().items() if not n.startswith("nm.fc"))


def test_kaiming_convs_draw_every_convolution_as_frati_et_al_and_nothing_else():
    """--conv-init kaiming: each convolution's weight is a fresh draw of std sqrt(2 / fan_in), about
    sqrt(6) times PyTorch's default; biases, norms and the linear layers are the default network's,
    and the same seed draws the same network."""
    sizes = dict(rln=32, nm=8, mask=288)
    default = pretrain_omni.initial_model(PretrainConfig(**sizes, schedule="asb")).state_dict()
    kaiming = pretrain_omni.initial_model(PretrainConfig(**sizes, schedule="asb", conv_init="kaiming")).state_dict()
    again = pretrain_omni.initial_model(PretrainConfig(**sizes, schedule="asb", conv_init="kaiming")).state_dict()
    convs = [name for name in default if name.endswith("conv.weight")]
    assert len(convs) == 6
    for name, p in kaiming.items():
        assert torch.equal(p, again[name]), name
        if name in convs:
            fan_in = p[0].numel()
            assert p.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1), name
            assert default[name].std().item() == pytest.approx((1 / (3 * fan_in)) ** 0.5, rel=0.1), name
        else:
            assert torch.equal(p, default[name]), name
