"""Omniglot: find (or download) the two official archives, verify and preprocess them, cache the result.

The data root holds `images_background.zip` / `images_evaluation.zip`, their extracted folders, or
torchvision's `omniglot-py/` layout. Images are read straight from the zips (nothing is extracted, so the
root may be read-only), resized as the original higherANML code does, and cached as uint8 `.npz` in a
separate, writable cache folder.
"""
import contextlib
import hashlib
import io
import json
import os
import signal
import urllib.error
import urllib.request
import zipfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from harness.atomic import remove_stale_temporaries, write_atomic
from harness.cli import notice
from protocol import IMAGES_PER_CLASS, NUM_BACKGROUND, NUM_EVALUATION

SPLITS = ("images_background", "images_evaluation")
NUM_CLASSES = {"images_background": NUM_BACKGROUND, "images_evaluation": NUM_EVALUATION}
BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
MD5S = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
CACHE_VERSION = 1  # bump when the preprocessing changes


class DataError(OSError):
    """The Omniglot data is missing, corrupt or could not be downloaded (an OSError: the scripts
    report it as one `error:` line, as they report other files they cannot read or write)."""


def _user_cache():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "higherANML"


def resolve_data_root(data_root=None):
    """The data root: the argument, else $OMNIGLOT_ROOT, else ~/.cache/higherANML/omniglot (XDG aware)."""
    root = data_root or os.environ.get("OMNIGLOT_ROOT") or _user_cache() / "omniglot"
    return Path(root).expanduser()


def data_root_source(data_root=None):
    """Who named the data root: "--data-root", "OMNIGLOT_ROOT", or None for the per-user cache."""
    return "--data-root" if data_root else "OMNIGLOT_ROOT" if os.environ.get("OMNIGLOT_ROOT") else None


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

PROVIDE_IT = ("or download images_background.zip and images_evaluation.zip yourself into a folder DIR and "
              "pass --data-root DIR (with make: make demo DATA=\"--data-root DIR\"), or set OMNIGLOT_ROOT=DIR")


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
    except DataError:
        raise
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


