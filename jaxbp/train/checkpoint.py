"""Atomic checkpoints of any pytree (a TrainState, its RNG, the loop's position) as ``.npz``.

A checkpoint is one ``ckpt_<step>.npz`` holding every leaf as an array plus a
JSON header: the tree structure, each leaf's shape and dtype, a SHA-256 of the
leaf bytes and the caller's metadata. It is written to a temporary file in the
same folder, flushed to disk, and renamed over the final name (``os.replace``
is atomic on POSIX and Windows), so a crash leaves the previous checkpoints
untouched and never a half-written one under a checkpoint's name. After a
successful save only the newest ``keep`` checkpoints are kept.

Restoring checks everything it can and raises :class:`CheckpointError` naming
the file: a truncated or corrupt archive, a digest that does not match, a
tree that does not fit the template.

What a user saved is never lost or mixed up:

* a state holding NaN/inf is refused (:func:`save` raises naming the leaf),
  so the newest checkpoint is always one a run can resume from;
* keep-last-k removes only checkpoints older than the one just written, so
  files of another run with higher step numbers never push a new one out;
* :func:`restore_latest` renames a corrupt file to ``<name>.corrupt`` (kept,
  never deleted) after warning about it, so it no longer counts;
* :func:`lock` lets one run at a time use a folder (a file lock); temporary
  files a killed save left behind are removed by
  :func:`remove_stale_temporaries` once the lock is held.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import tempfile
import zipfile
from typing import Any

import jax
import numpy as np

from jaxbp import files, user_warnings
from jaxbp.types import PyTree, check_bool, check_int, check_not_deleted

_NAME = re.compile(r"^ckpt_(\d+)\.npz$")
_HEADER = "__header__"
FORMAT = "jaxbp-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint file cannot be restored (corrupt, truncated or of another tree)."""


