"""Image data sets for auto-encoders and VAEs, loaded once into tensors on the fit's device.

* ``"digits"``: scikit-learn's 8x8 digits (1797 images, grey levels 0..16 scaled to
  [0, 1]); embedded, no download; split at random into train / validation / test.
* ``"fashion-mnist"``, ``"mnist"``: 28x28 images (60,000 train, 10,000 test), from

  - a folder of the four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each possibly ``.gz``),
    read by :func:`read_idx`;
  - else torchvision's folder layout under ``root`` (``download=True`` fetches the files
    where the network allows);
  - for Fashion-MNIST with ``root=None``: the files of Debian's ``dataset-fashion-mnist``
    package (``apt-get install dataset-fashion-mnist``), found with ``dpkg -L``.

  The validation set is the last ``val_size`` training images.

Binarization (``binarize=``): ``"dynamic"`` resamples x_bin ~ Bernoulli(x) for every
training batch (pass ``data.transform`` to ``fit(..., transform=)``), while the
validation and test sets are binarized once with a fixed seed; ``"static"``
thresholds every split at 0.5; ``"none"`` keeps grey levels in [0, 1].

Missing or corrupted files are a ``ValueError`` naming the file.
"""

import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import torch

from .devices import resolve_device
from .engine import fit

DATASETS = ("digits", "fashion-mnist", "mnist")
BINARIZATIONS = ("dynamic", "static", "none")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class ImageData:
    """Train / validation / test images (N, C, H, W) in [0, 1] and labels, on one device.

    ``transform`` is ``fit``'s per-batch transform (dynamic binarization) or ``None``.
    """

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    val_labels: torch.Tensor
    test_labels: torch.Tensor
    binarize: str
    classes: tuple = ()

    @property
    def shape(self):
        """The shape (C, H, W) of one image."""
        return tuple(self.train.shape[1:])

    @property
    def transform(self):
        return dynamic_binarization if self.binarize == "dynamic" else None

    def fit(self, model, guide, *, val_data="val", **options):
        """``vi_toolkit.fit`` on the training images, with the held-out ELBO of ``val_data``
        (``"val"``, ``"test"`` or ``None``) each epoch and this data's binarization transform."""
        options.setdefault("device", self.train.device)
        held_out = None if val_data is None else getattr(self, val_data)
        return fit(model, guide, self.train, val_data=held_out, transform=self.transform, **options)


def dynamic_binarization(tensors):
    """``fit`` transform: x_bin ~ Bernoulli(x) for the images (first tensor) of each batch."""
    x, *rest = tensors
    return [torch.bernoulli(x), *rest]


def read_idx(path):
    """Read an IDX file (optionally gzip-compressed) into a numpy array.

    The format: two zero bytes, a type code, the number of dimensions n, n big-endian
    uint32 sizes, then the values. Raises ``ValueError`` naming the file if it is missing,
    not IDX, or shorter or longer than its header says.
    """
    if not os.path.isfile(path):
        raise ValueError(f"IDX file {path!r} does not exist")
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"IDX file {path!r} cannot be read (corrupted?): {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"IDX file {path!r} is corrupted: it does not start with an IDX header")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path!r} is corrupted: truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"IDX file {path!r} is corrupted: header says shape {shape} ({expected} bytes), "
                         f"the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def debian_fashion_mnist_root():
    """The folder holding the IDX files of Debian's ``dataset-fashion-mnist`` package."""
    if shutil.which("dpkg") is None:
        raise ValueError(f"Fashion-MNIST: no root given and no dpkg to find the Debian package "
                         f"{DEBIAN_PACKAGE!r}; pass root= a folder with the IDX files")
    listing = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True)
    if listing.returncode != 0:
        raise ValueError(f"Fashion-MNIST: no root given and the Debian package {DEBIAN_PACKAGE!r} is "
                         f"not installed (apt-get install {DEBIAN_PACKAGE}); or pass root=")
    for line in listing.stdout.splitlines():
        if os.path.basename(line).startswith(IDX_FILES["train_images"]):
            return os.path.dirname(line)
    raise ValueError(f"the Debian package {DEBIAN_PACKAGE!r} lists no {IDX_FILES['train_images']} file")


def _idx_path(root, base):
    for name in (base, base + ".gz"):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def read_idx_folder(root):
    """The four MNIST-format IDX files of ``root`` as uint8 images and int64 labels."""
    paths = {key: _idx_path(root, base) for key, base in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise ValueError(f"data set folder {root!r} lacks {', '.join(missing)} (plain or .gz)")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{paths[split + '_images']!r} and {paths[split + '_labels']!r} do not "
                             f"match: images of shape {images.shape}, labels of shape {labels.shape}")
    return arrays


