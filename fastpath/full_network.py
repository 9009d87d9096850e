"""The whole network learning at meta-test (`eval_omni.py --no-freeze --lanes N`), several runs at once.

higherANML's loop (`anml.original_fit`) takes one Adam step over every parameter per
image, for one run and learning rate after another. `Lanes` takes the same steps for L (run, rate)
pairs together: lane l holds its own copy of the network's parameters (stacked [L, ...]), learns its
own image at each step and has its own Adam rate. The network runs functionally, as grouped
convolutions and batched products (`functional.lane_features`), and one Adam updates every lane at
its own rate (`batched.adam_for_models`: L independent Adams). The conv biases feed an InstanceNorm, which removes them
(`functional.norm_fed_biases`): they are left out, and every output is as with them.
tests/test_meta_test.py proves in float64 that L lanes give the weights and outputs of L runs of
higherANML's loop, and that the meta-test's accuracies follow.
"""
import torch
import torch.nn.functional as F

from fastpath.batched import adam_for_models
from fastpath.derivatives import linear
from fastpath.functional import images_first, lane_features, lane_gate


def lane_logits(params, images):
    """Each lane's logits [L, N, outputs] on its images [N, L, H, W]: fc(rln(x) * nm(x)), lane by lane."""
    features = lane_features(params, "rln", images) * lane_gate(params, images)
    return linear(features, params["fc.weight"], params["fc.bias"])


def learned_names(net):
    """The parameters a lane keeps: all of the network's but the conv biases, which change no output."""
    return [n for n, _ in net.named_parameters() if not n.endswith("conv.bias")]


class Lanes:
    """L networks of one shape (`nets`, their weights copied) learning side by side, one Adam rate each
    (`lrs`), one step an image."""

    def __init__(self, nets, lrs):
        self.params = {n: torch.stack([net.get_parameter(n).detach() for net in nets]).requires_grad_()
                       for n in learned_names(nets[0])}
        self.optimizer, self.lrs = adam_for_models(list(self.params.values()), lrs, fused=True), list(lrs)

    def __len__(self):
        return len(self.lrs)

    def step(self, images, labels):
        """One Adam step of every lane on its own image: `images` [L, 1, H, W], `labels` [L]."""
        logits = lane_logits(self.params, images.transpose(0, 1))
        # a sum, so that each lane's gradient is its own loss's (a mean would divide it by L)
        loss = F.cross_entropy(logits.flatten(0, 1), labels, reduction="sum")
        for p, grad in zip(self.params.values(), torch.autograd.grad(loss, list(self.params.values()))):
            p.grad = grad
        self.optimizer.step()

    @torch.no_grad()
    def predict(self, ims, images_per_pass=1000):
        """Each lane's argmax over the outputs on its own images `ims` [L, M, 1, H, W]: [L, M]. About
        `images_per_pass` images go through the network at once, shared among the lanes."""
        chunk = max(1, images_per_pass // len(self))
        return torch.cat([lane_logits(self.params, images_first(ims[:, i:i + chunk])).argmax(-1)
                          for i in range(0, ims.shape[1], chunk)], 1)

    @torch.no_grad()
    def finite(self):
        """[L] bools: whether every weight of each lane is finite (a far too large rate makes them NaN)."""
        return torch.stack([torch.isfinite(p).flatten(1).all(1) for p in self.params.values()]).all(0)

    def lane_state(self, l):
        """Lane l's weights {name: tensor} (as `learned_names`)."""
        return {n: p.detach()[l] for n, p in self.params.items()}
