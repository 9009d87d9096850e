"""OML (Javed & White 2019, "Meta-Learning Representations for Continual Learning"), the ANML paper's
main rival: its Omniglot network and its meta-gradient, in the functional style of `functional.py`.

The network, as OML's code defines it for Omniglot (khurramjaved96/mrcl, `model/modelfactory.py`,
after its 2020 meta-gradient fix): a representation (RLN) of six 3x3 convolutions of 256 channels,
strides 2, 1, 2, 1, 2, 2, no padding, each followed by a ReLU, on 84x84 grey images (84 -> 41 -> 39
-> 19 -> 17 -> 8 -> 3: 2304 features), and a prediction network (PLN) of one linear layer to 1000
classes. Weights are Kaiming-normal, biases zero, as there. Only the PLN adapts in the inner loop,
so the inner loop is the last layer's alone: the features of an episode are computed once, and the
meta-gradient reaches the RLN through them (second order: through every inner step).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.config import NUM_OUTPUTS
from fastpath.functional import AdaptedLinear, InnerLastLayer, accuracy, one_hot

STRIDES = (2, 1, 2, 1, 2, 2)
IMAGE_SIZE = 84


class OML(nn.Module):
    """OML's Omniglot network: fc(rln(x)), the RLN six strided convolutions with ReLUs."""

    def __init__(self, channels=256, num_classes=NUM_OUTPUTS):
        super().__init__()
        convs, in_channels = [], 1
        for stride in STRIDES:
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


def oml_meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels, first_order=False):
    """OML's meta-gradient, left in the parameters' .grad; returns (loss, accuracy) tensors.

    One inner SGD step (`inner_lr`) of the last layer per training image, in order, then the
    cross-entropy of the adapted network on `valid_ims`, back-propagated through every inner step
    (`first_order`: the inner gradients are constants). The RLN is fixed during the inner loop, so
    the features of all the images are computed once."""
    feats = model.features(torch.cat([train_ims, valid_ims]))
    train_feats, valid_feats = feats.split([len(train_ims), len(valid_ims)])
    fc = AdaptedLinear(model.fc.weight)
    bias = model.fc.bias
    lr_targets = inner_lr * one_hot(train_labels, model.fc.weight.shape[0], feats)
    for f, lr_target in zip(train_feats.split(1), lr_targets.split(1)):
        u, _ = InnerLastLayer.apply(f, bias, fc.weight, fc.U, fc.F, lr_target, inner_lr)
        if first_order:
            u = u.detach()
        bias = bias + u.view(-1)
        fc.step(u, f.detach() if first_order else f)
    out = fc(valid_feats, bias)
    loss = F.cross_entropy(out, valid_labels)
    loss.backward()
    return loss.detach(), accuracy(out, valid_labels)
