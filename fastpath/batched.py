"""Several ANMLs, or several tasks of one, in one meta-iteration.

K models (`train_omni.py --seeds`) times B tasks each (`--meta-batch`) run as L = K B lanes of the
functional meta-gradient (`functional.py`): each lane its own episode, its own fast weights and its
own inner loop, all lanes in the same operations (grouped convolutions, per-channel norms, batched
products at the last layer). The K models' parameters are stacked [K, ...] and updated by one Adam
(elementwise, so K independent Adams); the B lanes of a model start from its one set of weights,
and the mean of their outer losses gives the mean of their meta-gradients.

Each model stays a single run in every file: `ModelStack.members[k]` is an ANML whose parameters
are views of the stack's k-th slice, and `MemberOptimizer` reads and writes the k-th slice of the
Adam state as a single run's optimizer state. tests/test_batched.py proves, in float64, that K
stacked models equal K single runs, and a meta-batch the mean of its tasks' meta-gradients.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpath.cuda_graphs import GraphedMetaStep
from fastpath.functional import (AdaptedLinear, InnerLastLayer, conv_blocks, flatten, linear, one_hot,
                        unflatten)
from harness.runtime import Ranks
from model import adapted_in_the_inner_loop, kaiming_std, seeded_network

# ----------------------------------------------------------------------------- K models as one


class ModelStack(nn.Module):
    """K ANMLs of one size with their parameters stacked [K, ...] (ANML.named_parameters' order).

    `members[k]` is the k-th model as an ANML whose parameters are views of the stack: loading a
    state_dict into it writes the stack, its state_dict reads it. Build the stack from models already
    on their device and dtype (moving it afterwards would detach the views)."""

    def __init__(self, models):
        super().__init__()
        self.names = [n for n, _ in models[0].named_parameters()]
        self.stacked = nn.ParameterList(
            [nn.Parameter(torch.stack([m.get_parameter(n).detach() for m in models])) for n in self.names])
        self.members = [self._view(model, k) for k, model in enumerate(models)]

    def _view(self, model, k):
        for name, stacked in zip(self.names, self.stacked):
            module, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module), leaf, nn.Parameter(stacked.data[k]))
        return model

    def params(self):
        """{name: [K, ...] parameter}"""
        return dict(zip(self.names, self.stacked))

    def __len__(self):
        return len(self.members)


class MemberOptimizer:
    """The k-th model's share of the stack's Adam, seen as a single run's Adam: `state_dict()` gives
    what that run would save, `load_state_dict` writes a single run's state into the k-th slice."""

    def __init__(self, optimizer, k):
        self.optimizer, self.k = optimizer, k

    def state_dict(self):
        whole = self.optimizer.state_dict()
        state = {i: {key: value.clone() if key == "step" else value[self.k].clone() for key, value in s.items()}
                 for i, s in whole["state"].items()}
        groups = [dict(group) for group in whole["param_groups"]]
        if isinstance(self.optimizer, StackedAdam):
            groups[0]["lr"] = float(self.optimizer.lrs[self.k])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        group = self.optimizer.param_groups[0]
        if len(state_dict["state"]) not in (0, len(group["params"])):
            raise ValueError(f"an optimizer state of {len(state_dict['state'])} parameters, not "
                             f"{len(group['params'])}")
        scalar_device = lambda p: p.device if group["capturable"] or group.get("fused") else "cpu"
        for i, p in enumerate(group["params"]):
            saved = state_dict["state"].get(i)
            if saved is None:
                continue
            state = self.optimizer.state[p]
            if not state:
                state.update(exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                             exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            state["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32, device=scalar_device(p))
            for key in ("exp_avg", "exp_avg_sq"):
                state[key][self.k].copy_(saved[key])


class StackedAdam(torch.optim.Optimizer):
    """torch.optim.Adam's update over a ModelStack's [K, ...] parameters with one learning rate per
    model (`lrs`): K Adams with their own rates. The same formula as torch's (for one rate it
    equals it in float64, tests/test_batched.py), its state in torch's format (what a single run's
    Adam loads); `capturable` keeps the step count on the device for a CUDA graph."""

    def __init__(self, params, lrs, capturable=False):
        defaults = dict(torch.optim.Adam([torch.zeros(1)]).defaults, lr=float(lrs[0]), capturable=capturable)
        super().__init__(params, defaults)
        self.lrs = torch.as_tensor(lrs, dtype=torch.float64)
        # the rates on each parameter's device, copied there once: a copy from the host inside the
        # step would be recorded into (and break) the CUDA graph that replays it
        self.device_lrs = {(p.device, p.dtype): self.lrs.to(p.device, p.dtype)
                           for group in self.param_groups for p in group["params"]}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            capturable = group["capturable"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if capturable else "cpu")
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
                step += 1
                exp_avg.lerp_(p.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                count = step if capturable else step.item()
                bias_correction1, bias_correction2 = 1 - beta1 ** count, 1 - beta2 ** count
                lr = self.device_lrs[p.device, p.dtype].view(-1, *[1] * (p.dim() - 1))
                denom = (exp_avg_sq.sqrt() / (bias_correction2 ** 0.5 if capturable else math.sqrt(bias_correction2)))
                p.addcdiv_(exp_avg * (lr / bias_correction1), denom.add_(group["eps"]), value=-1)


def stacked_optimizer(stack, lrs, capturable=False):
    """The stack's outer optimiser: torch's Adam where every model has the same rate, else StackedAdam."""
    if len(set(lrs)) == 1:
        return torch.optim.Adam(stack.parameters(), lr=lrs[0], capturable=capturable)
    return StackedAdam(stack.parameters(), lrs, capturable=capturable)


def one_or_each(values, device):
    """A rate shared by every model as a number, else one per model as a [K] tensor."""
    return values[0] if len(set(values)) == 1 else torch.tensor(values, dtype=torch.float64, device=device)


def seeded_stack(rln, nm, mask, seeds, device="cpu", dtype=None):
    """(ModelStack of the networks `seeded_network` starts with each seed, one torch Generator per
    model in the state a single run's global generator has after its network is built: the draws
    that re-initialise its last layer's rows follow the single run's)."""
    models, generators = [], []
    for seed in seeds:
        model = seeded_network(rln, nm, mask, seed)
        if torch.device(device).type == "cpu":
            generator = torch.Generator()
            generator.set_state(torch.get_rng_state())
        else:  # the network is built on the CPU: the device's generator is as seeded
            generator = torch.Generator(device).manual_seed(seed)
        models.append(model.to(device, dtype))
        generators.append(generator)
    return ModelStack(models), generators


# ----------------------------------------------------------------------------- L lanes of the meta-gradient


def expand_lanes(params, lanes_per_model):
    """{name: [K, ...]} -> {name: [K lanes_per_model, ...]}: each model's weights once per task (the B lanes of
    model k are k B .. k B + B - 1), differentiably: a model's gradient is the sum over its lanes."""
    if lanes_per_model == 1:
        return dict(params)
    return {n: p.unsqueeze(1).expand(p.shape[0], lanes_per_model, *p.shape[1:]).reshape(-1, *p.shape[1:]).contiguous()
            for n, p in params.items()}  # contiguous: a copy once, not at each use of a stride-0 view


def grouped(params):
    """The layout conv_blocks reads for L lanes: conv weights [L C, C_in, 3, 3], norms [L C] (views)."""
    return {n: p.flatten(0, 1) if ".convBlock" in n else p for n, p in params.items()}


def lane_features(params, prefix, images):
    """The conv blocks of L lanes on `images` [N, L, H, W] (lane l's images in channel l): [L, N, 9 C]."""
    lanes = images.shape[1]
    return conv_blocks(grouped(params), prefix, images, groups=lanes).view(len(images), lanes, -1).transpose(0, 1)


def lane_gate(params, images):
    """Each lane's NM output on its images [N, L, H, W]: [L, N, mask]."""
    return torch.sigmoid(linear(lane_features(params, "nm", images), params["nm.fc.weight"], params["nm.fc.bias"]))


def images_first(ims):
    """[L, N, 1, H, W] episodes -> [N, L, H, W]: lane l's images in channel l of a grouped convolution."""
    return ims.squeeze(2).transpose(0, 1)


def lanes_meta_loss(params, lanes_per_model, inner_lr, train_ims, train_labels, valid_ims, valid_labels, first_order=False,
                    mean_over=None):
    """`functional.func_meta_loss` for L = K lanes_per_model lanes at once: `params` {name: [K, ...]} are K
    models' parameters (leaves), the episodes have a leading dimension L (train_ims [L, 20, 1, H, W],
    valid_ims [L, 84, 1, H, W]). Leaves in the leaves' .grad, for each model, the mean over its
    `lanes_per_model` lanes of their meta-gradients; returns each model's mean outer (loss, accuracy), [K] each.
    `inner_lr`: one rate, or a [K] tensor of one per model.
    `mean_over` (default `lanes_per_model`): the count the sums over a model's lanes are divided by, when its
    meta-batch is shared out over processes (their sums then add up to the means). The conv biases
    are left without gradient (zero: see functional.norm_fed_biases)."""
    inner_names = [n for n in params if adapted_in_the_inner_loop(n)]
    lanes = expand_lanes(params, lanes_per_model)
    if torch.is_tensor(inner_lr):  # one rate per model: per lane, [L, 1, 1]
        inner_lr = inner_lr.to(train_ims.dtype).repeat_interleave(lanes_per_model).view(-1, 1, 1)
    count = len(train_ims)
    masks = lane_gate(lanes, images_first(torch.cat([train_ims, valid_ims], 1)))
    train_masks, valid_masks = masks.split([train_ims.shape[1], valid_ims.shape[1]], 1)
    fc = AdaptedLinear(lanes["fc.weight"])
    fast_names = [n for n in inner_names if not n.endswith("conv.bias") and n != "fc.weight"]
    fast = flatten(lanes, fast_names)
    lr_targets = inner_lr * one_hot(train_labels, lanes["fc.weight"].shape[1], fast)
    for t, image in enumerate(images_first(train_ims).split(1)):
        weights = {**lanes, **unflatten(fast, lanes, fast_names)}
        f = lane_features(weights, "rln", image) * train_masks[:, t:t + 1]
        bias = weights["fc.bias"]
        u, grad_f = InnerLastLayer.apply(f, bias, fc.weight, fc.U, fc.F, lr_targets[:, t:t + 1], inner_lr)
        if first_order:
            u, grad_f = u.detach(), grad_f.detach()
        (step,) = torch.autograd.grad([f, bias], fast, [grad_f, u.view_as(bias)], create_graph=not first_order)
        fast = fast + step
        fc.step(u, f.detach() if first_order else f)
    weights = {**lanes, **unflatten(fast, lanes, fast_names)}
    out = fc(lane_features(weights, "rln", images_first(valid_ims)) * valid_masks, weights["fc.bias"])
    losses = F.cross_entropy(out.flatten(0, 1), valid_labels.flatten(), reduction="none").view(count, -1).mean(1)
    mean_over = mean_over or lanes_per_model
    (losses.sum() / mean_over).backward()
    per_model = lambda t: t.detach().view(-1, lanes_per_model).sum(1) / mean_over
    accuracies = (out.argmax(-1) == valid_labels).to(losses.dtype).mean(1)
    return per_model(losses), per_model(accuracies)


# ----------------------------------------------------------------------------- the iteration


def sum_over_processes(parameters, loss, acc):
    """all_reduce (sum) of the parameters' gradients and of the loss and accuracy, in one call."""
    import torch.distributed as dist
    grads = [p.grad for p in parameters]
    flat = torch.cat([g.flatten() for g in grads] + [loss, acc])
    dist.all_reduce(flat)
    for g, piece in zip(grads, flat.split([g.numel() for g in grads] + [loss.numel() + acc.numel()])):
        g.copy_(piece.view_as(g))
    return flat[-loss.numel() - acc.numel():].split([loss.numel(), acc.numel()])


class StackedMetaStep:
    """One meta-iteration of a ModelStack: each model draws `meta_batch` episodes from its own sampler and
    the new rows of its last layer from its own generator (eagerly, before the step), then the
    lobotomy, the lanes' meta-gradient and one Adam step run in one CUDA graph (`graphed`) or
    eagerly. `samplers[k].rng` and `generators[k]` are model k's random state.

    `ranks` (runtime.Ranks): the meta-batch of each model is shared out over the `ranks.world`
    processes that hold the same models (torchrun): each draws all of its tasks and re-initialises
    all their rows, runs its share (`local_tasks` = meta_batch / world lanes a model), and the
    processes' gradients are summed (`all_reduce`) before the identical Adam step everywhere: the
    update of one process running the whole meta-batch."""

    def __init__(self, stack, outer_opt, samplers, generators, meta_batch, inner_lr, first_order=False, graphed=False,
                 ranks=Ranks()):
        self.stack, self.samplers, self.generators, self.meta_batch = stack, samplers, generators, meta_batch
        self.ranks = ranks
        if meta_batch % ranks.world:
            raise ValueError(f"a meta-batch of {meta_batch} tasks cannot be shared equally by {ranks.world} processes")
        self.local_tasks = meta_batch // ranks.world
        weight = stack.params()["fc.weight"]
        rows, self.outputs = len(stack) * meta_batch, weight.shape[1]
        self.rows = torch.zeros(rows, weight.shape[2], dtype=weight.dtype, device=weight.device)
        self.row_classes = torch.zeros(rows, dtype=torch.long, device=weight.device)
        self.model_of_row = torch.arange(len(stack), device=weight.device).repeat_interleave(meta_batch)
        conv_biases = [p for n, p in stack.params().items() if n.endswith("conv.bias")]

        def iteration(train_class, train_ims, train_labels, valid_ims, valid_labels):
            self.lobotomize()
            loss, acc = lanes_meta_loss(stack.params(), self.local_tasks, inner_lr, train_ims, train_labels, valid_ims,
                                        valid_labels, first_order, mean_over=meta_batch)
            for p in conv_biases:
                p.grad = torch.zeros_like(p)
            if self.ranks.world > 1:
                loss, acc = sum_over_processes(stack.parameters(), loss, acc)
            return loss, acc

        self.graph = GraphedMetaStep(stack, outer_opt, samplers[0], iteration, lanes=len(stack) * self.local_tasks,
                                     graphed=graphed)

    def lobotomize(self):
        """Write the drawn rows into the class rows of each model's last layer (in place)."""
        weight = self.stack.params()["fc.weight"]
        with torch.no_grad():
            weight.view(-1, weight.shape[2]).index_copy_(0, self.model_of_row * self.outputs + self.row_classes,
                                                         self.rows)

    def share_repeated_rows(self, classes):
        """Where two tasks of one model drew the same class, give both the later task's row: the
        lobotomy's index_copy_ then writes one value to that row whichever write lands last (the
        order of repeated indices is not fixed on CUDA, and a meta-batch shared by processes must
        stay identical everywhere); on the CPU, where the later write wins, nothing changes."""
        latest = {}
        for i, c in enumerate(classes):
            latest[i // self.meta_batch, c] = i
        for i, c in enumerate(classes):
            j = latest[i // self.meta_batch, c]
            if j != i:
                self.rows[i].copy_(self.rows[j])

    def draw(self):
        """Each task's episode and new last-layer row; returns this process's lanes' episodes
        (classes [L], remembered images [L, R])."""
        classes, remember = [], []
        std = kaiming_std(self.rows)
        for k, (sampler, generator) in enumerate(zip(self.samplers, self.generators)):
            for b in range(self.meta_batch):
                c, flat = sampler.sample_train_indices()
                classes.append(c)
                remember.append(flat)
                self.rows[k * self.meta_batch + b].normal_(0, std, generator=generator)
        self.share_repeated_rows(classes)
        self.row_classes.copy_(torch.as_tensor(classes))
        mine = [k * self.meta_batch + self.ranks.rank * self.local_tasks + b
                for k in range(len(self.stack)) for b in range(self.local_tasks)]
        return np.array(classes)[mine], np.stack(remember)[mine]

    def __call__(self):
        """One iteration; returns each model's (outer loss, outer accuracy) as [K] device tensors."""
        return self.graph(*self.draw())
