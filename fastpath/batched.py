"""Several ANMLs, or several tasks of one, in one meta-iteration.

K models (`train_omni.py --seeds`) times B tasks each (`--meta-batch`) run as L = K B lanes of the
functional meta-gradient (`functional.func_meta_loss`): each lane its own episode, its own fast
weights and its own inner loop, all lanes in the same operations (grouped convolutions, per-channel
norms, batched products at the last layer). The K models' parameters are stacked [K, ...] and
updated by one Adam (StackedAdam where their rates differ: K independent Adams); the B lanes of a
model start from its one set of weights, and the mean of their outer losses gives the mean of their
meta-gradients.

Each model stays a single run in every file: `ModelStack.members[k]` is an ANML whose parameters
are views of the stack's k-th slice, and `MemberOptimizer` reads and writes the k-th slice of the
Adam state as a single run's optimizer state. tests/test_batched.py proves, in float64, that K
stacked models equal K single runs, and a meta-batch the mean of its tasks' meta-gradients.
"""
import numpy as np
import torch
import torch.nn as nn

from fastpath.cuda_graphs import GraphedMetaStep
from fastpath.functional import func_meta_loss
from harness.runtime import Ranks
from model import kaiming_std, seeded_network

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

    def single_run_step_device(self, p):
        """Where a single run's Adam with the stack's flags keeps a step count: on the parameter's
        device if capturable (a CUDA graph's run) or fused, else on the CPU."""
        group = self.optimizer.param_groups[0]
        return p.device if group["capturable"] or group.get("fused") else "cpu"

    def state_dict(self):
        whole, params = self.optimizer.state_dict(), self.optimizer.param_groups[0]["params"]
        state = {i: {key: value.to(self.single_run_step_device(params[i]), copy=True) if key == "step"
                     else value[self.k].clone() for key, value in s.items()}
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
        for i, p in enumerate(group["params"]):
            saved = state_dict["state"].get(i)
            if saved is None:
                continue
            state = self.optimizer.state[p]
            if not state:
                state.update(exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                             exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            on = p.device if isinstance(self.optimizer, StackedAdam) else self.single_run_step_device(p)
            state["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32, device=on)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key][self.k].copy_(saved[key])


class StackedAdam(torch.optim.Optimizer):
    """Adam over stacked [K, ...] parameters with one learning rate per model (`lrs`): K Adams with
    their own rates, the one way several models' Adams are stepped (a ModelStack's meta-training,
    the meta-test's last layers, the whole-network lanes). Each model's slices take torch's fused
    Adam kernel with the model's rate: what torch.optim.Adam(fused=True) computes for a param group
    of those slices (and, for one rate, torch's Adam to rounding, tests/test_batched.py). The state
    is torch's format, with [K, ...] moments and one step count a parameter on its device, where the
    kernel reads it (MemberOptimizer hands a model's share to a single run). The rates are the
    kernel's numbers, so a step copies nothing from the host and a CUDA graph can record it;
    `capturable` is the flag a model's share is saved with."""

    def __init__(self, params, lrs, capturable=False):
        defaults = dict(torch.optim.Adam([torch.zeros(1)]).defaults, lr=float(lrs[0]), capturable=capturable)
        super().__init__(params, defaults)
        self.lrs = [float(lr) for lr in lrs]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                         exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                         exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            states = [self.state[p] for p in params]
            grads = [p.grad.contiguous() for p in params]  # the kernel reads a gradient as laid out like its parameter
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)  # the step counts the kernel reads: the models' are equal, one serves all
            beta1, beta2 = group["betas"]
            for k, lr in enumerate(self.lrs):
                torch._fused_adam_([p[k] for p in params], [g[k] for g in grads],
                                   [s["exp_avg"][k] for s in states], [s["exp_avg_sq"][k] for s in states], [], steps,
                                   lr=lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                   eps=group["eps"], amsgrad=False, maximize=False)


def adam_for_models(params, lrs, capturable=False, fused=False):
    """Adam over stacked [K, ...] parameters, model k at rate `lrs[k]`: the one way several models'
    Adams are stepped. Where every model has the same rate, torch's Adam itself (`fused`: its fused
    kernel, which StackedAdam runs model by model); else StackedAdam."""
    if len(set(lrs)) == 1:
        return torch.optim.Adam(params, lr=lrs[0], capturable=capturable, **({"fused": True} if fused else {}))
    return StackedAdam(params, lrs, capturable=capturable)


def stacked_optimizer(stack, lrs, capturable=False):
    """The outer optimiser of a ModelStack's meta-training, its models at rates `lrs`."""
    return adam_for_models(stack.parameters(), lrs, capturable=capturable)


def shared_or_per_model_rate(values, device):
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

        def iteration(train_class, train_ims, train_labels, valid_ims, valid_labels):
            self.lobotomize()
            loss, acc = func_meta_loss(stack.params(), inner_lr, train_ims, train_labels, valid_ims, valid_labels,
                                       first_order, lanes_per_model=self.local_tasks, mean_over=meta_batch)
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
