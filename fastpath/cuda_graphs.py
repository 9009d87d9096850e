"""CUDA graphs: a whole meta-training iteration, and the meta-test's per-image step, recorded once
and replayed. Without CUDA the same classes run eagerly, which lets the tests check them on a CPU."""
import contextlib

import torch

from protocol import REMEMBER_SIZE

# Whether CUDA tensors' steps are recorded into graphs. The tests that run the CUDA paths on fake
# CUDA tensors (a CPU build has no graphs) turn it off: everything else then runs as on a GPU.
CAPTURE = True


@contextlib.contextmanager
def side_stream(enabled=True):
    """Run the block on a fresh CUDA stream (as work before a graph capture must), joined after."""
    if not enabled:
        yield
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def rng_state(device):
    """The state of `device`'s default torch generator (None for CUDA tensors without CUDA: fake ones)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.cuda.get_rng_state(device) if torch.cuda.is_available() else None


def set_rng_state(device, state):
    if state is None:
        return
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


def gather_train_batch(images, per_class, train_class, remember):
    """`sample_train`'s batch, gathered on the device from the flattened background set
    [classes * per_class, 1, H, W] by index tensors: (train_ims, train_labels, valid_ims, valid_labels).
    With L episodes (train_class [L], remember [L, R]), each result gains a leading dimension L."""
    first = train_class * per_class
    train_idx = first[..., None] + torch.arange(per_class, device=images.device)
    train_ims = images[train_idx]
    labels = torch.cat([train_idx, remember], -1) // per_class
    return train_ims, labels[..., :per_class], torch.cat([train_ims, images[remember]], -4), labels


class GraphedMetaStep:
    """The whole meta-iteration (lobotomy, inner loop, outer loss, backward, Adam) in one CUDA graph.

    `iteration(train_class, train_ims, train_labels, valid_ims, valid_labels)` lobotomizes and
    leaves the meta-gradient in .grad, returning (loss, accuracy) (`anml.meta_stepper` passes the
    functional one); this class gathers its batch, records it with the Adam step, and replays it.
    Images are gathered on the GPU from a device-resident copy of the background set, so a
    replay only needs the class index and the remembered images' indices copied in. On a CPU
    (no graphs) the same steps run eagerly, which lets the tests check this class without CUDA.
    With `lanes` = L, each call takes L episodes (`batched.py`); `graphed=False` runs eagerly on CUDA too."""

    def __init__(self, model, outer_opt, sampler, iteration, remember_size=REMEMBER_SIZE, warmup=3, lanes=None,
                 graphed=None):
        self.model, self.outer_opt, self.iteration = model, outer_opt, iteration
        weight = next(model.parameters())
        device = weight.device
        self.images = sampler.background.to(device, weight.dtype).flatten(0, 1)  # [classes * 20, 1, 28, 28]
        self.per_class = sampler.background.shape[1]
        episodes = () if lanes is None else (lanes,)
        self.train_class = torch.zeros(episodes, dtype=torch.long, device=device)
        self.remember = torch.zeros(*episodes, remember_size, dtype=torch.long, device=device)
        self.graph = None
        on_cuda = device.type == "cuda" if graphed is None else graphed
        if not on_cuda and graphed is not None:
            return  # eager by request: no warm-up to undo
        capture = on_cuda and CAPTURE
        snapshot = self._snapshot()
        with side_stream(capture):
            for _ in range(warmup):  # autograd and Adam allocate their state outside the graph
                self.outer_opt.zero_grad(set_to_none=True)
                self._step()
        if capture:
            self.graph = torch.cuda.CUDAGraph()
            self.outer_opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.graph):
                self.loss, self.acc = self._step()
        self._restore(snapshot)  # the warm-up steps were not real iterations

    def _step(self):
        train_ims, train_labels, valid_ims, valid_labels = gather_train_batch(
            self.images, self.per_class, self.train_class, self.remember)
        loss, acc = self.iteration(self.train_class, train_ims, train_labels, valid_ims, valid_labels)
        self.outer_opt.step()
        return loss, acc

    def _snapshot(self):
        """What the warm-up and the capture change: the weights, the Adam state, and the state of
        the generator that the lobotomy draws its rows from (the device's default one)."""
        params = [p.detach().clone() for p in self.model.parameters()]
        state = {p: {k: v.clone() for k, v in s.items()} for p, s in self.outer_opt.state.items()}
        return params, state, rng_state(self.images.device)

    def _restore(self, snapshot):
        params, state, rng = snapshot
        set_rng_state(self.images.device, rng)
        with torch.no_grad():
            for p, saved in zip(self.model.parameters(), params):
                p.copy_(saved)
            for p, s in self.outer_opt.state.items():
                for k, v in s.items():
                    v.copy_(state[p][k]) if p in state else v.zero_()

    def __call__(self, train_class, remember):
        """Replay one iteration; returns (loss, accuracy) as device tensors (read them rarely)."""
        self.train_class.copy_(torch.as_tensor(train_class))
        self.remember.copy_(torch.as_tensor(remember))
        if self.graph is None:
            self.outer_opt.zero_grad(set_to_none=True)
            self.loss, self.acc = self._step()
        else:
            self.graph.replay()
        return self.loss, self.acc


class ReplayedSteps:
    """Calls `step()` many times on a device (the CPU's steps are plain calls, `LastLayers.train_until`):
    on CUDA the first `chunk` calls eagerly on a side stream (Adam allocates its state outside the
    graph), then from a graph of `chunk` calls captured once and replayed; elsewhere (`on_cuda` False:
    the tests' stand-in device) eagerly. `step` must read its position from device tensors, since the
    graph records it once (the meta-test's `frozen_features.SequenceStep` does)."""

    def __init__(self, step, chunk, on_cuda):
        self.step, self.chunk, self.capture = step, chunk, on_cuda and CAPTURE
        self.done, self.graph = 0, None  # calls made so far

    def advance(self, steps, bar=None):
        """Make `steps` more calls, counted on the tqdm `bar` if given."""
        while steps > 0:
            if self.capture and self.graph is None and self.done >= self.chunk and steps >= self.chunk:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):  # capture records, it does not run
                    for _ in range(self.chunk):
                        self.step()
            if self.graph is not None and steps >= self.chunk:
                self.graph.replay()
                taken = self.chunk
            else:
                with side_stream(self.capture and self.graph is None):
                    self.step()
                taken = 1
            self.done += taken
            steps -= taken
            if bar is not None:
                bar.update(taken)
