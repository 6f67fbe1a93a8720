"""A text as next-character windows: the shipped tiny Shakespeare or the user's file.

:func:`load_text` (also ``jaxbp.data.load_text``) gives a :class:`TextDataset` of int32
character ids, ``y[:, t] = x[:, t + 1]``, with a fixed validation split.
"""

from __future__ import annotations

import gzip
import pathlib
from typing import Any, NamedTuple

import numpy as np

from jaxbp import files
from jaxbp.types import check_int, is_real

_SHAKESPEARE = pathlib.Path(__file__).parent / "data" / "tinyshakespeare.txt.gz"


class TextDataset(NamedTuple):
    """A text as next-token windows: ``y[:, t] = x[:, t + 1]``, int32 character ids.

    Attributes:
      x_train, y_train: (n_train, seq_len) int32, windows of the first part of the text.
      x_test, y_test: (n_test, seq_len) int32, windows of its last part (validation).
      vocab: the characters, sorted; id i is ``vocab[i]``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    vocab: str

    @property
    def n_in(self) -> int:
        """The window length, seq_len."""
        return int(self.x_train.shape[1])

    @property
    def n_out(self) -> int:
        """The vocabulary size."""
        return len(self.vocab)

    @property
    def is_classification(self) -> bool:
        """Next-token prediction is a classification per token."""
        return True

    def encode(self, text: str) -> np.ndarray:
        """Character ids of ``text`` (every character must be in :attr:`vocab`)."""
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"text holds characters outside the vocabulary: {unknown[:10]}")
        return np.array([index[c] for c in text], np.int32)

    def decode(self, ids: Any) -> str:
        """The text of character ids, each in ``[0, len(vocab))`` (a -1, an ignored
        target, is no character: indexing would read it as the last one)."""
        ids = np.ravel(np.asarray(ids))
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ids must be integers, got {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= len(self.vocab))]
        if bad.size:
            raise ValueError(f"ids must be in [0, {len(self.vocab)}) (the vocabulary), got "
                             f"{bad[:10].tolist()}")
        return "".join(self.vocab[i] for i in ids.tolist())


def load_text(path: str | pathlib.Path | None = None, seq_len: int = 128,
              validation_fraction: float = 0.1) -> TextDataset:
    """A text as (x, y) windows of ``seq_len`` characters, y the next character of each.

    Without ``path``: tiny Shakespeare (1,115,394 characters, 65 distinct; public
    domain, as shipped in Andrej Karpathy's char-rnn repository,
    ``data/tinyshakespeare/input.txt``), inside this package: no download. With
    ``path``: the user's UTF-8 text file (``.gz`` read as gzip; a leading byte-order mark
    is not read as a character, and line ends are read as ``"\n"``, ``"\r\n"`` and
    ``"\r"`` too: a Windows copy of a text has the vocabulary of its Unix copy).

    The last ``validation_fraction`` of the text is the validation set (a fixed split,
    no shuffling across it); each part is cut into non-overlapping windows of
    ``seq_len + 1`` characters shifted by ``seq_len``: x the first seq_len of each,
    y the last seq_len.

    Raises:
      FileNotFoundError: no such file (IsADirectoryError: a folder there).
      ValueError: a seq_len < 1, a fraction outside (0, 1), a file that is not UTF-8, is
        empty or holds one distinct character, or a text too short for one window in each
        part.
    """
    seq_len = check_int("seq_len", seq_len, 1)
    if not is_real(validation_fraction) or not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    source = files.require_file("text file", _SHAKESPEARE if path is None else path)
    opener = gzip.open if source.suffix == ".gz" else open
    try:
        with opener(source, "rt", encoding="utf-8-sig") as file:   # a leading BOM: no token
            text = file.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"text file {str(source)!r} is not UTF-8 text: {err}") from None
    except (OSError, EOFError) as err:  # unreadable, or not (or a truncated) gzip
        raise ValueError(f"text file {str(source)!r} cannot be read: {err}") from None
    if not text:
        raise ValueError(f"text file {str(source)!r} is empty")
    vocab = "".join(sorted(set(text)))
    if len(vocab) == 1:   # a softmax over one character: loss 0, nothing to learn
        raise ValueError(f"text file {str(source)!r} holds one distinct character, "
                         f"{vocab!r}: there is nothing to predict")
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)   # one code point each
    ids = np.searchsorted(np.frombuffer(vocab.encode("utf-32-le"), np.uint32),
                          codes).astype(np.int32)                  # vocab is sorted
    cut = int(len(ids) * (1 - validation_fraction))

    def windows(part: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        n = (len(part) - 1) // seq_len
        if n < 1:
            raise ValueError(f"the text's {name} part ({len(part)} characters) is too short "
                             f"for one window of seq_len + 1 = {seq_len + 1}")
        return (part[:n * seq_len].reshape(n, seq_len),
                part[1:n * seq_len + 1].reshape(n, seq_len))

    x_train, y_train = windows(ids[:cut], "training")
    x_test, y_test = windows(ids[cut:], "validation")
    return TextDataset(x_train, y_train, x_test, y_test, vocab)
