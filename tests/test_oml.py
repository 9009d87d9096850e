"""OML's network and meta-gradient (`oml.py`), against an independent unroll and finite differences."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import anml
from harness.checkpoints import load_model
from harness.config import MetaTrainConfig
from conftest import assert_ok, run, same_weights, weights
from fastpath.functional import oml_meta_loss
from model import IMAGE_SIZE, OML, image_size

INNER_LR = 0.03


def episode(seed=0, classes=5, per_class=4, remember=6, dtype=torch.float64):
    """Synthetic 84x84 images: a trajectory of one class, then it and some others as the outer batch."""
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(per_class, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g, dtype=dtype)
    train_labels = torch.full((per_class,), 2)
    others = torch.rand(remember, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g, dtype=dtype)
    other_labels = torch.randint(classes, (remember,), generator=g)
    return train, train_labels, torch.cat([train, others]), torch.cat([train_labels, other_labels])


def tiny_oml(seed=0):
    torch.manual_seed(seed)
    return OML(channels=3, num_classes=5).double()


def unrolled_loss(model, params, train, train_labels, valid, valid_labels, create_graph=True):
    """Independent reference: the whole network called functionally, one SGD step per image over the
    last layer's weight and bias."""
    fast = dict(params)
    for im, label in zip(train.split(1), train_labels.split(1)):
        loss = F.cross_entropy(functional_call(model, fast, (im,)), label)
        grads = torch.autograd.grad(loss, [fast["fc.weight"], fast["fc.bias"]], create_graph=create_graph)
        fast["fc.weight"] = fast["fc.weight"] - INNER_LR * grads[0]
        fast["fc.bias"] = fast["fc.bias"] - INNER_LR * grads[1]
    return F.cross_entropy(functional_call(model, fast, (valid,)), valid_labels)


def test_the_network_has_omls_shapes():
    model = OML()
    assert model.features(torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)).shape == (2, 2304)
    assert [m.stride for m in model.rln if isinstance(m, torch.nn.Conv2d)] == [(2, 2), (1, 1), (2, 2), (1, 1),
                                                                                  (2, 2), (2, 2)]
    assert model.fc.weight.shape == (1000, 2304) and not model.fc.bias.any()


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_an_independent_unroll(first_order):
    model, batch = tiny_oml(), episode()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    expected = torch.autograd.grad(unrolled_loss(model, params, *batch, create_graph=not first_order),
                                   list(params.values()))
    loss, _ = oml_meta_loss(model, INNER_LR, *batch, first_order=first_order)
    for (name, p), e in zip(model.named_parameters(), expected):
        assert e.abs().max() > 0, name
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12, msg=name)


def test_second_order_differs_from_first_order_in_the_representation():
    batch = episode(seed=1)
    grads = []
    for first_order in (False, True):
        model = tiny_oml()
        oml_meta_loss(model, INNER_LR, *batch, first_order=first_order)
        grads.append(model.rln[0].weight.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-6 * grads[0].abs().max()


def test_meta_gradient_matches_finite_differences():
    model, batch = tiny_oml(seed=2), episode(seed=2)
    oml_meta_loss(model, INNER_LR, *batch)
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
    analytic = sum((p.grad * d).sum() for p, d in zip(model.parameters(), direction)).item()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_at(step):
        params = {n: base[n] + step * d for (n, _), d in zip(model.named_parameters(), direction)}
        with torch.enable_grad():
            params = {n: p.requires_grad_() for n, p in params.items()}
            return unrolled_loss(model, params, *batch, create_graph=False).item()

    eps = 1e-6
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=1e-5)
    assert abs(analytic) > 1e-6


def test_an_oml_checkpoint_loads_as_oml_and_a_damaged_one_is_named(tmp_path):
    model = tiny_oml()
    path = tmp_path / "3_OML-0.pth"
    torch.save(model.state_dict(), path)
    loaded = load_model(path)
    assert isinstance(loaded, OML) and image_size(loaded) == IMAGE_SIZE
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    state = model.state_dict()
    state["rln.2.weight"] = state["rln.2.weight"][:, :2]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"does not fit the OML architecture"):
        load_model(path)


def test_train_and_evaluate_oml_as_a_user_does(omniglot_root, tmp_path):
    """train_omni.py --arch oml writes {channels}_OML-{it}.pth from 84x84 images with OML's rates;
    eval_omni.py meta-tests it on 84x84 images; a resume takes the run's own architecture."""
    flags = ["--arch", "oml", "--rln", 2, "-d", "cpu", "--data-root", omniglot_root, "--no-download",
             "--out-dir", tmp_path]
    proc = run("train_omni.py", *flags, "--epochs", 2)
    assert_ok(proc)
    assert f"done: {tmp_path}/2_OML-1.pth" in proc.stdout
    settings = torch.load(tmp_path / "2_OML-1_resume.pt")["config"]
    assert (settings["arch"], settings["inner_lr"], settings["outer_lr"]) == ("oml", 0.03, 1e-4)
    evaluation = run("eval_omni.py", "-m", tmp_path / "2_OML-1.pth", "-c", 3, "-r", 1, "-d", "cpu",
                     "--data-root", omniglot_root, "--no-download")
    assert_ok(evaluation)
    assert evaluation.stdout.startswith("Classes 3 Accuracy ")
    again = run("train_omni.py", *flags[2:], "--epochs", 3, "--resume", "latest")  # ANML's flags: refused
    assert again.returncode == 2 and "no 4_3_36" not in again.stderr


@pytest.fixture(scope="module")
def sampler84(omniglot_root, cache_dir):
    """Omniglot at OML's 84x84, preprocessed once into the session's cache."""
    from datasets import OmniSampler
    return OmniSampler(omniglot_root, seed=0, cache_dir=cache_dir, im_size=IMAGE_SIZE)


def test_an_oml_run_keeps_the_run_loops_promises(sampler84, tmp_path):
    """Stopped after its first iteration and resumed, an OML run ends exactly as one run straight
    through; meanwhile a new run in its folder is refused."""
    config = lambda out, **kw: MetaTrainConfig(arch="oml", rln=2, epochs=4, inner_lr=0.03, outer_lr=1e-4,
                                               out_dir=str(out), **kw)
    anml.train(config(tmp_path / "straight"), sampler84, quiet=True)
    _, stopped, _ = anml.train(config(tmp_path / "split", time_limit=1e-9), sampler84, quiet=True)
    assert stopped is not None and (tmp_path / "split" / "2_OML-0_resume.pt").is_file()
    with pytest.raises(ValueError, match=r"already holds a run of 2 \(--arch oml .*--seed 1.*\), resumable after "
                                         r"iteration 0"):
        anml.train(config(tmp_path / "split", seed=5), sampler84, quiet=True)
    anml.train(config(tmp_path / "split", resume="latest", nm=5, mask=45), sampler84, quiet=True)  # no NM: ignored
    assert same_weights(weights(tmp_path / "split" / "2_OML-3.pth"), weights(tmp_path / "straight" / "2_OML-3.pth"))