class CheckpointMismatchError(CheckpointError):
    """A sound checkpoint of a different tree than the template (another net or optimizer).

    ``path`` and ``metadata`` are the checkpoint's where they were read (else None and
    ``{}``): a resume explains the mismatch by the runs' records."""

    def __init__(self, message: str, path: pathlib.Path | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.path, self.metadata = path, metadata or {}


class CheckpointLockedError(RuntimeError):
    """Another run holds the checkpoint folder's lock."""


LOCK_NAME = ".jaxbp.lock"
_TEMPORARY = re.compile(r"^\.ckpt_\d+\.npz\..*\.tmp$")


def _folder(directory: str | pathlib.Path) -> pathlib.Path:
    """The checkpoint folder, made if missing: else a ValueError naming it, in the words
    :func:`jaxbp.fit` and the command line use (not ``mkdir``'s OSError). No write test
    here: the save itself writes, and fit tested the folder before its first epoch."""
    return files.make_folder("directory", directory)


def lock(directory: str | pathlib.Path) -> Any:
    """An acquired file lock on ``directory`` (a ``filelock.FileLock``; release it, or use
    it in a ``with`` block). Created if missing.

    Raises:
      CheckpointLockedError: another process holds it; the message names the lock file.
    """
    import filelock

    directory = _folder(directory)
    file_lock = filelock.FileLock(directory / LOCK_NAME)
    try:
        file_lock.acquire(timeout=0)
    except filelock.Timeout:
        raise CheckpointLockedError(
            f"checkpoint folder {str(directory)!r} is in use by another run (it holds "
            f"{str(directory / LOCK_NAME)!r}); wait for it to end or use another folder"
        ) from None
    return file_lock


def remove_stale_temporaries(directory: str | pathlib.Path) -> list[pathlib.Path]:
    """Delete the temporary files of saves that were killed midway; the paths removed.

    Call it only while holding :func:`lock`: then no save is under way.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if _TEMPORARY.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _nonfinite_leaf(tree: PyTree, leaves: list[np.ndarray]) -> str | None:
    """The path of the first floating leaf holding a NaN/inf, or None."""
    paths = [jax.tree_util.keystr(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(tree)[0]]
    for path, leaf in zip(paths, leaves):
        if np.issubdtype(leaf.dtype, np.inexact) and not np.all(np.isfinite(leaf)):
            return path
    return None


def _digest(leaves: list[np.ndarray]) -> str:
    sha = hashlib.sha256()
    for leaf in leaves:
        sha.update(str((leaf.shape, leaf.dtype.str)).encode())
        sha.update(np.ascontiguousarray(leaf).tobytes())
    return sha.hexdigest()


def _host_leaves(tree: PyTree) -> list[np.ndarray]:
    """Leaves as host arrays; typed PRNG keys are stored as their key data."""
    leaves = []
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                                  jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        leaves.append(np.asarray(leaf))
    return leaves


def path_for(directory: str | pathlib.Path, step: int) -> pathlib.Path:
    """The file name of the checkpoint for ``step`` in ``directory``."""
    return pathlib.Path(directory) / f"ckpt_{step:09d}.npz"


def list_checkpoints(directory: str | pathlib.Path) -> list[pathlib.Path]:
    """The checkpoints in ``directory``, oldest (smallest step) first."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save(
    directory: str | pathlib.Path,
    step: int,
    tree: PyTree,
    metadata: dict[str, Any] | None = None,
    keep: int | None = 3,
    allow_nonfinite: bool = False,
) -> pathlib.Path:
    """Write ``tree`` (and JSON-serialisable ``metadata``) atomically as checkpoint ``step``.

    Args:
      directory: created if missing.
      step: a non-negative int; names the file ``ckpt_<step>.npz``.
      tree: any pytree of arrays (jax, NumPy, scalars; typed PRNG keys too).
      metadata: JSON-serialisable extras (epoch, history, ...).
      keep: keep the newest ``keep`` checkpoints up to this one after saving
        (None: all); checkpoints with a larger step are left alone.
      allow_nonfinite: write a tree holding NaN/inf (by default refused: a
        checkpoint is where a run resumes from).

    Returns:
      The path written.

    Raises:
      FloatingPointError: a floating leaf holds NaN/inf; nothing is written.
      ValueError: a leaf was deleted (donated to a train step); nothing is written.
    """
    step = check_int("step", step, 0)
    keep = check_int("keep", keep, 1, optional=True)
    check_bool("allow_nonfinite", allow_nonfinite)
    check_not_deleted("tree", tree)
    directory = _folder(directory)
    leaves = _host_leaves(tree)
    bad = None if allow_nonfinite else _nonfinite_leaf(tree, leaves)
    if bad is not None:
        raise FloatingPointError(f"checkpoint {step} not written: leaf {bad} holds NaN/inf, "
                                 f"and a run could not resume from it")
    header = {
        "format": FORMAT,
        "step": step,
        "treedef": str(jax.tree.structure(tree)),
        "leaves": [[list(leaf.shape), leaf.dtype.str] for leaf in leaves],
        "sha256": _digest(leaves),
        "metadata": metadata or {},
    }
    arrays = {f"leaf_{i:05d}": leaf for i, leaf in enumerate(leaves)}
    try:
        text = json.dumps(header)
    except (TypeError, ValueError) as err:   # before anything is written
        raise TypeError(f"metadata must be JSON-serialisable (numbers, strings, lists, dicts): "
                        f"{err}") from None
    arrays[_HEADER] = np.frombuffer(text.encode(), dtype=np.uint8)
    final = path_for(directory, step)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    try:
        with files.interrupts_deferred():      # a Ctrl-C here: raised once the file is whole
            with os.fdopen(fd, "wb") as file:
                np.savez(file, **arrays)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, final)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    if keep is not None:
        upto = [p for p in list_checkpoints(directory) if step_of(p) <= step]
        for old in upto[:-keep]:
            old.unlink(missing_ok=True)
    return final


def step_of(path: pathlib.Path) -> int:
    """The step a checkpoint file is named for."""
    return int(_NAME.match(path.name).group(1))


