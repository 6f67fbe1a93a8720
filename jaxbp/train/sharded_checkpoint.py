"""Checkpoints of sharded and multi-process state, through orbax-checkpoint.

:mod:`jaxbp.checkpoint` turns every leaf into one host array and writes one
file: with params split over processes that cannot work, and several
processes would write the same file. Here every process writes its own
shards through orbax (``CheckpointManager``: a step is written to a
temporary folder and committed by a rename, so a crash never leaves a
half-written checkpoint under a step's name), and a restore places every
leaf on the shardings asked for, whatever mesh wrote it.

The guarantees of :mod:`jaxbp.checkpoint` hold here too:

* integrity: orbax's commit marker (an uncommitted step is not a
  checkpoint) and its own checks when reading; a step that fails to restore
  is reported with a warning, renamed to ``<name>.corrupt`` (kept) and the
  next older one is tried;
* another tree is refused: the tree structure, shapes and dtypes are written
  in the step's JSON metadata and compared with the template before any
  array is read (:class:`jaxbp.checkpoint.CheckpointMismatchError`);
* a state holding NaN/inf is never written;
* keep-last-k: the newest ``keep`` steps are kept.

A step is a folder ``ckpt_<step>`` (9 digits) beside any ``ckpt_<step>.npz``
of :mod:`jaxbp.checkpoint`; :func:`jaxbp.fit` resumes from the newest of
either, so a run can move from one device to a mesh and back.

orbax-checkpoint is an extra (it brings tensorstore, ~25 MB, and takes ~1 s
to import): ``pip install 'jaxbp[scale]'``.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import re
import sys
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import files, user_warnings
from jaxbp.train.checkpoint import CheckpointMismatchError, set_aside
from jaxbp.types import PyTree

PREFIX = "ckpt"
_STEP = re.compile(rf"^{PREFIX}_(\d+)$")


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:
        raise ImportError("sharded checkpoints need orbax-checkpoint: pip install "
                          "'jaxbp[scale]'") from err
    return ocp


def _manager(directory: str | pathlib.Path, keep: int | None = None) -> Any:
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, step_prefix=PREFIX, step_format_fixed_length=9,
        enable_async_checkpointing=False, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                                 jax.dtypes.prng_key)


def _storable(tree: PyTree) -> PyTree:
    """Typed PRNG keys as their uint32 key data (what orbax stores)."""
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)


def _layout(tree: PyTree) -> dict[str, Any]:
    """The tree structure and each leaf's shape and dtype (as stored)."""
    leaves, treedef = jax.tree.flatten(_storable(tree))
    return {"treedef": str(treedef),
            "leaves": [[list(np.shape(leaf)), jnp.dtype(leaf.dtype).str] for leaf in leaves]}


def _nonfinite_leaf(tree: PyTree) -> str | None:
    """The path of the first floating leaf holding NaN/inf (checked on the devices)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            finite = jnp.all(jnp.isfinite(leaf))
            if not bool(np.asarray(jax.device_get(finite) if jax.process_count() == 1
                                   else finite.addressable_data(0))):
                return jax.tree_util.keystr(path)
    return None


def list_steps(directory: str | pathlib.Path) -> list[int]:
    """The committed steps in ``directory``, oldest first."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    steps = [int(m.group(1)) for p in directory.iterdir()
             if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(steps)


def path_for(directory: str | pathlib.Path, step: int) -> pathlib.Path:
    """The folder of step ``step``."""
    return pathlib.Path(directory) / f"{PREFIX}_{step:09d}"


def save(directory: str | pathlib.Path, step: int, tree: PyTree,
         metadata: dict[str, Any] | None = None, keep: int | None = 3) -> pathlib.Path:
    """Write ``tree`` (sharded, from every process) and JSON ``metadata`` as step ``step``.

    Every process of a multi-process run must call it (each writes its shards).

    Raises:
      FloatingPointError: a floating leaf holds NaN/inf; nothing is written.
    """
    bad = _nonfinite_leaf(tree)
    if bad is not None:
        raise FloatingPointError(f"checkpoint {step} not written: leaf {bad} holds NaN/inf, "
                                 f"and a run could not resume from it")
    ocp = _orbax()
    manager = _manager(directory, keep)
    meta = {"layout": _layout(tree), "metadata": metadata or {}}
    with files.interrupts_deferred():     # a Ctrl-C here: raised once the step is finalised
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_storable(tree)), meta=ocp.args.JsonSave(meta)),
            force=True)
        manager.wait_until_finished()
        manager.close()
    return path_for(directory, step)


