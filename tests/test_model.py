"""The network's layout: higherANML's checkpoint keys and shapes, size, output and size checks."""
import pytest
import torch

from harness.checkpoints import load_model
from model import ANML, sizes_from_state_dict

HIGHERANML_KEYS = {f"{net}.convBlock{i}.{layer}.{kind}" for net in ("nm", "rln") for i in (1, 2, 3)
             for layer in ("conv", "norm") for kind in ("weight", "bias")}
HIGHERANML_KEYS |= {"nm.fc.weight", "nm.fc.bias", "fc.weight", "fc.bias"}


@pytest.fixture(scope="module")
def full():
    return ANML(256, 112, 2304)


def test_state_dict_has_the_seed_checkpoint_keys(full):
    assert set(full.state_dict()) == HIGHERANML_KEYS


def test_shapes_and_parameter_count(full):
    state = full.state_dict()
    assert state["nm.convBlock1.conv.weight"].shape == (112, 1, 3, 3)
    assert state["nm.fc.weight"].shape == (2304, 1008)
    assert state["rln.convBlock2.conv.weight"].shape == (256, 256, 3, 3)
    assert state["fc.weight"].shape == (1000, 2304)
    assert state["rln.convBlock3.norm.weight"].shape == (256,)
    assert sum(p.numel() for p in full.parameters()) == 6_041_800
    assert sizes_from_state_dict(state) == (256, 112, 2304)


def test_forward_is_fc_of_gated_features(full):
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        out = full(x)
        gate = full.nm(x)
        expected = full.fc(full.rln(x) * gate)
    assert out.shape == (3, 1000)
    assert gate.shape == (3, 2304) and 0 < gate.min() and gate.max() < 1
    torch.testing.assert_close(out, expected)


def test_conv_block_is_conv_norm_relu_pool():
    block = ANML(4, 3, 36).rln.convBlock1
    x = torch.rand(2, 1, 28, 28)
    expected = torch.nn.functional.max_pool2d(torch.relu(block.norm(block.conv(x))), 2)
    torch.testing.assert_close(block(x), expected)
    assert isinstance(block.norm, torch.nn.InstanceNorm2d) and block.norm.affine
    assert not ANML(4, 3, 36).rln.convBlock3.pooling


def test_a_seed_format_checkpoint_loads_strictly(tmp_path):
    """A bare state_dict built from higherANML's key list and shapes alone (not from our model) loads
    with strict=True, and every value arrives where its name says."""
    shapes = {"fc.weight": (1000, 2304), "fc.bias": (1000,), "nm.fc.weight": (2304, 1008), "nm.fc.bias": (2304,)}
    for net, chs in (("rln", 256), ("nm", 112)):
        for i in (1, 2, 3):
            p = f"{net}.convBlock{i}."
            shapes.update({p + "conv.weight": (chs, 1 if i == 1 else chs, 3, 3), p + "conv.bias": (chs,),
                           p + "norm.weight": (chs,), p + "norm.bias": (chs,)})
    assert set(shapes) == HIGHERANML_KEYS
    generator = torch.Generator().manual_seed(0)
    seed_state = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    path = tmp_path / "256_112_2304_ANML-29999.pth"
    torch.save(seed_state, path)
    model = load_model(path)
    assert sizes_from_state_dict(model.state_dict()) == (256, 112, 2304)
    for k, v in model.state_dict().items():
        assert torch.equal(v, seed_state[k]), k


@pytest.mark.parametrize("sizes, reason", [((256, 112, 2000), r"--mask must be 2304"),
                                           ((4, 3, 37), r"--mask must be 36"),
                                           ((0, 3, 0), r"--rln must be a positive integer, got 0")])
def test_bad_sizes_are_refused_with_a_reason(sizes, reason):
    with pytest.raises(ValueError, match=reason):
        ANML(*sizes)
