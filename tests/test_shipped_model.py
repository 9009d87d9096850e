"""The shipped model: the committed file is the one that was trained (SHA-256), and it loads
strictly into ANML as higherANML's bare state_dict, with finite weights."""
import hashlib
from pathlib import Path

import pytest
import torch

from model import ANML

TRAINED = Path(__file__).resolve().parents[1] / "trained_anmls"
SHIPPED = "256_112_2304_ANML-21678.pth"


def recorded_sha256(name):
    """The SHA-256 that trained_anmls/SHA256SUMS records for `name`."""
    for line in (TRAINED / "SHA256SUMS").read_text().splitlines():
        digest, _, file = line.partition("  ")
        if file == name:
            return digest
    pytest.fail(f"{name} is not listed in trained_anmls/SHA256SUMS")


def listed():
    return [line.partition("  ")[2] for line in (TRAINED / "SHA256SUMS").read_text().splitlines() if line]


def test_every_shipped_network_is_listed():
    on_disk = {str(p.relative_to(TRAINED)) for p in TRAINED.rglob("*") if p.suffix in (".pth", ".csv")}
    assert on_disk == set(listed())


@pytest.mark.parametrize("name", listed())
def test_shipped_file_is_the_trained_one(name):
    data = (TRAINED / name).read_bytes()
    assert not data.startswith(b"version https://git-lfs"), f"{name} is a Git LFS pointer: run git lfs pull"
    assert hashlib.sha256(data).hexdigest() == recorded_sha256(name), f"{name} is corrupted or not the trained file"


@pytest.mark.parametrize("name", [n for n in listed() if n.endswith(".pth")])
def test_shipped_model_loads_strictly_with_finite_weights(name):
    state = torch.load(TRAINED / name, map_location="cpu", weights_only=True)
    model = ANML(256, 112, 2304)
    model.load_state_dict(state, strict=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