def restore(directory: str | pathlib.Path, step: int, template: PyTree,
            shardings: PyTree | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Step ``step`` restored into the structure of ``template``, on ``shardings``.

    Args:
      template: a pytree of the same structure, shapes and dtypes (typed PRNG
        keys are rebuilt as keys of the template's implementation).
      shardings: a sharding per leaf (a pytree like the template), or None for
        the default device.

    Raises:
      CheckpointMismatchError: another tree (structure, shapes or dtypes).
      Exception: whatever orbax raises for an unreadable step.
    """
    ocp = _orbax()
    manager = _manager(directory)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        expected = _layout(template)
        where = str(path_for(directory, step))
        if meta["layout"] != expected:
            raise CheckpointMismatchError(
                f"checkpoint {where!r} holds {meta['layout']['treedef']} with leaves "
                f"{meta['layout']['leaves']} but the template is {expected['treedef']} with "
                f"leaves {expected['leaves']}", pathlib.Path(where), meta["metadata"])
        storable = _storable(template)
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, storable)
        abstract = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(
            np.shape(leaf), jnp.result_type(leaf), sharding=sharding), storable, shardings)
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
    finally:
        manager.close()
    keys = jax.tree.map(_is_key, template)
    restored = jax.tree.map(
        lambda is_key, value, like: jax.random.wrap_key_data(
            value, impl=jax.random.key_impl(like)) if is_key else value,
        keys, state, template)
    return restored, meta["metadata"]


def restore_latest(directory: str | pathlib.Path, template: PyTree,
                   shardings: PyTree | None = None
                   ) -> tuple[PyTree, dict[str, Any], pathlib.Path] | None:
    """The newest step that restores, or None. A step that fails to read is reported,
    renamed to ``<name>.corrupt`` by process 0 (kept) and the next older one tried.

    Raises:
      CheckpointMismatchError: a sound step of another tree (nothing is skipped).
      ImportError: steps to read but no orbax-checkpoint to read them, raised before
        anything is touched (a missing library is never a corrupt step).
    """
    steps = list_steps(directory)
    if steps:
        _orbax()
        drop_unretrieved_read_errors()
    for step in reversed(steps):
        path = path_for(directory, step)
        try:
            with _quiet_orbax_log():
                tree, metadata = restore(directory, step, template, shardings)
        except (CheckpointMismatchError, ImportError):
            raise
        except Exception as err:  # orbax/tensorstore raise many types for a bad step
            drop_closed_loop_callbacks()
            aside = path.with_name(path.name + ".corrupt")
            if jax.process_index() == 0:
                aside = set_aside(path)
            user_warnings.warn(f"skipping checkpoint {str(path)!r}: {type(err).__name__}: "
                               f"{_first_sentence(err)}; kept as {str(aside)!r}", RuntimeWarning)
            continue
        return tree, metadata, path
    return None


@contextlib.contextmanager
def _quiet_orbax_log() -> Iterator[None]:
    """Hold back orbax's own log lines (absl ``ERROR: Failed to json parse ...``) while a
    step is tried: a step that fails is reported once, by the warning that sets it aside."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


_MESSAGE_CHARS = 240


def _first_sentence(err: BaseException) -> str:
    """The error's first line without tensorstore's spec dumps, at most 240 characters."""
    text = str(err).splitlines()[0] if str(err) else ""
    text = text.split(" [tensorstore_spec")[0]
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS - 3] + "..."


_ABANDONED_COROUTINES = r"coroutine 'Store\._get_array_metadatas' was never awaited"
"""The warning of an orbax read abandoned with its closed loop (see below)."""


def drop_closed_loop_callbacks() -> None:
    """Keep Python from printing tensorstore's late callbacks after a failed restore.

    When orbax gives up on a damaged step it closes its asyncio loop; tensorstore then
    completes the abandoned reads from its own threads, and each completion's
    ``loop.call_soon_threadsafe`` raises ``RuntimeError: Event loop is closed``, which
    Python prints as an "Exception ignored" traceback (dozens of lines, at any later
    moment), and the abandoned reads' coroutines warn that they were never awaited.
    Installed once, after a step failed: that warning ignored (by its exact name), and a
    ``sys.unraisablehook`` that drops
    exactly that error (raised by asyncio's ``_check_closed`` under
    ``call_soon_threadsafe``) and hands every other one to the hook before it.
    """
    # the abandoned reads' coroutines, collected unawaited at any later moment (seen once in
    # CI, from threading.py): orbax's own, named exactly
    warnings.filterwarnings("ignore", message=_ABANDONED_COROUTINES, category=RuntimeWarning)
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable: Any) -> None:
        if not is_closed_loop_callback(unraisable):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


_UNRETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


class _UnretrievedReadErrors(logging.Filter):
    """Drops asyncio's log of a read orbax abandoned: a task or future collected with its
    tensorstore error never retrieved (the sibling reads of a damaged step, logged at ERROR
    with the whole tensorstore spec at whatever moment the garbage collector runs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_unretrieved_read_error(record)


def drop_unretrieved_read_errors() -> None:
    """Install, once, the asyncio log filter of :class:`_UnretrievedReadErrors`: the failed
    step is reported by its one warning, its abandoned sibling reads by nothing."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReadErrors) for f in logger.filters):
        logger.addFilter(_UnretrievedReadErrors())


def is_unretrieved_read_error(record: logging.LogRecord) -> bool:
    """An asyncio "... exception was never retrieved" record whose exception is tensorstore's
    (its spec in the text) or was raised in orbax's code; every other record is kept."""
    if not (record.exc_info and str(record.msg).startswith(_UNRETRIEVED)):
        return False
    err, tb = record.exc_info[1], record.exc_info[2]
    in_orbax = any("/orbax/" in frame.filename for frame in traceback.extract_tb(tb))
    return in_orbax or "[tensorstore_spec" in str(err)


def is_closed_loop_callback(unraisable: Any) -> bool:
    """An unraisable ``RuntimeError: Event loop is closed`` from ``call_soon_threadsafe``."""
    err = unraisable.exc_value
    if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
        return False
    names = [frame.name for frame in traceback.extract_tb(unraisable.exc_traceback)]
    return "call_soon_threadsafe" in names and names[-1] == "_check_closed"
