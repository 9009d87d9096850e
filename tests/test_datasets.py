"""Tests of the Omniglot loading, caching, verification and OmniSampler, on the real shared copy."""
import io
import os
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import DataError, OmniSampler, load_omniglot, resolve_data_root
from datasets import omniglot
from datasets.omniglot import find_sources
from protocol import NUM_BACKGROUND, NUM_EVALUATION


def test_arrays(sampler):
    for t, n in [(sampler.background, NUM_BACKGROUND), (sampler.evaluation, NUM_EVALUATION)]:
        assert (n, 20, 1, 28, 28) == tuple(t.shape) and t.dtype == torch.float32
        assert t.min() == 0 and t.max() == 1


@pytest.mark.parametrize("split", ["images_background", "images_evaluation"])
def test_preprocessing_matches_pil(sampler, omniglot_root, split):
    """Array [class, drawer] equals a direct PIL LANCZOS resize, classes ordered by alphabet/character."""
    data = sampler.background if split == "images_background" else sampler.evaluation
    with zipfile.ZipFile(omniglot_root / f"{split}.zip") as z:
        pngs = sorted(n for n in z.namelist() if n.endswith(".png"))
        classes = sorted({tuple(n.split("/")[1:3]) for n in pngs})
        for name in [pngs[0], pngs[len(pngs) // 3 + 7], pngs[-1]]:
            _, alphabet, character, fname = name.split("/")
            c = classes.index((alphabet, character))
            drawer = int(fname[-6:-4]) - 1
            im = Image.open(io.BytesIO(z.read(name))).convert("L").resize((28, 28), resample=Image.LANCZOS)
            expected = np.array(im, dtype=np.float32) / 255
            np.testing.assert_array_equal(data[c, drawer, 0].numpy(), expected)


def test_cached_load(sampler, omniglot_root, cache_dir, monkeypatch):
    """A second load reads the cache: it never preprocesses the images again."""
    before = sorted(os.listdir(omniglot_root))

    def preprocess(*args, **kwargs):
        raise AssertionError("preprocessed again instead of reading the cache")
    monkeypatch.setattr(omniglot, "_preprocess", preprocess)
    bg, ev = load_omniglot(omniglot_root, cache_dir=cache_dir, download=False)
    assert bg.dtype == np.float32 and ev.dtype == np.float32
    np.testing.assert_array_equal(bg, sampler.background[:, :, 0].numpy())
    np.testing.assert_array_equal(ev, sampler.evaluation[:, :, 0].numpy())
    assert len(list(cache_dir.glob("omniglot-28px-*.npz"))) == 1  # (84px ones belong to OML)
    assert sorted(os.listdir(omniglot_root)) == before  # nothing written into the data root


def test_sample_train(sampler):
    train_data, c, (ims, labels) = sampler.sample_train(remember_size=64)
    assert isinstance(c, int) and 0 <= c < NUM_BACKGROUND and len(train_data) == 20
    for i, (x, y) in enumerate(train_data):
        assert x.shape == (1, 1, 28, 28) and y.shape == (1,) and y.dtype == torch.int64 and y.item() == c
        assert torch.equal(x[0], sampler.background[c, i])  # drawer order
    assert ims.shape == (84, 1, 28, 28) and ims.dtype == torch.float32
    assert labels.shape == (84,) and labels.dtype == torch.int64
    assert torch.equal(ims[:20], sampler.background[c]) and (labels[:20] == c).all()
    rem, rem_labels = ims[20:], labels[20:]
    assert len(torch.unique(rem.flatten(1), dim=0)) == 64  # drawn without replacement
    for x, y in zip(rem, rem_labels):  # each remembered image belongs to its labelled class
        assert (sampler.background[y] == x).flatten(1).all(1).any()


def test_sample_test(sampler, omniglot_root, cache_dir):
    other = OmniSampler(omniglot_root, seed=123, cache_dir=cache_dir)
    classes, train_idx, test_idx = other.sample_test_indices(10)
    train_tasks, (ims, labels), classes2 = OmniSampler(omniglot_root, seed=123, cache_dir=cache_dir).sample_test(10)
    np.testing.assert_array_equal(classes, classes2)  # sample_test consumes the generator identically
    assert len(set(classes.tolist())) == 10 and ((0 <= classes) & (classes < NUM_EVALUATION)).all()
    assert train_idx.shape == (10, 15) and test_idx.shape == (10, 5)
    for tr, te in zip(train_idx, test_idx):
        assert sorted(tr.tolist() + te.tolist()) == list(range(20))
    assert len(train_tasks) == 10 and ims.shape == (50, 1, 28, 28) and labels.shape == (50,)
    for c, task, tr in zip(classes, train_tasks, train_idx):
        assert len(task) == 15
        for (x, y), i in zip(task, tr):
            assert x.shape == (1, 1, 28, 28) and y.tolist() == [c] and torch.equal(x[0], sampler.evaluation[c, i])
    np.testing.assert_array_equal(labels.numpy(), np.repeat(classes, 5))
    np.testing.assert_array_equal(ims.numpy(), sampler.evaluation[classes[:, None], test_idx].flatten(0, 1).numpy())


def test_seeding(omniglot_root, cache_dir):
    def draw(seed):
        s = OmniSampler(omniglot_root, seed=seed, cache_dir=cache_dir)
        _, c, (ims, labels) = s.sample_train()
        _, (tims, tlabels), classes = s.sample_test(20)
        return c, labels, tlabels, classes, ims, tims
    a, b, d = draw(7), draw(7), draw(8)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(a[1], d[1]) and not np.array_equal(a[3], d[3])


def test_bad_arguments(sampler):
    for kwargs, message in [(dict(num_tasks=0), r"num_tasks must be in 1\.\.659, got 0"),
                            (dict(num_tasks=660), r"num_tasks must be in 1\.\.659, got 660"),
                            (dict(num_tasks=5, train_examples=0), r"train_examples must be in 1\.\.19, got 0"),
                            (dict(num_tasks=5, train_examples=20), r"train_examples must be in 1\.\.19, got 20")]:
        with pytest.raises(ValueError, match=message):
            sampler.sample_test(**kwargs)


def test_the_split_is_scikit_learns():
    """The sampler's split of a class's 20 drawers is scikit-learn's train_test_split, as higherANML
    calls it, for every training size and many seeds."""
    from sklearn.model_selection import train_test_split as sklearn_split
    from datasets.sampler import train_test_split
    for seed in range(0, 2**31 - 1, 2**31 // 300):
        for train_examples in (1, 5, 15, 19):
            expected = sklearn_split(np.arange(20), train_size=train_examples, random_state=seed)
            for ours, theirs in zip(train_test_split(train_examples, seed), expected):
                np.testing.assert_array_equal(ours, theirs)


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIGLOT_ROOT", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv("OMNIGLOT_ROOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root() == tmp_path / "xdg" / "higherANML" / "omniglot"
    # torchvision's layout is found; extracted folders are preferred over zips
    (tmp_path / "omniglot-py" / "images_background").mkdir(parents=True)
    (tmp_path / "images_background.zip").touch()
    (tmp_path / "omniglot-py" / "images_evaluation.zip").touch()
    assert find_sources(tmp_path) == {"images_background": tmp_path / "omniglot-py" / "images_background",
                                      "images_evaluation": tmp_path / "omniglot-py" / "images_evaluation.zip"}


def test_a_data_root_without_omniglot_is_named_and_never_downloaded_into(tmp_path, cache_dir, monkeypatch):
    """An explicit data root (--data-root, OMNIGLOT_ROOT) that does not hold Omniglot is an error that
    names it and what was looked for; one that does not exist is not created; neither is downloaded
    into, even where downloading is allowed."""
    monkeypatch.delenv("OMNIGLOT_ROOT", raising=False)
    monkeypatch.setattr(omniglot, "download_omniglot", lambda *a, **k: pytest.fail("downloaded"))
    typo = tmp_path / "omniglott"
    with pytest.raises(DataError, match=rf"--data-root {typo} does not exist \(nothing was created or downloaded\)"):
        load_omniglot(typo, download=True, cache_dir=cache_dir)
    assert not typo.exists()
    with pytest.raises(DataError, match=rf"--data-root {tmp_path} does not hold Omniglot: no images_background or "
                                        rf"images_evaluation .* in it or in {tmp_path / 'omniglot'}"):
        load_omniglot(tmp_path, download=True, cache_dir=cache_dir)
    monkeypatch.setenv("OMNIGLOT_ROOT", str(tmp_path))
    with pytest.raises(DataError, match=rf"OMNIGLOT_ROOT {tmp_path} does not hold Omniglot"):
        load_omniglot(download=True, cache_dir=cache_dir)
    assert not list(tmp_path.iterdir())  # nothing was created or downloaded


def test_a_parent_folder_of_omniglot_is_found(tmp_path, omniglot_root, cache_dir, sampler):
    (tmp_path / "omniglot").mkdir()
    for split in ("images_background", "images_evaluation"):
        os.symlink(omniglot_root / f"{split}.zip", tmp_path / "omniglot" / f"{split}.zip")
    background, _ = load_omniglot(tmp_path, download=False, cache_dir=cache_dir)
    np.testing.assert_array_equal(background, sampler.background[:, :, 0].numpy())


def test_missing_cache_data_without_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("OMNIGLOT_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DataError, match=r"Omniglot is not in .*higherANML/omniglot \(the per-user cache\) and "
                                        r"--no-download is set: point --data-root DIR"):
        load_omniglot(download=False, cache_dir=tmp_path / "fresh_cache")  # no root remembered there


def test_a_cache_that_does_not_hold_every_class_is_rebuilt(tmp_path, omniglot_root, sampler, cache_dir,
                                                           monkeypatch, capsys):
    """A cache file of the right name holding 10 background classes is refused (with a notice) and
    rebuilt; a temporary file of a killed cache write is removed."""
    session_cache = cache_dir / f"omniglot-28px-{omniglot._cache_key(find_sources(omniglot_root), 28)}.npz"
    with np.load(session_cache) as f:
        arrays = {k: f[k] for k in f.files}
    monkeypatch.setattr(omniglot, "_preprocess", lambda sources, im_size: arrays)  # the rebuild, without decoding
    cache = tmp_path / "cache"
    cache.mkdir()
    with open(cache / session_cache.name, "wb") as f:
        np.savez(f, images_background=arrays["images_background"][:10], images_evaluation=arrays["images_evaluation"])
    stale = cache / f".{session_cache.name}.999999999.tmp"
    stale.write_bytes(b"partial")
    background, _ = load_omniglot(omniglot_root, download=False, cache_dir=cache)
    assert re.search(r"^notice: ignoring the cache .*: its images_background is uint8 \(10, 20, 28, 28\), not uint8 "
                     r"\(964, 20, 28, 28\); preprocessing again$", capsys.readouterr().err, re.M)
    assert background.shape == (964, 20, 28, 28) and not stale.exists()
    with np.load(cache / session_cache.name) as f:
        assert f["images_background"].shape == (964, 20, 28, 28)  # the cache was written again, whole


def _fake_zip(path, split, num_classes, data=b"not a png"):
    with zipfile.ZipFile(path, "w") as z:
        for c in range(num_classes):
            for d in range(20):
                z.writestr(f"{split}/Alphabet{c // 50:02d}/character{c % 50 + 1:02d}/{c:04d}_{d + 1:02d}.png", data)


def test_truncated_zip(tmp_path, omniglot_root, cache_dir):
    (tmp_path / "images_background.zip").write_bytes((omniglot_root / "images_background.zip").read_bytes()[:5000])
    os.symlink(omniglot_root / "images_evaluation.zip", tmp_path / "images_evaluation.zip")
    with pytest.raises(DataError, match="images_background.zip"):
        load_omniglot(tmp_path, download=False, cache_dir=cache_dir)


def test_zip_missing_classes(tmp_path, cache_dir):
    _fake_zip(tmp_path / "images_background.zip", "images_background", 3)
    _fake_zip(tmp_path / "images_evaluation.zip", "images_evaluation", 659)
    with pytest.raises(DataError, match=r"images_background.zip is incomplete.*964"):
        load_omniglot(tmp_path, download=False, cache_dir=cache_dir)


def test_unreadable_png(tmp_path, cache_dir):
    _fake_zip(tmp_path / "images_background.zip", "images_background", 964)
    _fake_zip(tmp_path / "images_evaluation.zip", "images_evaluation", 659)
    with pytest.raises(DataError, match=r"images_(background|evaluation).zip: cannot read image"):
        load_omniglot(tmp_path, download=False, cache_dir=cache_dir)
    assert not list(cache_dir.glob("*.tmp"))


def test_smaller_episode_is_the_first_classes_of_a_larger_one(sampler):
    """From the same generator state, N classes are the first N of any larger draw, with the same splits."""
    draws = {}
    for n in (10, 600):
        sampler.rng = np.random.default_rng(31)
        draws[n] = sampler.sample_test_indices(n)
    for small, large in zip(draws[10], draws[600]):
        np.testing.assert_array_equal(small, large[:10])
    assert len(set(draws[600][0].tolist())) == 600


# ----------------------------------------------------------------------------- the remembered data root

@pytest.fixture
def fresh_cache(tmp_path, omniglot_root, cache_dir, monkeypatch):
    """A new, empty $HIGHERANML_CACHE holding only the session's preprocessed arrays (nothing to decode
    again), with no data root named and an empty per-user data folder that is never downloaded into."""
    fresh = tmp_path / "cache"
    fresh.mkdir()
    name = f"omniglot-28px-{omniglot._cache_key(find_sources(omniglot_root), 28)}.npz"
    os.symlink(cache_dir / name, fresh / name)
    monkeypatch.setenv("HIGHERANML_CACHE", str(fresh))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("OMNIGLOT_ROOT", raising=False)
    monkeypatch.setattr(omniglot, "download_omniglot", lambda *a, **k: pytest.fail("downloaded"))
    return fresh


def linked_copy(folder, omniglot_root):
    """A data root of links to the two real zips (the same sources, so the same cached arrays)."""
    folder.mkdir()
    for split in ("images_background", "images_evaluation"):
        os.symlink(omniglot_root / f"{split}.zip", folder / f"{split}.zip")
    return folder


def test_a_data_root_found_once_is_found_by_later_runs_that_name_none(fresh_cache, omniglot_root, sampler,
                                                                      monkeypatch):
    """A run given --data-root (or OMNIGLOT_ROOT) remembers it in the cache folder; a later run with
    neither reads the same data from it, downloading nothing."""
    background, _ = load_omniglot(omniglot_root, download=True)
    assert (fresh_cache / "omniglot_root.txt").read_text() == f"{omniglot_root}\n"
    again, evaluation = load_omniglot(download=True)
    np.testing.assert_array_equal(again, background)
    np.testing.assert_array_equal(evaluation, sampler.evaluation[:, :, 0].numpy())
    other = linked_copy(fresh_cache.parent / "other", omniglot_root)
    monkeypatch.setenv("OMNIGLOT_ROOT", str(other))  # the variable is remembered too, and replaces the root
    load_omniglot()
    assert (fresh_cache / "omniglot_root.txt").read_text() == f"{other}\n"


def test_a_remembered_root_that_is_gone_is_one_line_naming_it(fresh_cache, omniglot_root, tmp_path, monkeypatch):
    """A remembered root deleted since: one line naming it, the file that keeps it and the fixes; a root
    named now (--data-root, OMNIGLOT_ROOT) still comes first."""
    gone = linked_copy(tmp_path / "moved", omniglot_root)
    load_omniglot(gone)
    for link in gone.iterdir():
        link.unlink()
    gone.rmdir()
    file = fresh_cache / "omniglot_root.txt"
    with pytest.raises(DataError) as failure:
        load_omniglot(download=True)
    message = str(failure.value)
    assert message == (f"the remembered data root {gone} (kept in {file}) does not exist (nothing was created or "
                       f"downloaded): give --data-root DIR (or set OMNIGLOT_ROOT=DIR) for the folder that holds "
                       f"images_background.zip and images_evaluation.zip, or remove {file} to use the per-user "
                       f"cache {tmp_path / 'xdg' / 'higherANML' / 'omniglot'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("OMNIGLOT_ROOT", str(empty))
    with pytest.raises(DataError, match=rf"^OMNIGLOT_ROOT {empty} does not hold Omniglot"):
        load_omniglot()
    monkeypatch.delenv("OMNIGLOT_ROOT")
    load_omniglot(omniglot_root)  # the flag wins, and is remembered in place of the root that went away
    assert file.read_text() == f"{omniglot_root}\n"
