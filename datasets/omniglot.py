"""Omniglot: find (or download) the two official archives, verify and preprocess them, cache the result.

The data root holds `images_background.zip` / `images_evaluation.zip`, their extracted folders, or
torchvision's `omniglot-py/` layout. Images are read straight from the zips (nothing is extracted, so the
root may be read-only), resized as the original higherANML code does, and cached as uint8 `.npz` in a
separate, writable cache folder.
"""
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
import warnings
import zipfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from atomic import write_atomic

SPLITS = ("images_background", "images_evaluation")
NUM_BACKGROUND = 964
NUM_EVALUATION = 659
NUM_CLASSES = {"images_background": NUM_BACKGROUND, "images_evaluation": NUM_EVALUATION}
IMAGES_PER_CLASS = 20
BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
MD5S = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
CACHE_VERSION = 1  # bump when the preprocessing changes


class DataError(RuntimeError):
    """The Omniglot data is missing, corrupt or could not be downloaded."""


def _user_cache():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "higherANML"


def resolve_data_root(data_root=None):
    """The data root: the argument, else $OMNIGLOT_ROOT, else ~/.cache/higherANML/omniglot (XDG aware)."""
    root = data_root or os.environ.get("OMNIGLOT_ROOT") or _user_cache() / "omniglot"
    return Path(root).expanduser()


def resolve_cache_dir(cache_dir=None):
    """The preprocessed-array cache: the argument, else $HIGHERANML_CACHE, else ~/.cache/higherANML."""
    return Path(cache_dir or os.environ.get("HIGHERANML_CACHE") or _user_cache()).expanduser()


def _candidates(root, split):
    """Where a split may live under root, in order of preference (extracted folders first)."""
    return [root / split, root / "omniglot-py" / split,
            root / f"{split}.zip", root / "omniglot-py" / f"{split}.zip"]


def find_sources(root):
    """Map each split to its first existing folder or zip under root (None where there is none)."""
    return {s: next((p for p in _candidates(root, s) if p.is_dir() or p.is_file()), None) for s in SPLITS}


# ----------------------------------------------------------------------------- download

PROVIDE_IT = ("or download images_background.zip and images_evaluation.zip yourself into a folder and "
              "pass --data-root DIR (or set OMNIGLOT_ROOT=DIR)")


def _download_one(url, dest, md5, progress):
    """Stream url into a temporary file beside dest, check its MD5, then move it into place."""
    written = False

    def fetch(tmp):
        nonlocal written
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                received = 0
                while chunk := r.read(1 << 20):
                    written = True
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                    received += len(chunk)
        if total and received < total:
            raise ConnectionError(f"the connection closed after {received} of {total} bytes")
        if digest.hexdigest() != md5:
            raise DataError(f"download of {url} was corrupted (md5 {digest.hexdigest()}, expected {md5}); "
                            f"the file was removed: try again, {PROVIDE_IT}")

    try:
        write_atomic(dest, fetch)
    except (OSError, urllib.error.URLError) as e:  # HTTPError, timeouts and disk errors included
        partial = "; the partial file was removed" if written else ""
        raise DataError(f"could not download {url} to {dest}: {e}{partial}. Check the connection and run "
                        f"again, {PROVIDE_IT}") from e


def download_omniglot(root=None, base_url=None, md5s=None, progress=True):
    """Download the two official Omniglot zips into root (skipping those present); return their paths.

    base_url defaults to $OMNIGLOT_BASE_URL, else the brendenlake/omniglot GitHub repository;
    md5s maps split name -> expected MD5 (default: the official sums).
    """
    root = resolve_data_root(root)
    base_url = (base_url or os.environ.get("OMNIGLOT_BASE_URL") or BASE_URL).rstrip("/")
    md5s = md5s or MD5S
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data folder {root}: {e}") from e
    paths = {}
    for split in SPLITS:
        dest = root / f"{split}.zip"
        if not dest.is_file():
            _download_one(f"{base_url}/{split}.zip", dest, md5s[split], progress)
        paths[split] = dest
    return paths


# ----------------------------------------------------------------------------- listing and preprocessing

def _list_split(source, split):
    """Verify the layout of one split and return its PNGs as [class][drawer] names, classes sorted by
    (alphabet, character) and images by file name. Names are zip members or paths relative to source."""
    classes = {}
    if source.is_dir():
        for png in source.glob("*/*/*.png"):
            classes.setdefault((png.parts[-3], png.parts[-2]), []).append(str(png.relative_to(source)))
    else:
        try:
            with zipfile.ZipFile(source) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{source} is not a readable zip archive ({e}); delete it and download it again") from e
        for name in names:
            parts = name.split("/")
            if name.endswith(".png") and len(parts) >= 3 and not parts[0].startswith(("__MACOSX", ".")):
                classes.setdefault((parts[-3], parts[-2]), []).append(name)
    bad = {k: len(v) for k, v in classes.items() if len(v) != IMAGES_PER_CLASS}
    if len(classes) != NUM_CLASSES[split] or bad:
        detail = f"; classes with a wrong image count: {dict(list(bad.items())[:5])}" if bad else ""
        raise DataError(f"{source} is incomplete: expected {NUM_CLASSES[split]} classes of {IMAGES_PER_CLASS} "
                        f"images each, found {len(classes)} classes{detail}")
    return [sorted(classes[k]) for k in sorted(classes)]


