"""Data sets that need no download, the user's own arrays, and a deterministic batch iterator.

* :func:`load_digits`: scikit-learn's 8x8 handwritten digits (1797 images,
  10 classes), shipped inside this package as ``jaxbp/data/digits.npz``; a fixed
  train/test split and standardisation with the training set's statistics.
* :func:`teacher_regression`: inputs through a random "teacher" MLP plus noise,
  any size.
* :func:`load_npz`: the user's ``.npz`` with arrays ``x`` and ``y`` (and
  optionally ``x_test``, ``y_test``).
* :func:`load_text` (:mod:`jaxbp.text`): a text as character windows for next-token
  training: the shipped tiny Shakespeare (``jaxbp/data/tinyshakespeare.txt.gz``) or the
  user's file.
* :func:`batches`: shuffled by a PRNG key, the last partial batch kept or dropped.
"""

from __future__ import annotations

import math
import pathlib
import zipfile
from collections.abc import Iterator
from typing import NamedTuple

import jax
import numpy as np

from jaxbp import files, input_checks
from jaxbp.text import TextDataset as TextDataset  # re-exported: jaxbp.data.load_text
from jaxbp.text import load_text as load_text
from jaxbp.types import PRNGKey, check_bool, check_int, is_real

_DIGITS = pathlib.Path(__file__).parent / "data" / "digits.npz"


