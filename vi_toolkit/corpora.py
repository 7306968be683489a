"""Text corpora as bag-of-words count matrices, for topic models (``vi_toolkit.models.topics``).

**Fortune files** are the format of BSD ``fortune(6)``: short texts separated by lines that
hold a single ``%``. Debian's ``fortunes`` and ``fortunes-min`` packages (``apt-get install
fortunes``) hold one such file per category (art, computers, food, love, politics, science,
...), found here with ``dpkg -L`` (:func:`fortune_files`); a folder of your own fortune
files works as well (``root=``). :func:`read_fortunes` splits a file into its texts, with
the old terminals' overstrikes (``_\\bx`` underlines, ``x\\bx`` bold) removed.

**Tokenization** (:func:`bag_of_words`) is scikit-learn's ``CountVectorizer``: lower case,
tokens of ``MIN_LETTERS`` or more letters (no digits), scikit-learn's English stop words
removed, then the words kept that occur in at least ``min_df`` documents and in at most a
fraction ``max_df`` of them (at most ``max_features``, the most frequent). The count matrix
is a float tensor (documents x words), as ``vi_toolkit.models.topics.LDA`` takes it;
documents left with fewer than ``min_words`` words are dropped.

Missing files are a ``ValueError`` naming the file, or the Debian package to install.
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import torch
from sklearn.feature_extraction.text import CountVectorizer

FORTUNE_PACKAGES = ("fortunes", "fortunes-min")
MIN_LETTERS = 3
_OVERSTRIKE = re.compile(".\b")
_TOKEN = rf"(?u)\b[^\W\d_]{{{MIN_LETTERS},}}\b"  # words of MIN_LETTERS or more letters


@dataclass
class Corpus:
    """Documents as a count matrix, with their categories.

    Attributes:
        counts: (D, V) float tensor, word counts per document.
        vocabulary: the V words, in the columns' order.
        labels: (D,) long tensor, each document's category index.
        categories: the category names, indexed by ``labels``.
        texts: the D documents' texts.
    """

    counts: torch.Tensor
    vocabulary: tuple
    labels: torch.Tensor
    categories: tuple
    texts: list

    def __len__(self):
        return self.counts.shape[0]

    def subset(self, index: torch.Tensor) -> "Corpus":
        """The documents at ``index``, over the same vocabulary and categories."""
        return Corpus(self.counts[index], self.vocabulary, self.labels[index], self.categories,
                      [self.texts[i] for i in index.tolist()])

    def split(self, test_fraction: float = 0.2, *, seed: int = 0) -> tuple["Corpus", "Corpus"]:
        """A random ``(train, test)`` split of the documents (the vocabulary is the whole corpus's).

        Raises:
            ValueError: unless both parts get at least one document.
        """
        n_test = int(round(test_fraction * len(self)))
        if not 0 < n_test < len(self):
            raise ValueError(f"test_fraction={test_fraction!r} leaves no document on one side of the "
                             f"split of {len(self)} documents")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[n_test:].sort().values), self.subset(perm[:n_test].sort().values)


def read_fortunes(path: str) -> list[str]:
    """The texts of one fortune file: separated by ``%`` lines, overstrikes removed, blank ones dropped.

    Args:
        path: the fortune file.

    Returns:
        The texts, whitespace inside each collapsed to single spaces.

    Raises:
        ValueError: if the file does not exist or is not text.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such fortune file")
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            raw = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err})") from err
    texts = []
    for block in re.split(r"^%[ \t]*$", raw, flags=re.MULTILINE):
        while _OVERSTRIKE.search(block):
            block = _OVERSTRIKE.sub("", block)
        text = " ".join(block.split())
        if text:
            texts.append(text)
    return texts


