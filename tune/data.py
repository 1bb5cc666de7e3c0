"""Datasets as uint8 arrays: decoded once, cached on disk, split by index.

A dataset is named by a string:
  cifar10           torchvision's CIFAR-10, downloaded into data_dir if missing
  imagefolder:PATH  a folder or .tar.gz holding train/<class>/* and test/<class>/*
  synthetic         small deterministic class-conditional images, for tests
  synthetic:nan     the same, but with images whose loss is NaN (tests divergence)
"""

import contextlib
import hashlib
import io
import math
import os
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tune.config import UserError

IMAGE_SIZE = 32
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm")
# Class-sorted sources are shuffled once with this seed (never the trial's), so
# "the last 10,000 training images" hold every class and every trial sees the
# same split.
SPLIT_SEED = 0
CACHE_VERSION = 1


class DataError(UserError):
    """The dataset cannot be found or read. The message says what to do."""


@dataclass
class Dataset:
    """The whole dataset in memory: images (N, 3, 32, 32) uint8, labels (N,) int64."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    source: str
    from_cache: bool = False
    poison: bool = False
    """synthetic:nan: its inputs normalize to NaN, so training diverges for certain."""


@dataclass
class Split:
    """The arrays one trial trains and evaluates on (views into a Dataset)."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    poison: bool = False

    def normalization(self, kind: str) -> tuple[list[float], list[float]]:
        """Per-channel (mean, 1/std) for the inputs: center is the study's (x - 128) / 255, standardize
        the training split's own statistics. A poisoned source scales by NaN: its loss diverges at once."""
        if kind == "center":
            mean, inv_std = [128.0] * 3, [1 / 255] * 3
        else:
            pixels = self.train_x.transpose(1, 0, 2, 3).reshape(3, -1)
            mean, inv_std = list(pixels.mean(axis=1, dtype=np.float64)), list(1 / pixels.std(axis=1, dtype=np.float64))
        return mean, [math.nan] * 3 if self.poison else inv_std


def split(ds: Dataset, val_size: int, limit: int = 0, eval_limit: int = 0) -> Split:
    """Validation is the last `val_size` training images (at most a fifth); the model trains on the rest."""
    n = len(ds.train_y)
    n_val = min(val_size, n // 5)
    n_train = n - n_val
    if limit:
        n_train = min(limit, n_train)
    n_eval = eval_limit or max(n, len(ds.test_y))
    val = slice(n - n_val, n - n_val + min(n_val, n_eval))
    return Split(
        ds.train_x[:n_train], ds.train_y[:n_train],
        ds.train_x[val], ds.train_y[val],
        ds.test_x[:n_eval], ds.test_y[:n_eval], ds.poison,
    )


def digest(ds: Dataset) -> str:
    """sha256 of every image and label, in order: the same data gives the same digest wherever it was decoded.
    (MLflow's own numpy digest hashes only the first 10,000 values, about three images.)"""
    h = hashlib.sha256()
    for a in (ds.train_x, ds.train_y, ds.test_x, ds.test_y):
        h.update(np.ascontiguousarray(a).data)
    if ds.poison:
        h.update(b"synthetic:nan")  # the same arrays, but the trainer sees NaN: other data
    return h.hexdigest()


def resolve(spec: str) -> str:
    """Make an imagefolder path absolute, so Ray trials in other directories find it."""
    if spec.startswith("imagefolder:"):
        return "imagefolder:" + os.path.abspath(os.path.expanduser(spec.split(":", 1)[1]))
    return spec


def load(spec: str, data_dir: str = "./data") -> Dataset:
    """Load a dataset by name, decoding it at most once per source version."""
    if spec == "cifar10":
        return _load_cifar10(Path(data_dir))
    if spec.startswith("imagefolder:"):
        return _load_imagefolder(Path(spec.split(":", 1)[1]).expanduser().absolute(), Path(data_dir))
    if spec in ("synthetic", "synthetic:nan"):
        return synthetic(poison=spec.endswith(":nan"))
    raise DataError(f"unknown dataset {spec!r}; use cifar10, imagefolder:PATH or synthetic")


def synthetic(n_train: int = 3000, n_test: int = 1000, seed: int = 0, poison: bool = False) -> Dataset:
    """Class-conditional noise: each class has its own mean image, so a model can learn it."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(40, 215, size=(10, 3, IMAGE_SIZE, IMAGE_SIZE))

    def draw(n):
        y = rng.integers(0, 10, size=n)
        x = means[y] + rng.normal(0, 50, size=(n, 3, IMAGE_SIZE, IMAGE_SIZE))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    (train_x, train_y), (test_x, test_y) = draw(n_train), draw(n_test)
    name = "synthetic:nan" if poison else "synthetic"
    return Dataset(train_x, train_y, test_x, test_y, [f"class{i}" for i in range(10)], name, poison=poison)


# --- cache ---------------------------------------------------------------------------


def _cache_path(data_dir: Path, identity: str) -> Path:
    digest = hashlib.sha1(f"v{CACHE_VERSION}|{identity}".encode()).hexdigest()[:16]
    return data_dir / "cache" / f"{digest}.npz"


def _read_cache(path: Path, source: str) -> Dataset | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return Dataset(z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                           [str(c) for c in z["classes"]], source, from_cache=True)
    except (OSError, KeyError, ValueError, zlib.error, EOFError):
        return None  # missing or damaged: decode again


def _write_cache(path: Path, ds: Dataset) -> None:
    """Write atomically, so an interrupted write never leaves a half cache behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train_x=ds.train_x, train_y=ds.train_y, test_x=ds.test_x,
                     test_y=ds.test_y, classes=np.array(ds.classes))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        print(f"note: could not cache the decoded dataset in {path.parent} ({e.strerror}); it will be decoded again next time",
              file=sys.stderr)
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


