"""A run's checkpoints: the format chosen by where it runs, and the check that a resume is
the same run.

One device writes the single-file ``.npz`` (:mod:`jaxbp.train.checkpoint`); a mesh
writes sharded orbax checkpoints (:mod:`jaxbp.train.sharded_checkpoint`, every process
its own shards). A run resumes from the newest checkpoint of either format, so it can
move between one device and a mesh.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import jax
import numpy as np

from jaxbp import files, user_warnings
from jaxbp.mlp import MLP
from jaxbp.network import Network
from jaxbp.parallel import fetch
from jaxbp.train import checkpoint
from jaxbp.train.checkpoint import where_they_differ
from jaxbp.train.run_config import run_differences
from jaxbp.train.step import TrainState
from jaxbp.types import PRNGKey


def save(directory: str | pathlib.Path, step: int, state: TrainState, key: PRNGKey,
          metadata: dict[str, Any], keep: int, mesh: jax.sharding.Mesh | None) -> None:
    """One checkpoint: a sharded one through orbax on a mesh (every process writes its
    shards), else the single-file .npz."""
    if mesh is None:
        checkpoint.save(directory, step, {"state": state, "key": key}, metadata, keep=keep)
        return
    from jaxbp.train import sharded_checkpoint

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    key_data = jax.device_put(np.asarray(jax.random.key_data(key)), replicated)
    sharded_checkpoint.save(directory, step, {"state": state, "key": key_data}, metadata,
                            keep=keep)


def restore_latest(directory: str | pathlib.Path, state: TrainState, key: PRNGKey,
                    shardings: Any) -> tuple[dict[str, Any], dict[str, Any], pathlib.Path] | None:
    """The newest checkpoint of either format, placed like ``state`` (on ``shardings``)."""
    found = checkpoint.restore_latest(directory, {"state": state, "key": key})
    from jaxbp.train import sharded_checkpoint

    if sharded_checkpoint.list_steps(directory):  # written by a mesh run
        key_data = np.asarray(jax.random.key_data(key))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state_sh = shardings if shardings is not None else jax.tree.map(lambda _: device, state)
        key_sh = (device if shardings is None else jax.sharding.NamedSharding(
            jax.tree.leaves(shardings)[0].mesh, jax.sharding.PartitionSpec()))
        sharded = sharded_checkpoint.restore_latest(
            directory, {"state": state, "key": key_data}, {"state": state_sh, "key": key_sh})
        if sharded is not None and (found is None or sharded[1]["epoch"] > found[1]["epoch"]):
            tree, metadata, path = sharded
            key_host = np.asarray(fetch(tree["key"]))
            tree = {"state": tree["state"], "key": jax.random.wrap_key_data(
                key_host, impl=jax.random.key_impl(key))}
            return tree, metadata, path
    if found is not None and shardings is not None:  # an .npz of one device, onto the mesh
        tree, metadata, path = found
        state = jax.device_put(jax.tree.map(np.asarray, tree["state"]), shardings)
        return {"state": state, "key": tree["key"]}, metadata, path
    return found


def check_same_run(path: pathlib.Path, saved: dict[str, Any] | None, now: dict[str, Any],
                    allow_change: bool, progress: bool) -> None:
    """Refuse to resume another run's checkpoint, naming what differs."""
    if saved is None:
        user_warnings.warn(f"checkpoint {str(path)!r} has no run record (written by an older "
                           f"jaxbp): net, optimizer, seed and data are not checked", RuntimeWarning)
        return
    differences = run_differences(saved, now)
    if not differences:
        return
    if allow_change:          # said always (a warning when quiet): the run is not the same
        notice = f"resuming {path} although the run changed: " + "; ".join(differences)
        if progress:
            print(notice)
        else:
            user_warnings.warn(notice, RuntimeWarning)
        return
    raise checkpoint.CheckpointMismatchError(
        _another_run(path, differences) + ". Use another checkpoint folder, or pass "
        "allow_run_change=True (jaxbp train --allow-run-change) to resume it anyway")


def _another_run(path: Any, differences: list[str]) -> str:
    """The one way both refusals name what differs between two runs' records."""
    return f"checkpoint {str(path)!r} was written by another run: " + "; ".join(differences)


def explained(err: checkpoint.CheckpointMismatchError,
              now: dict[str, Any]) -> checkpoint.CheckpointMismatchError:
    """A checkpoint whose arrays do not fit this run's, said by what differs between the
    two runs' records where they differ (a GPT's ``seq_len`` sizes its positions table):
    what changed, not only which leaf. No ``allow_run_change`` can resume it."""
    saved = err.metadata.get("run")
    differences = [] if saved is None else run_differences(saved, now)
    if not differences:
        return err
    return checkpoint.CheckpointMismatchError(
        _another_run(err.path, differences) + f". Its arrays do not fit this run's either "
        f"({err}), so it cannot be resumed, even with allow_run_change: use another "
        f"checkpoint folder", err.path, err.metadata)


