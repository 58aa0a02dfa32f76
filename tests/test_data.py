import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslkit.data import DataError, subset_dataset
from sslkit.data.fashion_mnist import DEBIAN_DIR
from sslkit.plugins import load_all
from sslkit.registry import DATASETS

load_all()


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_torchvision_root(tmp_path, gz):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    sfx = ".gz" if gz else ""
    _write_idx(raw / f"t10k-images-idx3-ubyte{sfx}", imgs, gz)
    _write_idx(raw / f"t10k-labels-idx1-ubyte{sfx}", np.array([3, 1, 4, 1, 5]), gz)
    ds = DATASETS.build("fashion_mnist", split="test", root=str(tmp_path))
    assert len(ds) == 5
    img, label = ds[2]
    assert img.shape == (3, 28, 28) and img.dtype == torch.uint8 and label == 4
    assert torch.equal(img[0], torch.from_numpy(imgs[2].astype(np.uint8)))
    assert torch.equal(img[0], img[2]), "grayscale is replicated to 3 channels"


def test_truncated_idx_is_reported(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)), False)
    data = (raw / "t10k-images-idx3-ubyte").read_bytes()
    (raw / "t10k-images-idx3-ubyte").write_bytes(data[:-100])
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(5), False)
    with pytest.raises(DataError, match="truncated"):
        DATASETS.build("fashion_mnist", split="test", root=str(tmp_path))


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian():
    ds = DATASETS.build("fashion_mnist", split="test")
    assert len(ds) == 10000 and ds.num_classes == 10
    assert ds.images.shape == (10000, 3, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10


def test_missing_data_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr("sslkit.data.fashion_mnist.DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError) as e:
        DATASETS.build("fashion_mnist", root=str(tmp_path / "empty"))
    msg = str(e.value)
    assert str(tmp_path / "empty") in msg and "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(DataError, match="download=True"):
        DATASETS.build("cifar10", root=str(tmp_path))


@pytest.mark.parametrize("name,folder,files,names_key,labels_key", [
    ("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
     ("batches.meta", "label_names"), "labels"),
    ("cifar100", "cifar-100-python", ["train", "test"], ("meta", "fine_label_names"), "fine_labels"),
])
def test_cifar_on_disk_format(tmp_path, name, folder, files, names_key, labels_key):
    d = tmp_path / folder
    d.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for f in files:
        batches[f] = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        with open(d / f, "wb") as fh:
            pickle.dump({"data": batches[f], labels_key: [0, 1, 2]}, fh)
    with open(d / names_key[0], "wb") as fh:
        pickle.dump({names_key[1]: [f"c{i}" for i in range(10)]}, fh)
    train = DATASETS.build(name, split="train", root=str(tmp_path))
    test = DATASETS.build(name, split="test", root=str(tmp_path))
    assert len(train) == 3 * (len(files) - 1) and len(test) == 3
    img, label = test[1]
    # torchvision's layout: 1024 red, then green, then blue values, row-major.
    assert torch.equal(img, torch.from_numpy(batches[files[-1]][1].reshape(3, 32, 32)))
    assert label == 1 and test.classes[0] == "c0"


def test_cifar_pickle_cannot_run_code(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    for f in ["test_batch", "batches.meta"]:
        with open(d / f, "wb") as fh:
            pickle.dump({"data": Evil()}, fh)
    with pytest.raises(DataError, match="corrupt"):
        DATASETS.build("cifar10", split="test", root=str(tmp_path))
    assert (tmp_path / "victim").is_dir()


def _img(path: Path, mode: str, size=(20, 16)):
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], 65535, dtype=np.uint16)).save(path)
        return
    Image.new(mode, size, color={"RGB": (255, 0, 0), "L": 128, "RGBA": (0, 0, 255, 0), "CMYK": (0, 255, 0, 0),
                                 "P": 3}[mode]).save(path)