def _fsync_directory(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows); the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read(path: str | pathlib.Path) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The leaves and header of a checkpoint file, integrity-checked.

    Raises:
      FileNotFoundError: no such file (IsADirectoryError: a folder there).
      CheckpointError: unreadable, truncated, not a jaxbp checkpoint, or its
        leaves do not match the digest written with them.
    """
    path = files.require_file("checkpoint", path)
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(bytes(data[_HEADER]).decode())
            leaves = [data[f"leaf_{i:05d}"] for i in range(len(header["leaves"]))]
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt: "
                              f"{type(err).__name__}: {err}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {header.get('format')!r}, "
                              f"expected {FORMAT!r}")
    if _digest(leaves) != header["sha256"]:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its arrays do not match "
                              f"the SHA-256 written with them")
    named = _NAME.match(path.name)
    if named and int(named.group(1)) != header.get("step"):
        raise CheckpointError(f"checkpoint {str(path)!r} is named for step "
                              f"{int(named.group(1))} but holds step {header.get('step')} "
                              f"(renamed or copied by hand): it cannot say which is newest")
    return leaves, header


def restore(path: str | pathlib.Path, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Load checkpoint ``path`` into the structure of ``template``.

    Args:
      path: a file written by :func:`save`.
      template: a pytree of the same structure, shapes and dtypes (for
        example ``TrainState.create(net.init(key), optimizer)``); typed PRNG
        key leaves are rebuilt as keys of the template's implementation.

    Returns:
      ``(tree, metadata)``: the restored pytree (jax arrays) and the metadata.

    Raises:
      CheckpointError: corrupt or truncated.
      CheckpointMismatchError: a structure/shape/dtype other than the
        template's (every mismatch named).
    """
    leaves, header = read(path)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    template_leaves = [like for _, like in with_paths]
    if len(leaves) != len(template_leaves) or header["treedef"] != str(treedef):
        saved, wanted = where_they_differ(header["treedef"], str(treedef))
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} holds a tree of {len(leaves)} leaves but the template "
            f"has {len(template_leaves)}; they part at: checkpoint {saved}, template {wanted}",
            path, header.get("metadata"))
    restored, problems = [], []
    for (where, like), leaf in zip(with_paths, leaves):
        is_key = isinstance(like, jax.Array) and jax.dtypes.issubdtype(like.dtype,
                                                                        jax.dtypes.prng_key)
        # shapes and dtypes only: the template's values stay where they are (no host copy)
        expected = jax.eval_shape(jax.random.key_data, like) if is_key else like
        shape = tuple(np.shape(expected))
        dtype = np.dtype(expected.dtype if hasattr(expected, "dtype")    # arrays, structs
                         else np.result_type(expected))                  # Python numbers
        if leaf.shape != shape or leaf.dtype != dtype:
            problems.append(f"leaf {jax.tree_util.keystr(where) or '(the root)'} is "
                            f"{leaf.dtype}{list(leaf.shape)}, template {dtype}{list(shape)}")
            continue
        value = jax.numpy.asarray(leaf)
        restored.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
                        if is_key else value)
    if problems:
        raise CheckpointMismatchError(f"checkpoint {str(path)!r} does not fit the template: "
                                      + "; ".join(problems), path, header.get("metadata"))
    return jax.tree.unflatten(treedef, restored), header["metadata"]


def set_aside(path: pathlib.Path) -> pathlib.Path:
    """Rename a corrupt checkpoint (file or folder) to the first free name of
    ``<name>.corrupt``, ``<name>.corrupt.2``, ...: kept, never counted as a checkpoint, and
    never failing on (or replacing) one set aside before. Returns the new path."""
    aside, n = path.with_name(path.name + ".corrupt"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt.{n}")
    os.rename(path, aside)
    return aside


def restore_latest(
    directory: str | pathlib.Path, template: PyTree
) -> tuple[PyTree, dict[str, Any], pathlib.Path] | None:
    """The newest checkpoint in ``directory`` that restores, or None if there is none.

    A newest file that is corrupt is reported with a warning naming it,
    renamed to ``<name>.corrupt`` (kept, so nothing is lost, and no longer
    counted as a checkpoint), and the next older one is tried.

    Raises:
      CheckpointMismatchError: a sound checkpoint that does not fit the
        template (another run's folder): resuming from an older one would
        be wrong, so nothing is skipped.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            tree, metadata = restore(path, template)
        except CheckpointMismatchError:
            raise
        except CheckpointError as err:
            aside = set_aside(path)
            user_warnings.warn(f"skipping {err}; kept as {str(aside)!r}", RuntimeWarning)
            continue
        return tree, metadata, path
    return None


def where_they_differ(before: str, after: str, limit: int = 120) -> tuple[str, str]:
    """Both texts, cut to ``limit`` characters around their first difference: a long
    entry (a GPT's repr) that differs near its end (``input_shape``) still shows where."""
    if max(len(before), len(after)) <= limit:
        return before, after
    first = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b),
                 min(len(before), len(after)))
    start = max(0, first - limit // 3)
    return tuple(("..." if start else "") + text[start:start + limit]
                 + ("..." if start + limit < len(text) else "") for text in (before, after))
