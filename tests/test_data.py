import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from tune import data
from tune.data import DataError


def test_shared_archive_loads_whole_cifar(cifar):
    assert cifar.train_x.shape == (50_000, 3, 32, 32) and cifar.train_x.dtype == np.uint8
    assert cifar.test_x.shape == (10_000, 3, 32, 32)
    assert cifar.classes == sorted(cifar.classes) and len(cifar.classes) == 10
    assert np.bincount(cifar.train_y).tolist() == [5000] * 10
    assert np.bincount(cifar.test_y).tolist() == [1000] * 10


def test_second_load_decodes_nothing(cifar, shared_archive, data_dir):
    again = data.load(f"imagefolder:{shared_archive}", str(data_dir))
    assert again.from_cache
    assert np.array_equal(again.train_x, cifar.train_x) and np.array_equal(again.test_y, cifar.test_y)


def test_validation_split_holds_every_class(cifar):
    s = data.split(cifar, val_size=10_000)
    assert len(s.train_y) == 40_000 and len(s.val_y) == 10_000
    counts = np.bincount(s.val_y, minlength=10)
    assert counts.min() > 800  # shuffled once: about 1,000 per class, not two classes
    s = data.split(cifar, val_size=10_000, limit=5000, eval_limit=1000)
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (5000, 1000, 1000)
    assert len(set(s.test_y.tolist())) == 10


def _write_tar(path, files: dict[str, bytes], dirs=()):
    with tarfile.open(path, "w:gz") as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _jpeg(color, size=(32, 32)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def test_small_archive_converts_sizes_and_modes(tmp_path):
    files = {}
    for split_name, n in (("train", 10), ("test", 3)):
        for cls, color in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            for i in range(n):
                files[f"root/{split_name}/{cls}/{i}.jpg"] = _jpeg(color, size=(48, 40) if i == 0 else (32, 32))
    files["root/train/cat/gray.png"] = (lambda b: (Image.new("L", (32, 32), 128).save(b, "PNG"), b.getvalue())[1])(io.BytesIO())
    archive = tmp_path / "tiny.tar.gz"
    _write_tar(archive, files)
    ds = data.load(f"imagefolder:{archive}", str(tmp_path / "cache"))
    assert ds.classes == ["cat", "dog"]
    assert ds.train_x.shape == (21, 3, 32, 32) and ds.test_x.shape == (6, 3, 32, 32)
    red = ds.train_x[ds.train_y == 1].mean(axis=(0, 2, 3))  # dog is blue
    assert red[2] > 150 and red[0] < 60


@pytest.mark.parametrize("case, message", [
    ("corrupt", "not a readable .tar.gz"),
    ("empty", "holds no train/<class>/"),
    ("unequal", "different classes"),
    ("empty_class", "holds no images"),
    ("missing", "does not exist"),
])
def test_bad_archives_are_refused_clearly(tmp_path, case, message):
    archive = tmp_path / "bad.tar.gz"
    img = _jpeg((1, 2, 3))
    if case == "corrupt":
        good = tmp_path / "good.tar.gz"
        _write_tar(good, {f"train/a/{i}.jpg": img for i in range(50)} | {"test/a/0.jpg": img})
        archive.write_bytes(good.read_bytes()[:300])
    elif case == "empty":
        _write_tar(archive, {})
    elif case == "unequal":
        _write_tar(archive, {"train/a/0.jpg": img, "train/b/0.jpg": img, "test/a/0.jpg": img})
    elif case == "empty_class":
        _write_tar(archive, {"train/a/0.jpg": img, "test/a/0.jpg": img, "test/b/0.jpg": img}, dirs=["train/b"])
    with pytest.raises(DataError, match=message):
        data.load(f"imagefolder:{archive}", str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))  # nothing half-written


def test_imagefolder_directory(tmp_path):
    for split_name in ("train", "test"):
        for cls in ("x", "y"):
            d = tmp_path / "imgs" / split_name / cls
            d.mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(d / f"{i}.png")
    ds = data.load(f"imagefolder:{tmp_path / 'imgs'}", str(tmp_path / "cache"))
    assert ds.train_x.shape == (12, 3, 32, 32) and not ds.from_cache
    assert data.load(f"imagefolder:{tmp_path / 'imgs'}", str(tmp_path / "cache")).from_cache


def test_unknown_source_and_offline_cifar10(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        data.load("mnist", str(tmp_path))
    # No network here: a missing CIFAR-10 must fail with one line naming the directory.
    with pytest.raises(DataError, match=str(tmp_path)) as err:
        data.load("cifar10", str(tmp_path))
    assert "imagefolder:PATH" in str(err.value) and "\n" not in str(err.value)


def test_synthetic_is_deterministic():
    a, b = data.load("synthetic"), data.load("synthetic")
    assert np.array_equal(a.train_x, b.train_x) and set(a.train_y.tolist()) == set(range(10))
