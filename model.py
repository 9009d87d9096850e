"""The ANML network: a neuromodulatory net (NM) gates the features of a representation net (RLN).

Layout and parameter names follow higherANML, so its checkpoints
(e.g. `256_112_2304_ANML-29999.pth`) load here with `strict=True`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from protocol import NUM_OUTPUTS, check_sizes


class ConvBlock(nn.Module):
    """3x3 conv (no padding), InstanceNorm (affine), ReLU, then an optional 2x2 max-pool."""

    def __init__(self, in_channels, out_channels, pooling=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3)
        self.norm = nn.InstanceNorm2d(out_channels, affine=True)
        self.pooling = pooling

    def forward(self, x):
        x = F.relu(self.norm(self.conv(x)))
        return F.max_pool2d(x, 2) if self.pooling else x


def conv_stack(in_channels, channels):
    """The three conv blocks shared by RLN and NM: 28x28 -> 13 -> 5 -> 3x3 x channels."""
    return (ConvBlock(in_channels, channels),
            ConvBlock(channels, channels),
            ConvBlock(channels, channels, pooling=False))


class RLN(nn.Module):
    """Representation learning network: three conv blocks, flattened to 9 * channels features."""

    def __init__(self, channels):
        super().__init__()
        self.convBlock1, self.convBlock2, self.convBlock3 = conv_stack(1, channels)

    def forward(self, x):
        x = self.convBlock3(self.convBlock2(self.convBlock1(x)))
        return x.flatten(1)


class NM(nn.Module):
    """Neuromodulatory network: three conv blocks, a linear layer and a sigmoid -> gate in (0, 1)."""

    def __init__(self, channels, mask_size):
        super().__init__()
        self.convBlock1, self.convBlock2, self.convBlock3 = conv_stack(1, channels)
        self.fc = nn.Linear(9 * channels, mask_size)

    def forward(self, x):
        x = self.convBlock3(self.convBlock2(self.convBlock1(x)))
        return torch.sigmoid(self.fc(x.flatten(1)))


class ANML(nn.Module):
    """fc(rln(x) * nm(x)): the NM gates the RLN's features element-wise, then 1000 logits."""

    def __init__(self, rln_chs, nm_chs, mask_size, num_classes=NUM_OUTPUTS):
        super().__init__()
        check_sizes(rln_chs, nm_chs, mask_size)
        self.rln = RLN(rln_chs)
        self.nm = NM(nm_chs, mask_size)
        self.fc = nn.Linear(mask_size, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))

    def features(self, x):
        """The gated representation that the last layer reads (frozen during meta-testing)."""
        return self.rln(x) * self.nm(x)


OPEN_GATE_BIAS = 40.0  # sigmoid(40) rounds to 1.0 in float32 and float64


def open_gate(model):
    """Fix the NM's gate open: its last layer's weights zero and biases OPEN_GATE_BIAS, so that it
    outputs exactly 1 for every image and feature, and its gradient, sigmoid(40) (1 - sigmoid(40)), is
    exactly 0: no step moves the NM. The network is then the RLN and the last layer alone (the plain
    convnet of Frati et al.'s ASB), kept in ANML's format for every script that reads one."""
    with torch.no_grad():
        model.nm.fc.weight.zero_()
        model.nm.fc.bias.fill_(OPEN_GATE_BIAS)
    return model


def kaiming_convs(model):
    """Draw every convolution's weight afresh with kaiming_normal_ (fan_in, gain sqrt(2)), biases kept:
    how Frati et al.'s convnet starts (`init_model_weights`), where PyTorch's default draws weights
    sqrt(6) times smaller. The draws come from torch's generator, after the network's own."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
    return model


def kaiming_std(weight):
    """The std of kaiming_normal_ (fan_in, gain sqrt(2)) for a [out, in] weight: a last layer's
    re-initialisation (its rows, or all of it)."""
    return math.sqrt(2.0 / weight.shape[1])


def reset_last_layer(model, generator=None):
    """Kaiming-normal re-initialisation of the whole fc weight (bias kept), as higherANML does."""
    weight = model.fc.weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * kaiming_std(weight))


def adapted_in_the_inner_loop(name):
    """Whether the inner loop adapts the parameter `name`: the RLN and the last layer, as higherANML's
    inner SGD holds them (also ASB's sequential steps); never the NM."""
    return name.startswith(("rln.", "fc."))


def inner_parameter_names(model):
    """The names of the parameters the inner loop adapts, in the model's order."""
    return [n for n, _ in model.named_parameters() if adapted_in_the_inner_loop(n)]


def seeded_network(rln_chs, nm_chs, mask_size, seed):
    """ANML(...) right after torch.manual_seed(seed): where meta-training and pretraining with that
    seed start, and the random baseline. The torch generator stays seeded: a run draws on from it."""
    torch.manual_seed(seed)
    return ANML(rln_chs, nm_chs, mask_size)


def sizes_from_state_dict(state_dict):
    """(rln_chs, nm_chs, mask_size) of a checkpoint, read from its tensors' shapes."""
    try:
        rln_chs = state_dict["rln.convBlock1.conv.weight"].shape[0]
        nm_chs = state_dict["nm.convBlock1.conv.weight"].shape[0]
        mask_size = state_dict["fc.weight"].shape[1]
    except (KeyError, AttributeError, IndexError) as e:
        raise ValueError(f"not an ANML state_dict (missing or malformed {e})") from None
    return int(rln_chs), int(nm_chs), int(mask_size)


# ----------------------------------------------------------------------------- OML, the paper's rival
# Javed & White 2019, "Meta-Learning Representations for Continual Learning": its Omniglot network as
# OML's code defines it (khurramjaved96/mrcl, `model/modelfactory.py`, after its 2020 meta-gradient
# fix): a representation (RLN) of six 3x3 convolutions of 256 channels, strides 2, 1, 2, 1, 2, 2, no
# padding, each followed by a ReLU, on 84x84 grey images (84 -> 41 -> 39 -> 19 -> 17 -> 8 -> 3: 2304
# features), and a prediction network (PLN) of one linear layer to 1000 classes. Weights are
# Kaiming-normal, biases zero, as there. Only the PLN adapts in OML's inner loop
# (`fastpath/functional.oml_meta_loss`).

OML_STRIDES = (2, 1, 2, 1, 2, 2)
IMAGE_SIZE = 84  # OML's images; ANML's are 28x28


class OML(nn.Module):
    """OML's Omniglot network: fc(rln(x)), the RLN six strided convolutions with ReLUs."""

    def __init__(self, channels=256, num_classes=NUM_OUTPUTS):
        super().__init__()
        convs, in_channels = [], 1
        for stride in OML_STRIDES:
            convs += [nn.Conv2d(in_channels, channels, 3, stride=stride), nn.ReLU()]
            in_channels = channels
        self.rln = nn.Sequential(*convs)
        self.fc = nn.Linear(9 * channels, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, x):
        """The representation the PLN reads (frozen during meta-testing): [N, 9 channels]."""
        return self.rln(x).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


def oml_sizes(state_dict):
    """(channels, classes) of an OML checkpoint, read from its tensors' shapes."""
    return int(state_dict["rln.0.weight"].shape[0]), int(state_dict["fc.weight"].shape[0])


def seeded_oml(channels, seed):
    """OML(channels) right after torch.manual_seed(seed), as model.seeded_network is for ANML."""
    torch.manual_seed(seed)
    return OML(channels)


def image_size(model):
    """The image side a network reads: OML's 84, ANML's 28."""
    return IMAGE_SIZE if isinstance(model, OML) else 28