def test_image_folder_labeled_modes_and_bad_files(tmp_path):
    for cls, mode, ext in [("a", "RGB", "jpg"), ("a", "L", "png"), ("b", "RGBA", "png"), ("b", "CMYK", "jpg"),
                           ("b", "P", "png"), ("c", "I;16", "png")]:
        (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
        _img(tmp_path / "train" / cls / f"{mode.replace(';', '')}.{ext}", mode)
    (tmp_path / "train" / "c" / "zero.jpg").write_bytes(b"")
    ds = DATASETS.build("image_folder", split="train", root=str(tmp_path))
    assert ds.classes == ["a", "b", "c"] and len(ds) == 7
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 16, 20)
    sixteen = [i for i, f in enumerate(ds.files) if f.name == "I16.png"][0]
    assert int(ds[sixteen][0].max()) == 255, "16-bit white stays white (scaled, not clipped)"
    rgba = [i for i, f in enumerate(ds.files) if f.name == "RGBA.png"][0]
    assert ds[rgba][0][:, 0, 0].tolist() == [255, 255, 255], "transparent pixels composite on white"
    assert any("zero.jpg" in b for b in ds.bad)
    strict = DATASETS.build("image_folder", split="train", root=str(tmp_path), strict=True)
    bad = [i for i, f in enumerate(strict.files) if f.name == "zero.jpg"][0]
    with pytest.raises(DataError, match="zero.jpg"):
        strict[bad]


def test_image_folder_unlabeled_and_empty(tmp_path):
    (tmp_path / "imgs" / "nested").mkdir(parents=True)
    _img(tmp_path / "imgs" / "x.png", "RGB")
    _img(tmp_path / "imgs" / "nested" / "y.png", "RGB")
    ds = DATASETS.build("image_folder", root=str(tmp_path / "imgs"), labeled=False)
    assert len(ds) == 2 and ds[0][1] == -1
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        DATASETS.build("image_folder", root=str(tmp_path / "empty"))


def test_preload_matches_decoding_on_access_and_reports_problems(tmp_path):
    from sslkit.data.base import TensorImageDataset

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "gray" / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(tmp_path / "gray" / cls / f"{k}.png")
    (tmp_path / "gray" / "b" / "broken.png").write_bytes(b"not a png")
    lazy = DATASETS.build("image_folder", root=str(tmp_path / "gray"))
    with pytest.warns(UserWarning, match="broken.png"):
        ds = DATASETS.build("image_folder", root=str(tmp_path / "gray"), preload=True)
    assert isinstance(ds, TensorImageDataset) and ds._images.shape == (6, 1, 12, 10), "gray images keep one channel"
    good = [i for i, f in enumerate(lazy.files) if f.name != "broken.png"]
    for j, i in enumerate(good):
        assert torch.equal(ds[j][0], lazy[i][0]) and ds[j][1] == lazy[i][1]
    assert ds.classes == ["a", "b"] and [Path(x).name for x in ds.skipped] == ["broken.png"]
    assert subset_dataset(ds, 4).skipped == ds.skipped, "data.subset keeps the unreadable files reported"
    with pytest.raises(DataError, match="broken.png"):
        DATASETS.build("image_folder", root=str(tmp_path / "gray"), preload=True, strict=True)
    # Colour survives; a second size is refused with both sizes named.
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (10, 12), (255, 0, 0)).save(tmp_path / "mixed" / "a.png")
    assert DATASETS.build("image_folder", root=str(tmp_path / "mixed"), preload=True)._images.shape == (1, 3, 12, 10)
    Image.new("RGB", (11, 12), (0, 255, 0)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(DataError, match="10x12 .* 11x12"):
        DATASETS.build("image_folder", root=str(tmp_path / "mixed"), preload=True)


def test_synthetic_is_deterministic_balanced_and_learnable_shapes():
    a = DATASETS.build("synthetic", num_samples=100, image_size=24)
    b = DATASETS.build("synthetic", num_samples=100, image_size=24)
    t = DATASETS.build("synthetic", split="test", num_samples=100, image_size=24)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, t.images)
    assert torch.bincount(a.labels).tolist() == [10] * 10
    # The class signal is shape, not colour: per-class mean colours overlap heavily.
    means = torch.stack([a.images[a.labels == k].float().mean() for k in range(10)])
    assert means.std() < 20


def test_subset_is_fixed_and_sized():
    ds = DATASETS.build("synthetic", num_samples=50)
    s1, s2 = subset_dataset(ds, 20, seed=1), subset_dataset(ds, 20, seed=1)
    assert len(s1) == 20 and torch.equal(s1.images, s2.images)
    assert subset_dataset(ds, None) is ds
