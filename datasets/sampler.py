"""OmniSampler: draws the ANML meta-training and meta-test tasks from Omniglot."""
import numpy as np
import torch

from protocol import IMAGES_PER_CLASS, REMEMBER_SIZE

from .omniglot import load_omniglot


class OmniSampler:
    """Holds Omniglot as float32 CPU tensors `background` [964, 20, 1, S, S] and `evaluation`
    [659, 20, 1, S, S]; all randomness comes from `self.rng = np.random.default_rng(seed)`."""

    def __init__(self, root=None, im_size=28, download=True, seed=None, cache_dir=None):
        bg, ev = load_omniglot(root, im_size=im_size, download=download, cache_dir=cache_dir)
        self.im_size = im_size
        self.background = torch.from_numpy(bg).unsqueeze(2)
        self.evaluation = torch.from_numpy(ev).unsqueeze(2)
        self.rng = np.random.default_rng(seed)

    def sample_train(self, remember_size=REMEMBER_SIZE, device="cpu"):
        """One meta-training episode: a random background class and `remember_size` random images.

        Returns (train_data, train_class, (valid_ims, valid_labels)): train_data is the class's 20 images
        in drawer order as (image [1, 1, S, S], label [1]) pairs; valid_ims [20 + remember_size, 1, S, S]
        are those 20 images followed by images drawn without replacement from the whole background set.
        """
        c, flat = self.sample_train_indices(remember_size)
        ims = self.background[c].to(device)
        label = torch.tensor([c], device=device)
        train_data = [(ims[i:i + 1], label) for i in range(IMAGES_PER_CLASS)]
        rem_ims = self.background.flatten(0, 1)[torch.from_numpy(flat)].to(device)
        rem_labels = torch.from_numpy(flat // IMAGES_PER_CLASS).to(device)
        valid_ims = torch.cat([ims, rem_ims])
        valid_labels = torch.cat([label.expand(IMAGES_PER_CLASS), rem_labels])
        return train_data, c, (valid_ims, valid_labels)

    def sample_train_indices(self, remember_size=REMEMBER_SIZE):
        """A meta-training episode as indices: (class, [remember_size] indices into the flattened
        background set); `sample_train` draws through it, and the CUDA graph gathers on the GPU."""
        num_classes = len(self.background)
        if not 0 <= remember_size <= num_classes * IMAGES_PER_CLASS:
            raise ValueError(f"remember_size must be in 0..{num_classes * IMAGES_PER_CLASS}, got {remember_size}")
        c = int(self.rng.integers(num_classes))
        flat = self.rng.choice(num_classes * IMAGES_PER_CLASS, size=remember_size, replace=False)
        return c, flat

    def sample_test_indices(self, num_tasks, train_examples=15):
        """Draw a meta-test episode as indices: (classes [N], train_idx [N, train_examples],
        test_idx [N, 20 - train_examples]); N distinct evaluation classes, drawer indices 0..19.

        The classes are the first N of a random order of all evaluation classes, and each class's
        split is drawn after them in that order: from the same generator state, the episode of N
        classes is the first N classes of the episode of any larger N (a 600-class run passes
        through the 10-, 50-, ... class runs on its way, which `meta_test` uses)."""
        num_classes = len(self.evaluation)
        if not 1 <= num_tasks <= num_classes:
            raise ValueError(f"num_tasks must be in 1..{num_classes}, got {num_tasks}")
        if not 1 <= train_examples <= IMAGES_PER_CLASS - 1:
            raise ValueError(f"train_examples must be in 1..{IMAGES_PER_CLASS - 1}, got {train_examples}")
        classes = self.rng.permutation(num_classes)[:num_tasks]
        splits = [train_test_split(train_examples, int(self.rng.integers(2**31 - 1))) for _ in classes]
        train_idx = np.stack([tr for tr, _ in splits])
        test_idx = np.stack([te for _, te in splits])
        return classes, train_idx, test_idx

    def sample_test(self, num_tasks, train_examples=15, device="cpu"):
        """One meta-test episode. Returns (train_tasks, (test_ims, test_labels), classes): train_tasks is a
        list over the classes of `train_examples` (image [1, 1, S, S], label [1]) pairs; test_ims
        [num_tasks * (20 - train_examples), 1, S, S]; labels are evaluation class indices."""
        classes, train_idx, test_idx = self.sample_test_indices(num_tasks, train_examples)
        train_tasks = []
        for c, idx in zip(classes, train_idx):
            ims = self.evaluation[c, idx].to(device)
            label = torch.tensor([c], device=device)
            train_tasks.append([(ims[i:i + 1], label) for i in range(len(idx))])
        test_ims = self.evaluation[classes[:, None], test_idx].flatten(0, 1).to(device)
        test_labels = torch.from_numpy(np.repeat(classes, test_idx.shape[1])).to(device)
        return train_tasks, (test_ims, test_labels), classes


def train_test_split(train_examples, random_state):
    """(train, test) drawers of one class: scikit-learn's `train_test_split(np.arange(20),
    train_size=train_examples, random_state=random_state)`, which higherANML's sampler calls, computed
    as scikit-learn does (test = the first 20 - train_examples of a RandomState permutation, train
    the rest; tests/test_datasets.py checks it against scikit-learn) without importing it."""
    permutation = np.random.RandomState(random_state).permutation(IMAGES_PER_CLASS)
    n_test = IMAGES_PER_CLASS - train_examples
    return permutation[n_test:], permutation[:n_test]
