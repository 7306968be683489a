"""Image data sets: the embedded digits, IDX files, Debian's Fashion-MNIST, binarization."""

import gzip
import shutil
import subprocess

import numpy as np
import pytest
import torch

from vi_toolkit.datasets import (DEBIAN_PACKAGE, IDX_FILES, debian_fashion_mnist_root, dynamic_binarization,
                                 load_images, read_idx)


def write_idx(path, array, *, compress=False):
    """An IDX file written by the format's definition (uint8 values, big-endian sizes)."""
    array = np.asarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    raw += array.tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(raw)


def fake_mnist(root, n_train=30, n_test=10, *, compress=True):
    gen = np.random.default_rng(0)
    arrays = {"train_images": gen.integers(0, 256, (n_train, 28, 28)), "train_labels": np.arange(n_train) % 10,
              "test_images": gen.integers(0, 256, (n_test, 28, 28)), "test_labels": np.arange(n_test) % 10}
    for key, base in IDX_FILES.items():
        write_idx(root / (base + (".gz" if compress else "")), arrays[key], compress=compress)
    return arrays


def test_digits_splits_and_scaling():
    data = load_images("digits", device="cpu")
    n = data.train.shape[0] + data.val.shape[0] + data.test.shape[0]
    assert n == 1797 and data.shape == (1, 8, 8)
    assert 0.0 == data.train.min() and data.train.max() == 1.0  # grey levels 0..16 scaled by 16
    # the splits partition the data set: together they are a permutation of scikit-learn's images
    from sklearn.datasets import load_digits
    ref = torch.as_tensor(load_digits().images / 16.0, dtype=torch.float32).flatten(1)
    together = torch.cat([data.train, data.val, data.test]).flatten(1)
    assert torch.equal(torch.unique(together, dim=0), torch.unique(ref, dim=0))
    static = load_images("digits", binarize="static", device="cpu")
    assert set(static.train.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(static.train, (data.train > 0.5).float())


def test_dynamic_binarization_resamples_training_batches():
    data = load_images("digits", binarize="dynamic", device="cpu", seed=3)
    assert set(data.val.unique().tolist()) <= {0.0, 1.0}  # held-out sets binarized once
    assert torch.equal(data.val, load_images("digits", binarize="dynamic", device="cpu", seed=3).val)
    grey = load_images("digits", device="cpu", seed=3).train
    torch.manual_seed(0)
    draws = torch.stack([data.transform([data.train])[0] for _ in range(400)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(draws[0], draws[1])
    assert torch.allclose(draws.mean(0), grey, atol=0.12)  # E[x_bin] = x
    idx = torch.arange(5)
    out = dynamic_binarization([data.train[:5], idx])
    assert out[1] is idx


def test_read_idx_and_idx_folder(tmp_path):
    arrays = fake_mnist(tmp_path)
    data = load_images("mnist", root=tmp_path, val_size=5, device="cpu")
    assert data.train.shape == (25, 1, 28, 28) and data.val.shape == (5, 1, 28, 28)
    assert data.test.shape == (10, 1, 28, 28)
    assert torch.allclose(data.test[:, 0], torch.as_tensor(arrays["test_images"] / 255.0, dtype=torch.float32))
    assert data.train_labels.tolist() == list(arrays["train_labels"][:25])
    plain = tmp_path / "plain"
    plain.mkdir()
    write_idx(plain / "x", np.arange(6).reshape(2, 3))
    assert read_idx(str(plain / "x")).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_missing_and_corrupted_files_name_the_file(tmp_path):
    fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="lacks t10k-labels-idx1-ubyte"):
        load_images("fashion-mnist", root=tmp_path, device="cpu")
    fake_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))  # truncated values
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*corrupted.*shape \(30, 28, 28\)"):
        load_images("fashion-mnist", root=tmp_path, device="cpu")
    path.write_bytes(b"not gzip at all")  # not a gzip stream
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*cannot be read"):
        load_images("fashion-mnist", root=tmp_path, device="cpu")
    path.write_bytes(gzip.compress(b"\x01\x02\x03\x04rest"))  # bad magic
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*IDX header"):
        load_images("fashion-mnist", root=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="does not exist"):
        read_idx(str(tmp_path / "nothing-here"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown data set"):
        load_images("cifar", device="cpu")
    with pytest.raises(ValueError, match="unknown binarize"):
        load_images("digits", binarize="otsu", device="cpu")
    with pytest.raises(ValueError, match="pass root="):
        load_images("mnist", device="cpu")


def _debian_package_installed():
    if shutil.which("dpkg") is None:
        return False
    return subprocess.run(["dpkg", "-s", DEBIAN_PACKAGE], capture_output=True).returncode == 0


@pytest.mark.skipif(not _debian_package_installed(),
                    reason=f"Debian package {DEBIAN_PACKAGE} not installed (apt-get install {DEBIAN_PACKAGE})")
def test_real_fashion_mnist_from_the_debian_package():
    root = debian_fashion_mnist_root()
    labels = read_idx(f"{root}/train-labels-idx1-ubyte.gz")
    assert labels.shape == (60000,) and np.bincount(labels).tolist() == [6000] * 10  # balanced classes
    data = load_images("fashion-mnist", binarize="static", device="cpu")
    assert data.train.shape == (50000, 1, 28, 28) and data.val.shape == (10000, 1, 28, 28)
    assert data.test.shape == (10000, 1, 28, 28) and len(data.classes) == 10
    assert set(data.test.unique().tolist()) == {0.0, 1.0}
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10


def test_torchvision_layout_and_its_errors(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = fake_mnist(raw, n_train=20, compress=False)
    data = load_images("fashion-mnist", root=tmp_path, val_size=4, device="cpu")
    assert data.train.shape == (16, 1, 28, 28) and data.test.shape == (10, 1, 28, 28)
    assert torch.equal(data.test_labels, torch.as_tensor(arrays["test_labels"], dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mnist: torchvision could not load the train split from root"):
        load_images("mnist", root=tmp_path, device="cpu")