class Dataset(NamedTuple):
    """Train and test arrays on the host (NumPy).

    Attributes:
      x_train: (n_train, n_in) float32.
      y_train: (n_train,) int32 labels or (n_train, n_out) float32 targets.
      x_test, y_test: the same for the held-out set.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_in(self) -> int:
        """Input width."""
        return int(self.x_train.shape[1])

    @property
    def n_out(self) -> int:
        """Output width: the number of classes for labels, else the target width."""
        if self.y_train.ndim == 1:  # in Python ints: the largest int32 label + 1 must not wrap
            return max(int(self.y_train.max()), int(self.y_test.max(initial=0))) + 1
        return int(self.y_train.shape[1])

    @property
    def is_classification(self) -> bool:
        """True when y holds integer class labels."""
        return self.y_train.ndim == 1


AnyDataset = Dataset | TextDataset
"""What :func:`jaxbp.fit` trains on: arrays of samples and targets, or a text's windows."""


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` row indices: ``round(n * test_fraction)`` rows held out, at least
    one, and at least one left to train on."""
    if not is_real(test_fraction) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    order = np.random.default_rng(check_int("seed", seed, 0)).permutation(n)
    n_test = max(1, round(n * test_fraction))
    if n_test >= n:
        raise ValueError(f"test_fraction {test_fraction} of {n} samples holds out {n_test}, "
                         f"leaving none to train on (a split needs at least 2 samples and a "
                         f"fraction below {(n - 0.5) / n:.4g})" if n >= 2 else
                         f"{n} sample cannot be split into a training and a test part: give "
                         f"at least 2, or x_test and y_test of their own")
    return order[n_test:], order[:n_test]


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x - mean) / std with the training set's per-feature statistics (std 0 -> 1)."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's digits: 1797 8x8 images (pixels 0..16), labels 0..9.

    The split is fixed by ``seed`` (default: 1438 train, 359 test); pixels are
    standardised per feature with the training set's mean and std. The data
    ship with jaxbp (UCI Optical Recognition of Handwritten Digits, as in
    ``sklearn.datasets.load_digits``; CC BY 4.0), so nothing is downloaded.

    Returns:
      A :class:`Dataset` with x: (n, 64) float32 and y: (n,) int32.
    """
    with np.load(_DIGITS) as data:
        x, y = data["x"].astype(np.float64), data["y"].astype(np.int32)
    train, test = _split(len(x), test_fraction, seed)
    x_train, x_test = _standardise(x[train], x[test])
    return Dataset(x_train, y[train], x_test, y[test])


def teacher_regression(
    key: PRNGKey,
    n_train: int = 4096,
    n_test: int = 1024,
    sizes: tuple[int, ...] = (32, 64, 8),
    activation: str = "tanh",
    noise: float = 0.1,
) -> Dataset:
    """A regression set: ``y = teacher(x) + noise * N(0, 1)``, ``x ~ N(0, I)``.

    The teacher is a freshly initialised :class:`~jaxbp.MLP` with ``sizes`` and
    ``activation`` (identity output); any size can be asked for.

    Returns:
      A :class:`Dataset` with x: (n, sizes[0]) and y: (n, sizes[-1]), float32.
    """
    from jaxbp.mlp import MLP

    for name, value in (("n_train", n_train), ("n_test", n_test)):
        check_int(name, value, 1)
    if not is_real(noise) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    input_checks.check_key("key", key)
    teacher = MLP(sizes, activation, "identity", "squared_error")
    key_params, key_x, key_noise = jax.random.split(key, 3)
    params = teacher.init(key_params)
    x = jax.random.normal(key_x, (n_train + n_test, sizes[0]))
    y = teacher.apply(params, x) + noise * jax.random.normal(key_noise, (len(x), sizes[-1]))
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def load_npz(path: str | pathlib.Path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The user's data from an ``.npz`` file.

    The file holds ``x`` (n, n_in) and ``y``: (n,) integer labels or (n, n_out)
    targets; optionally ``x_test`` and ``y_test`` as well, otherwise a fixed
    split by ``seed`` holds out ``test_fraction``. x is standardised with the
    training statistics.

    Raises:
      FileNotFoundError: no such file (IsADirectoryError: a folder there).
      ValueError: not a readable ``.npz``, an array missing, or shapes that do
        not fit (the message names the file and the array).
    """
    path = files.require_file("data file", path)
    _check_npz_header(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except ValueError as err:
        if "pickle" in str(err):  # object arrays: never unpickle a data file
            raise ValueError(f"data file {str(path)!r} holds object arrays (Python objects, "
                             f"which would have to be unpickled); save plain numeric arrays "
                             f"with np.savez") from None
        raise ValueError(f"data file {str(path)!r} is not a readable .npz file: {err}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"data file {str(path)!r} is not a readable .npz file: {err}") from None
    for name in ("x", "y"):
        if name not in arrays:
            raise ValueError(f"data file {str(path)!r} has no array {name!r} "
                             f"(it holds {sorted(arrays)})")
    has_test = "x_test" in arrays or "y_test" in arrays
    if has_test and not ("x_test" in arrays and "y_test" in arrays):
        raise ValueError(f"data file {str(path)!r} must hold both 'x_test' and 'y_test' "
                         f"or neither (it holds {sorted(arrays)})")
    pairs = [("x", "y")] + ([("x_test", "y_test")] if has_test else [])
    for x_name, y_name in pairs:
        _check_pair(path, x_name, arrays[x_name], y_name, arrays[y_name])
    if has_test and arrays["x_test"].shape[1] != arrays["x"].shape[1]:
        raise ValueError(f"data file {str(path)!r}: array 'x_test' has {arrays['x_test'].shape[1]}"
                         f" columns but 'x' has {arrays['x'].shape[1]}")
    x, y = arrays["x"].astype(np.float64), _targets(arrays["y"])
    if has_test:
        x_test, y_test = arrays["x_test"].astype(np.float64), _targets(arrays["y_test"])
    else:
        try:
            train, test = _split(len(x), test_fraction, seed)
        except ValueError as err:
            raise ValueError(f"data file {str(path)!r}: {err}") from None
        x, x_test, y, y_test = x[train], x[test], y[train], y[test]
    x_train, x_test = _standardise(x, x_test)
    return Dataset(x_train, y, x_test, y_test)


MAX_CLASSES = 1 << 16
"""Integer labels up to this many classes; a larger label is taken for a data error."""

_ZIP_MAGIC, _NPY_MAGIC = b"PK\x03\x04", b"\x93NUMPY"


def _check_npz_header(path: pathlib.Path) -> None:
    """Name what a file is when it is not an .npz archive (a .npy, a text file, ...)."""
    with open(path, "rb") as file:
        head = file.read(8)
    if head.startswith(_ZIP_MAGIC):
        return
    if head.startswith(_NPY_MAGIC):
        raise ValueError(f"data file {str(path)!r} is a single .npy array, not an .npz "
                         f"archive; save x and y together with np.savez(path, x=x, y=y)")
    kind = "it is empty" if not head else f"it starts with {head!r}"
    raise ValueError(f"data file {str(path)!r} is not an .npz archive ({kind}); "
                     f"save the arrays with np.savez(path, x=x, y=y)")


def _check_pair(path: pathlib.Path, x_name: str, x: np.ndarray, y_name: str,
                y: np.ndarray) -> None:
    where = f"data file {str(path)!r}"
    for name, array in ((x_name, x), (y_name, y)):
        if np.issubdtype(array.dtype, np.complexfloating):
            raise ValueError(f"{where}: array {name!r} holds complex numbers (dtype "
                             f"{array.dtype}); jaxbp trains on real numbers: store the real "
                             f"and imaginary parts as features of their own")
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{where}: array {x_name!r} has shape {x.shape} but expected "
                         f"(n, n_in) with n >= 1")
    if not (np.issubdtype(x.dtype, np.number) and np.all(np.isfinite(x))):
        raise ValueError(f"{where}: array {x_name!r} must be finite numbers (dtype {x.dtype})")
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: array {y_name!r} has shape {y.shape} but expected "
                         f"({x.shape[0]},) labels or ({x.shape[0]}, n_out) targets")
    if y.ndim == 1 and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: array {y_name!r} of shape {y.shape} holds class labels "
                         f"and must be integers, got {y.dtype}")
    if y.ndim == 1 and y.min() < 0:
        raise ValueError(f"{where}: array {y_name!r} holds negative labels (min {y.min()})")
    if y.ndim == 1 and int(y.max()) >= MAX_CLASSES:
        raise ValueError(f"{where}: array {y_name!r} holds the label {int(y.max())}, which "
                         f"would mean {int(y.max()) + 1} classes (at most {MAX_CLASSES}); "
                         f"labels must be 0..n_classes-1")
    if not np.all(np.isfinite(y.astype(np.float64))):
        raise ValueError(f"{where}: array {y_name!r} must be finite numbers")


def _targets(y: np.ndarray) -> np.ndarray:
    return y.astype(np.int32) if y.ndim == 1 else y.astype(np.float32)


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """How many batches :func:`batches` yields for n samples."""
    check_int("n", n, 0)
    check_int("batch_size", batch_size, 1)
    return n // batch_size if check_bool("drop_last", drop_last) else -(-n // batch_size)


def epoch_order(
    n: int, batch_size: int, key: PRNGKey | None = None, drop_last: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """The row indices of one epoch's batches, as :func:`batches` yields them.

    Returns:
      ``(full, tail)``: ``full`` (n // batch_size, batch_size) int32, row i the
      indices of batch i; ``tail`` the short last batch's indices, or None
      (with ``drop_last`` or when batch_size divides n).
    """
    batch_size, drop_last = check_int("batch_size", batch_size, 1), check_bool("drop_last",
                                                                                drop_last)
    order = (np.arange(n, dtype=np.int32) if key is None
             else np.asarray(jax.random.permutation(key, n), np.int32))
    n_full = n // batch_size
    full = order[:n_full * batch_size].reshape(n_full, batch_size)
    tail = order[n_full * batch_size:]
    return full, None if drop_last or tail.size == 0 else tail


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    key: PRNGKey | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mini-batches of ``(x, y)``, in an order fixed by ``key``.

    Args:
      x: (n, n_in); y: (n, ...): arrays (NumPy or JAX; lists are read as NumPy arrays).
      batch_size: rows per batch, >= 1.
      key: a PRNG key; the order is ``jax.random.permutation(key, n)``, the
        same for the same key on every machine. None keeps the stored order.
      drop_last: drop the last batch when it is shorter than ``batch_size``
        (every batch then has one shape: one compiled step). With False the
        short last batch is yielded (one more compile of a jitted step).

    Yields:
      ``(x_batch, y_batch)`` NumPy copies of ``batch_size`` rows (the last one
      possibly fewer), in the order of :func:`epoch_order`.
    """
    x, y = input_checks.as_array("x", x), input_checks.as_array("y", y)
    if np.ndim(x) == 0 or np.ndim(y) == 0 or len(x) != len(y):
        raise ValueError(f"x has shape {np.shape(x)} and y {np.shape(y)}: expected one row of "
                         f"y per row of x")
    if key is not None:
        input_checks.check_key("key", key)
    full, tail = epoch_order(len(x), batch_size, key, drop_last)
    for index in [*full, *([] if tail is None else [tail])]:
        yield x[index], y[index]