def leave_stops_to_the_parent():
    """A decoding worker ignores Ctrl-C and dies quietly when the pool ends it: the script that
    started it says what happened, once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


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
    total = sum(len(names) for _, (_, names, _) in jobs)
    with tqdm(total=total, desc="preprocessing Omniglot (once, then cached)", unit="image", unit_scale=True) as bar, \
            Pool(workers, initializer=leave_stops_to_the_parent) if workers > 1 else contextlib.nullcontext() as pool:
        parts = []
        for part in (pool.imap(_read_pngs, [j for _, j in jobs]) if pool else map(_read_pngs, [j for _, j in jobs])):
            parts.append(part)
            bar.update(len(part))
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


REMEMBERED_ROOT = "omniglot_root.txt"  # in the cache folder: the last data root a run was given


def remembered_root_file(cache_dir=None):
    """The file that keeps the last data root named by --data-root or $OMNIGLOT_ROOT (in the cache folder)."""
    return resolve_cache_dir(cache_dir) / REMEMBERED_ROOT


def read_remembered_root(cache_dir=None):
    """The remembered data root, or None when there is none (no file, or an empty or unreadable one)."""
    try:
        text = remembered_root_file(cache_dir).read_text(encoding="utf-8").rstrip("\n")
    except (OSError, UnicodeDecodeError):
        return None
    return Path(text) if text else None


def remember_root(root, cache_dir=None):
    """Keep `root` (made absolute) for later runs that name no data root; a failure is only a notice."""
    root, file = os.path.abspath(Path(root).expanduser()), remembered_root_file(cache_dir)
    if read_remembered_root(cache_dir) == Path(root):
        return
    try:
        write_atomic(file, lambda tmp: Path(tmp).write_text(f"{root}\n", encoding="utf-8"))
    except OSError as e:
        notice(f"could not remember the data root {root} in {file}: {e}")


def find_in_named_root(root, name, fix):
    """{split: folder or zip} under a root the user named (or DIR/omniglot); else a DataError that
    starts with `name` (who named the root, and the root) and ends with `fix`. Nothing is created or
    downloaded there."""
    for folder in (root, root / "omniglot"):
        sources = find_sources(folder)
        if all(sources.values()):
            return sources
    if not root.exists():
        raise DataError(f"{name} does not exist (nothing was created or downloaded): {fix}")
    missing = [s for s, p in find_sources(root).items() if p is None]
    raise DataError(f"{name} does not hold Omniglot: no {' or '.join(missing)} (.zip, extracted, or under "
                    f"omniglot-py/) in it or in {root / 'omniglot'}; {fix}")


def locate_in_user_cache(download):
    """{split: folder or zip} in the per-user cache, downloaded there when missing and `download` allows."""
    root = resolve_data_root(None)
    sources = find_sources(root)
    if all(sources.values()):
        return sources
    if not download:
        raise DataError(f"Omniglot is not in {root} (the per-user cache) and --no-download is set: point "
                        f"--data-root DIR (or OMNIGLOT_ROOT=DIR) at a folder that holds images_background.zip "
                        f"and images_evaluation.zip, or drop --no-download to download them from {BASE_URL}")
    download_omniglot(root)
    return find_sources(root)


def locate_omniglot(data_root=None, download=True, cache_dir=None):
    """{split: folder or zip} of Omniglot. A data root given explicitly (`data_root`, else
    $OMNIGLOT_ROOT), else the one remembered from an earlier run (`remembered_root_file`), must hold
    it, or DIR/omniglot must: it is never created or downloaded into. Otherwise the per-user cache is
    used, and the archives are downloaded into it when they are missing and `download` allows."""
    source, remembered = data_root_source(data_root), read_remembered_root(cache_dir)
    if source is not None:
        root = resolve_data_root(data_root)
        unset = f"read the remembered data root {remembered}" if remembered else \
            f"download them into {_user_cache() / 'omniglot'}"
        return find_in_named_root(root, f"{source} {root}", fix=(
            f"point {source} at the folder with the two zips (images_background.zip and images_evaluation.zip), "
            f"or leave it unset to {unset}"))
    if remembered is None:
        return locate_in_user_cache(download)
    file = remembered_root_file(cache_dir)
    return find_in_named_root(remembered, f"the remembered data root {remembered} (kept in {file})", fix=(
        f"give --data-root DIR (or set OMNIGLOT_ROOT=DIR) for the folder that holds images_background.zip and "
        f"images_evaluation.zip, or remove {file} to use the per-user cache {_user_cache() / 'omniglot'}"))


def read_cache(cache, im_size):
    """The cached arrays, or None (with a warning) when the file is unreadable or does not hold
    every class of both splits at this image size."""
    try:
        with np.load(cache) as f:
            arrays = {s: f[s] for s in SPLITS}
    except Exception as e:
        notice(f"ignoring the unreadable cache {cache} ({e}): preprocessing again")
        return None
    for s, a in arrays.items():
        expected = (NUM_CLASSES[s], IMAGES_PER_CLASS, im_size, im_size)
        if a.shape != expected or a.dtype != np.uint8:
            notice(f"ignoring the cache {cache}: its {s} is {a.dtype} {a.shape}, not uint8 {expected}; "
                    f"preprocessing again")
            return None
    return arrays


def load_omniglot(root=None, im_size=28, download=True, cache_dir=None):
    """Return (background [964, 20, S, S], evaluation [659, 20, S, S]) float32 arrays in [0, 1].

    Preprocessing as higherANML: PIL convert("L"), LANCZOS resize to im_size, /255. Classes are sorted by
    alphabet then character, images by drawer. Results are cached in cache_dir (see resolve_cache_dir),
    where a data root named by `root` or $OMNIGLOT_ROOT is remembered too (`remember_root`).
    """
    sources = locate_omniglot(root, download, cache_dir)
    cache_dir = resolve_cache_dir(cache_dir)
    cache = cache_dir / f"omniglot-{im_size}px-{_cache_key(sources, im_size)}.npz"
    arrays = read_cache(cache, im_size) if cache.is_file() else None
    if arrays is None:
        arrays = _preprocess(sources, im_size)
        try:
            def save(tmp):
                with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a name
                    np.savez(f, **arrays)
            if cache_dir.is_dir():
                remove_stale_temporaries(cache_dir)
            write_atomic(cache, save)
        except OSError as e:
            notice(f"could not write the Omniglot cache {cache}: {e}")
    if data_root_source(root) is not None:  # found and read: later runs that name no root find it too
        remember_root(resolve_data_root(root), cache_dir)
    return tuple(arrays[s].astype(np.float32) / np.float32(255) for s in SPLITS)