def _torchvision(name, root, download):
    from torchvision import datasets as tv

    cls = {"mnist": tv.MNIST, "fashion-mnist": tv.FashionMNIST}[name]
    arrays = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(root, train=train, download=download)
        except Exception as err:  # torchvision raises RuntimeError, URLError, ...
            raise ValueError(f"{name}: torchvision could not load the {split} split from root {root!r} "
                             f"(download={download}): {err}") from err
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = ds.data.numpy(), ds.targets.numpy()
    return arrays


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images / 16.0, digits.target


def load_images(name="digits", *, root=None, download=False, binarize="none", val_size=None,
                test_size=None, seed=0, device="auto", dtype=torch.float32):
    """Load data set ``name`` (see the module docstring) into an :class:`ImageData`.

    ``val_size`` (and for ``"digits"`` ``test_size``) default to 10,000 (MNIST-like) or
    about 15% of the points (digits). ``seed`` fixes the digits split and the one-off
    binarization of the held-out sets.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)}")
    if binarize not in BINARIZATIONS:
        raise ValueError(f"unknown binarize {binarize!r}: use one of {', '.join(BINARIZATIONS)}")
    device = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    classes = ()
    if name == "digits":
        images, labels = _digits()
        x, y = torch.as_tensor(images, dtype=dtype).unsqueeze(1), torch.as_tensor(labels)
        n = x.shape[0]
        n_test = int(0.15 * n) if test_size is None else test_size
        n_val = int(0.15 * n) if val_size is None else val_size
        if n_test < 1 or n_val < 1 or n_test + n_val >= n:
            raise ValueError(f"digits: val_size={n_val} and test_size={n_test} must be positive and "
                             f"leave training points out of {n}")
        perm = torch.randperm(n, generator=gen)
        test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
        splits = {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}
        classes = tuple(str(i) for i in range(10))
    else:
        if root is None and name == "fashion-mnist" and not download:
            root = debian_fashion_mnist_root()
        if root is None:
            raise ValueError(f"{name}: pass root= (a folder with the IDX files, or torchvision's layout) "
                             "and download=True where the network allows")
        root = os.fspath(root)
        flat = any(_idx_path(root, base) for base in IDX_FILES.values())
        arrays = read_idx_folder(root) if flat else _torchvision(name, root, download)
        for key in ("train_images", "test_images"):
            if arrays[key].dtype != np.uint8 or arrays[key].shape[1:] != (28, 28):
                raise ValueError(f"{name}: {key} must be 28x28 uint8 images, got {arrays[key].shape} "
                                 f"{arrays[key].dtype}")
        n_val = 10000 if val_size is None else val_size
        n_train = arrays["train_images"].shape[0]
        if not 0 < n_val < n_train:
            raise ValueError(f"{name}: val_size must be between 1 and {n_train - 1}, got {n_val}")
        x = torch.as_tensor(arrays["train_images"].astype(np.float32) / 255.0, dtype=dtype).unsqueeze(1)
        y = torch.as_tensor(arrays["train_labels"].astype(np.int64))
        x_test = torch.as_tensor(arrays["test_images"].astype(np.float32) / 255.0, dtype=dtype).unsqueeze(1)
        y_test = torch.as_tensor(arrays["test_labels"].astype(np.int64))
        splits = {"train": (x[:-n_val], y[:-n_val]), "val": (x[-n_val:], y[-n_val:]), "test": (x_test, y_test)}
        classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else tuple(str(i) for i in range(10))
    out = {}
    for split, (images, labels) in splits.items():
        if binarize == "static":
            images = (images > 0.5).to(dtype)
        elif binarize == "dynamic" and split != "train":
            images = torch.bernoulli(images, generator=gen)
        out[split], out[f"{split}_labels"] = images.to(device), labels.to(device)
    return ImageData(name=name, binarize=binarize, classes=classes, **out)


def add_data_arguments(parser, *, default="digits", binarize="dynamic"):
    """Add ``--dataset``, ``--data-root``, ``--download`` and ``--binarize`` to a script's parser."""
    parser.add_argument("--dataset", default=default, choices=DATASETS,
                        help="digits: embedded 8x8 digits; fashion-mnist: Debian package or --data-root")
    parser.add_argument("--data-root", default=None, help="folder with the IDX files or torchvision's layout")
    parser.add_argument("--download", action="store_true", help="let torchvision download the data set")
    parser.add_argument("--binarize", default=binarize, choices=BINARIZATIONS)
    return parser


def images_from_args(args, *, binarize=None):
    """:func:`load_images` for a script's parsed arguments (``--quick`` forces the digits)."""
    name = "digits" if args.quick else args.dataset
    return load_images(name, root=args.data_root, download=args.download,
                       binarize=binarize or args.binarize, seed=args.seed, device=args.device)