def load_params(directory: str | pathlib.Path, net: Any,
                optimizer: Any = None) -> tuple[Any, dict[str, Any]]:
    """The params of the newest checkpoint that :func:`jaxbp.fit` (or ``jaxbp train``)
    wrote in ``directory``, for ``net``: to evaluate, generate from or fine-tune a trained
    model without rebuilding the state it trained in.

    An ``.npz`` checkpoint (one device) holds the params at a fixed place of its tree
    ``{"key", "state": TrainState(step, params, opt_state)}``: they are read there, checked
    against ``net``'s structure, shapes and dtypes (and against the net of the run's
    record), without the optimizer. A mesh run's sharded (orbax) checkpoint is read through
    the whole state's template, so it needs the ``optimizer`` the run trained with.
    The numerical recipe (``compute_dtype``, ``activation_dtype``) may differ from the
    run's: params trained in bf16 load into the same net in float32, and back.

    Returns:
      ``(params, metadata)``: params as ``net.init`` gives them (jax arrays) and the
      checkpoint's metadata (``epoch``, ``history``, ``run``).

    Raises:
      FileNotFoundError: no checkpoint in ``directory``.
      jaxbp.checkpoint.CheckpointMismatchError: another net's params (named).
      ValueError: a sharded checkpoint and no ``optimizer``.
    """
    directory = files.as_path("directory", directory)
    if not isinstance(net, MLP | Network):
        raise TypeError(f"net must be a jaxbp.MLP or jaxbp.Network (the one the run trained), "
                        f"got {type(net).__name__}")
    shapes = jax.eval_shape(net.init, jax.random.key(0))
    from jaxbp.train import sharded_checkpoint

    npz = checkpoint.list_checkpoints(directory) if directory.is_dir() else []
    sharded = sharded_checkpoint.list_steps(directory)
    if not npz and not sharded:
        raise FileNotFoundError(f"no checkpoint in {str(directory)!r} (fit's checkpoint_dir, "
                                f"jaxbp train --checkpoint-dir)")
    if sharded and (not npz or sharded[-1] > checkpoint.step_of(npz[-1])):
        return _sharded_params(directory, net, shapes, optimizer)
    leaves, header = checkpoint.read(npz[-1])
    _check_run_net(npz[-1], header["metadata"], net)
    treedef = jax.tree.structure(shapes)
    expected = "PyTreeDef({'key': *, 'state': CustomNode(namedtuple[TrainState], [*, " \
        + str(treedef)[len("PyTreeDef("):-1] + ", "
    wanted = jax.tree.leaves(shapes)
    got = leaves[2:2 + len(wanted)]
    if not header["treedef"].startswith(expected) or any(
            a.shape != w.shape or a.dtype != w.dtype for a, w in zip(got, wanted)):
        raise checkpoint.CheckpointMismatchError(
            f"checkpoint {str(npz[-1])!r} holds no params of this net: its tree is "
            f"{header['treedef'][:200]}..., the net's params {treedef} with leaves "
            f"{[(w.dtype.name, w.shape) for w in wanted]}")
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(a) for a in got]), header["metadata"]


_RECIPE_FIELD = re.compile(r", (?:compute_dtype|activation_dtype)=(?:None|'\w+')")
"""A layer's or a net's numerical-recipe field in its repr (jaxbp.layers.precision)."""


def _architecture(net_repr: str) -> str:
    """A net's repr without its numerical recipe: one architecture's params serve every
    recipe (a GPT trained in bf16 is evaluated in float32, and back)."""
    return _RECIPE_FIELD.sub("", net_repr)


def _check_run_net(path: pathlib.Path, metadata: dict[str, Any], net: Any) -> None:
    """The net the run recorded (a relu net's params are no tanh net's) is ``net``, up to
    the numerical recipe (the params are the same arrays in any)."""
    recorded = (metadata.get("run") or {}).get("net")
    if recorded is not None and _architecture(recorded) != _architecture(repr(net)):
        then, now = where_they_differ(recorded, repr(net))   # a GPT's repr is long
        raise checkpoint.CheckpointMismatchError(
            f"checkpoint {str(path)!r} was written by a run of another net: the run's "
            f"{then}, this {now}")


def _sharded_params(directory: str | pathlib.Path, net: Any, shapes: Any,
                    optimizer: Any) -> tuple[Any, dict[str, Any]]:
    if optimizer is None:
        raise ValueError(f"the newest checkpoint in {str(directory)!r} was written by a mesh "
                         f"run (sharded, orbax): pass the optimizer it trained with "
                         f"(optimizer=...) to read it through the whole state")
    params = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), shapes)
    found = restore_latest(directory, TrainState.create(params, optimizer),
                           jax.random.key(0), None)
    if found is None:
        raise FileNotFoundError(f"no readable checkpoint in {str(directory)!r}")
    tree, metadata, path = found
    _check_run_net(path, metadata, net)
    return tree["state"].params, metadata