def _cached(data_dir: Path, identity: str, source: str, decode) -> Dataset:
    path = _cache_path(data_dir, identity)
    ds = _read_cache(path, source)
    if ds is None:
        ds = decode()
        _write_cache(path, ds)
    return ds


# --- cifar10 (torchvision) -----------------------------------------------------------


def _load_cifar10(data_dir: Path) -> Dataset:
    from torchvision.datasets import CIFAR10

    root = data_dir.absolute()
    batches = root / CIFAR10.base_folder
    if not _cifar10_present(batches):
        print(f"downloading CIFAR-10 into {root} (once)", file=sys.stderr)
        try:
            # torchvision prints its progress to stdout, which must stay JSON-clean.
            with contextlib.redirect_stdout(sys.stderr):
                CIFAR10(str(root), train=True, download=True)
        except Exception as e:  # noqa: BLE001 - any network or disk failure means the same to the user
            raise DataError(
                f"CIFAR-10 is not in {root} and could not be downloaded ({type(e).__name__}: {e}); "
                f"put cifar-10-python.tar.gz in {root}, or use --data imagefolder:PATH or --data synthetic"
            ) from None
    identity = "cifar10|" + "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(batches.iterdir()))

    def decode():
        train = CIFAR10(str(root), train=True, download=False)
        test = CIFAR10(str(root), train=False, download=False)
        # torchvision's training set is already shuffled, as the study's split assumes.
        return Dataset(train.data.transpose(0, 3, 1, 2).copy(), np.array(train.targets, dtype=np.int64),
                       test.data.transpose(0, 3, 1, 2).copy(), np.array(test.targets, dtype=np.int64),
                       list(train.classes), "cifar10")

    return _cached(data_dir, identity, "cifar10", decode)


def _cifar10_present(batches: Path) -> bool:
    from torchvision.datasets import CIFAR10

    return all((batches / name).is_file() for name, _ in CIFAR10.train_list + CIFAR10.test_list)


# --- imagefolder (folder or .tar.gz) ---------------------------------------------------