def fortune_files(packages: tuple = FORTUNE_PACKAGES) -> dict[str, str]:
    """``{category: path}`` of the fortune files the Debian ``packages`` installed (by ``dpkg -L``).

    The category files are those with a ``.dat`` index beside them (``strfile``'s); the
    ``.u8`` names are links to the same files.

    Raises:
        ValueError: naming the package to install if ``dpkg`` or the packages are missing.
    """
    hint = f"install them (apt-get install {' '.join(packages)}) or pass root= a folder of fortune files"
    if shutil.which("dpkg") is None:
        raise ValueError(f"fortunes: no dpkg to find the Debian packages {', '.join(packages)}; pass root= "
                         "a folder of fortune files")
    files = {}
    for package in packages:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
        if listing.returncode != 0:
            raise ValueError(f"fortunes: the Debian package {package!r} is not installed; {hint}")
        for line in listing.stdout.splitlines():
            name = os.path.basename(line)
            if "." not in name and os.path.isfile(line + ".dat") and not os.path.islink(line):
                files[name] = line
    if not files:
        raise ValueError(f"fortunes: the Debian packages {', '.join(packages)} list no fortune file")
    return dict(sorted(files.items()))


def fortunes_installed(packages: tuple = FORTUNE_PACKAGES) -> bool:
    """Whether :func:`fortune_files` finds the fortune files of the Debian ``packages``."""
    try:
        fortune_files(packages)
    except ValueError:
        return False
    return True


def bag_of_words(texts: list[str], *, min_df: int = 5, max_df: float = 0.5, max_features: int | None = 2000,
                 vocabulary: tuple | None = None) -> tuple[torch.Tensor, tuple]:
    """The count matrix of ``texts`` and its vocabulary (see the module docstring).

    Args:
        texts: the documents.
        min_df: keep words that occur in at least this many documents.
        max_df: and in at most this fraction of them.
        max_features: then at most this many, the most frequent (None: all).
        vocabulary: a fixed vocabulary instead (the other options are then ignored).

    Returns:
        ``(counts, vocabulary)``: a (len(texts), V) float tensor and the V words.

    Raises:
        ValueError: if no word is left.
    """
    if vocabulary is None:
        vectorizer = CountVectorizer(lowercase=True, token_pattern=_TOKEN, stop_words="english",
                                     min_df=min_df, max_df=max_df, max_features=max_features)
    else:
        vectorizer = CountVectorizer(lowercase=True, token_pattern=_TOKEN, vocabulary=list(vocabulary))
    try:
        matrix = vectorizer.fit_transform(texts)
    except ValueError as err:  # scikit-learn's "empty vocabulary" / "no terms remain"
        raise ValueError(f"bag_of_words: no word left from {len(texts)} texts ({err})") from err
    counts = torch.as_tensor(matrix.toarray(), dtype=torch.get_default_dtype())
    return counts, tuple(vectorizer.get_feature_names_out())


def load_fortunes(categories: list[str] | None = None, *, root: str | None = None, min_words: int = 3,
                  **options) -> Corpus:
    """The fortunes of ``categories`` as a :class:`Corpus`, one document a fortune.

    Args:
        categories: category names (file names); None: every file.
        root: a folder of fortune files; None: the files of Debian's fortune packages.
        min_words: drop documents with fewer words than this after tokenization.
        **options: passed to :func:`bag_of_words` (``min_df``, ``max_df``, ``max_features``).

    Returns:
        The corpus; its categories in the order given (sorted when None).

    Raises:
        ValueError: naming a missing category, file or package, or if no document is left.
    """
    if root is None:
        files = fortune_files()
    else:
        if not os.path.isdir(root):
            raise ValueError(f"root: {root} is not a folder")
        files = {name: os.path.join(root, name) for name in sorted(os.listdir(root))
                 if "." not in name and os.path.isfile(os.path.join(root, name))}
    if categories is None:
        categories = list(files)
    missing = [c for c in categories if c not in files]
    if missing:
        raise ValueError(f"categories: no fortune file for {', '.join(map(repr, missing))}; "
                         f"the files are {', '.join(files) or 'none'}")
    texts, labels = [], []
    for label, category in enumerate(categories):
        fortunes = read_fortunes(files[category])
        texts += fortunes
        labels += [label] * len(fortunes)
    counts, vocabulary = bag_of_words(texts, **options)
    keep = (counts.sum(-1) >= min_words).nonzero().squeeze(-1)
    if len(keep) == 0:
        raise ValueError(f"no fortune of {', '.join(categories)} has min_words={min_words} words in the vocabulary")
    return Corpus(counts, vocabulary, torch.tensor(labels), tuple(categories), texts).subset(keep)