def _read_pngs(job):
    """Worker: read and resize a list of PNGs from one folder or zip -> uint8 array [n, size, size]."""
    source, names, im_size = job
    source = Path(source)
    z = None if source.is_dir() else zipfile.ZipFile(source)
    out = np.empty((len(names), im_size, im_size), dtype=np.uint8)
    try:
        for i, name in enumerate(names):
            try:
                f = io.BytesIO(z.read(name)) if z else source / name
                with Image.open(f) as im:
                    out[i] = np.asarray(im.convert("L").resize((im_size, im_size), resample=Image.LANCZOS))
            except Exception as e:
                raise DataError(f"{source}: cannot read image {name} ({e}); the copy is corrupt") from None
    finally:
        if z:
            z.close()
    return out


def _preprocess(sources, im_size, workers=None):
    """Read every image of every split -> {split: uint8 array [classes, 20, size, size]}."""
    listing = {s: _list_split(src, s) for s, src in sources.items()}  # cheap; fail before decoding
    jobs = []
    for s, classes in listing.items():
        flat = [n for c in classes for n in c]
        step = -(-len(flat) // 8)
        jobs += [(s, (str(sources[s]), flat[i:i + step], im_size)) for i in range(0, len(flat), step)]
    workers = workers or min(2, os.cpu_count() or 1)
    if workers > 1:
        with Pool(workers) as pool:
            parts = pool.map(_read_pngs, [j for _, j in jobs], chunksize=1)
    else:
        parts = [_read_pngs(j) for _, j in jobs]
    return {s: np.concatenate([p for (js, _), p in zip(jobs, parts) if js == s])
            .reshape(NUM_CLASSES[s], IMAGES_PER_CLASS, im_size, im_size) for s in sources}


def _tree_stats(folder):
    """(relative path, size, mtime_ns) of every file two folders below folder (alphabet/character/*)."""
    out = []
    for a in os.scandir(folder):
        for c in (os.scandir(a.path) if a.is_dir() else ()):
            for f in (os.scandir(c.path) if c.is_dir() else ()):
                st = f.stat()
                out.append((f"{a.name}/{c.name}/{f.name}", st.st_size, st.st_mtime_ns))
    return sorted(out)


def _cache_key(sources, im_size):
    """Hash of the sources' resolved paths, sizes and mtimes (of every file, for extracted folders)."""
    stats = []
    for s, src in sources.items():
        st = src.stat()
        files = _tree_stats(src) if src.is_dir() else [st.st_size, st.st_mtime_ns]
        stats.append((s, str(src.resolve()), files))
    blob = json.dumps([CACHE_VERSION, im_size, stats]).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def load_omniglot(root=None, im_size=28, download=True, cache_dir=None):
    """Return (background [964, 20, S, S], evaluation [659, 20, S, S]) float32 arrays in [0, 1].

    Preprocessing as higherANML: PIL convert("L"), LANCZOS resize to im_size, /255. Classes are sorted by
    alphabet then character, images by drawer. Results are cached in cache_dir (see resolve_cache_dir).
    """
    root = resolve_data_root(root)
    sources = find_sources(root)
    missing = [s for s, p in sources.items() if p is None]
    if missing and not download:
        looked = ", ".join(str(p) for s in missing for p in _candidates(root, s))
        raise DataError(
            f"Omniglot not found in {root} (looked for {looked}) and --no-download is set: point "
            f"--data-root DIR (or OMNIGLOT_ROOT=DIR) at a folder that holds images_background.zip and "
            f"images_evaluation.zip, or drop --no-download to download them from {BASE_URL}")
    if missing:
        download_omniglot(root)
        sources = find_sources(root)

    cache = resolve_cache_dir(cache_dir) / f"omniglot-{im_size}px-{_cache_key(sources, im_size)}.npz"
    arrays = None
    if cache.is_file():
        try:
            with np.load(cache) as f:
                arrays = {s: f[s] for s in SPLITS}
        except Exception as e:  # unreadable cache: rebuild it
            warnings.warn(f"ignoring unreadable cache {cache}: {e}")
    if arrays is None:
        arrays = _preprocess(sources, im_size)
        try:
            def save(tmp):
                with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a name
                    np.savez(f, **arrays)
            write_atomic(cache, save)
        except OSError as e:
            warnings.warn(f"could not write the Omniglot cache {cache}: {e}")
    return tuple(arrays[s].astype(np.float32) / np.float32(255) for s in SPLITS)