def _load_imagefolder(path: Path, data_dir: Path) -> Dataset:
    source = f"imagefolder:{path}"
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist; point imagefolder: at a folder or .tar.gz "
                        f"with train/<class>/ and test/<class>/")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        identity = "dir|" + str(path) + "|" + "|".join(
            f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        return _cached(data_dir, identity, source, lambda: _decode_dir(path, source))
    st = path.stat()
    identity = f"file|{path}|{st.st_size}|{st.st_mtime_ns}"
    return _cached(data_dir, identity, source, lambda: _decode_tar(path, source))


def _decode_dir(path: Path, source: str) -> Dataset:
    members = {}
    for split_name in ("train", "test"):
        root = path / split_name
        if not root.is_dir():
            raise DataError(f"{path} has no {split_name}/ folder; it needs train/<class>/ and test/<class>/")
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            members[(split_name, class_dir.name)] = [p.read_bytes for p in files]
    return _assemble(members, source)


def _decode_tar(path: Path, source: str) -> Dataset:
    members: dict[tuple[str, str], list] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                parts = Path(m.name).parts
                start = next((i for i, p in enumerate(parts) if p in ("train", "test")), None)
                if start is None or len(parts) - start < 2:
                    continue
                parts = parts[start:]
                key = (parts[0], parts[1])
                if m.isdir() and len(parts) == 2:
                    members.setdefault(key, [])
                elif m.isfile() and len(parts) == 3 and Path(parts[2]).suffix.lower() in IMAGE_EXTENSIONS:
                    data = tar.extractfile(m).read()
                    members.setdefault(key, []).append(lambda data=data: data)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        first = str(e).strip().splitlines()[0].rstrip(":") if str(e).strip() else ""
        raise DataError(f"{path} is not a readable .tar.gz ({type(e).__name__}: {first}); download it again or point "
                        f"imagefolder: at an unpacked folder") from None
    if not members:
        raise DataError(f"{path} holds no train/<class>/ or test/<class>/ images; check the archive's layout")
    return _assemble(members, source)


def _assemble(members: dict, source: str) -> Dataset:
    """Decode every image of {(split, class): [read_bytes...]} into shuffled uint8 arrays."""
    from PIL import Image, UnidentifiedImageError

    classes = {s: sorted(c for (split_name, c) in members if split_name == s) for s in ("train", "test")}
    if not classes["train"] or not classes["test"]:
        missing = "train" if not classes["train"] else "test"
        raise DataError(f"{source} has no {missing}/<class>/ folders; it needs both train/ and test/")
    if classes["train"] != classes["test"]:
        only = sorted(set(classes["train"]) ^ set(classes["test"]))
        raise DataError(f"{source}: train and test have different classes (only in one: {', '.join(only)}); "
                        f"give both the same class folders")
    empty = [f"{s}/{c}" for (s, c), files in sorted(members.items()) if not files]
    if empty:
        raise DataError(f"{source}: class folder {empty[0]} holds no images; remove it or add images")
    total = sum(len(v) for v in members.values())
    print(f"decoding {total} images from {source} (once; the result is cached)", file=sys.stderr)
    arrays = {}
    for split_name in ("train", "test"):
        xs, ys = [], []
        for label, cls in enumerate(classes[split_name]):
            for read in members[(split_name, cls)]:
                try:
                    with Image.open(io.BytesIO(read())) as im:
                        im = im.convert("RGB")
                        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
                        xs.append(np.asarray(im, dtype=np.uint8))
                except (UnidentifiedImageError, OSError, SyntaxError) as e:
                    raise DataError(f"{source}: a {split_name}/{cls} image cannot be decoded ({e}); "
                                    f"remove or replace it") from None
                ys.append(label)
        x = np.stack(xs).transpose(0, 3, 1, 2)
        y = np.array(ys, dtype=np.int64)
        # Folders are ordered by class: shuffle once, with a fixed seed, so any prefix
        # or suffix (the validation split, an eval cap) holds every class.
        order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
        arrays[split_name] = (np.ascontiguousarray(x[order]), y[order])
    return Dataset(*arrays["train"], *arrays["test"], classes["train"], source)
