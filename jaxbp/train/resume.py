"""A run's checkpoints: the format chosen by where it runs, and the check that a resume is
the same run.

One device writes the single-file ``.npz`` (:mod:`jaxbp.train.checkpoint`); a mesh
writes sharded orbax checkpoints (:mod:`jaxbp.train.sharded_checkpoint`, every process
its own shards). A run resumes from the newest checkpoint of either format, so it can
move between one device and a mesh.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np

from jaxbp import user_warnings
from jaxbp.parallel import fetch
from jaxbp.train import checkpoint
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
        f"checkpoint {str(path)!r} was written by another run: " + "; ".join(differences)
        + ". Use another checkpoint folder, or pass allow_run_change=True "
          "(jaxbp train --allow-run-change) to resume it anyway")
