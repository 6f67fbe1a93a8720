"""What :func:`jaxbp.fit` checks before it loads, compiles or trains anything: its
arguments, where its results go, and the mesh it shards over."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxbp import files, input_checks, parallel, value_checks
from jaxbp.data import Dataset
from jaxbp.mlp import MLP
from jaxbp.network import Network
from jaxbp.train.step import check_optimizer
from jaxbp.types import check_bool, check_int


def arguments(net: Any, optimizer: Any, data: Any, epochs: Any, batch_size: Any,
                         key: Any, keep: Any, eval_batch_size: Any, chunk_steps: Any) -> None:
    """Every argument of :func:`fit` checked before anything is loaded or compiled."""
    if not isinstance(net, MLP | Network):
        raise TypeError(f"net must be a jaxbp.MLP or jaxbp.Network, got {type(net).__name__}")
    check_optimizer(optimizer)
    if not all(hasattr(data, name) for name in Dataset._fields):
        raise TypeError(f"data must be a jaxbp.data.Dataset (x_train, y_train, x_test, "
                        f"y_test), got {type(data).__name__}")
    for part in ("train", "test"):   # a sample without its target would be paired wrongly
        x = input_checks.as_array(f"data.x_{part}", getattr(data, f"x_{part}"))
        y = input_checks.as_array(f"data.y_{part}", getattr(data, f"y_{part}"))
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"data.x_{part} has {len(x)} rows and data.y_{part} {len(y)}: "
                             f"expected one target per sample, and at least one sample")
        # the shapes, dtypes, labels, tokens and finiteness of the whole set, named as the
        # data's
        input_checks.check_x(net, x, f"data.x_{part}")
        input_checks.check_y(net, y, len(x), f"data.y_{part}")
        value_checks.check_finite(x, f"data.x_{part}")
        value_checks.check_finite(y, f"data.y_{part}")
    input_checks.check_key("key", key)
    check_int("epochs", epochs, 1)
    check_int("batch_size", batch_size, 1)
    if keep is not None:
        check_int("keep", keep, 1)
    check_int("eval_batch_size", eval_batch_size, 1)
    if chunk_steps is not None:
        check_int("chunk_steps", chunk_steps, 1)


def run_record(run_config: Any) -> None:
    """``run_config``: None or a dict of the caller's entries, named by strings."""
    if run_config is not None and not (isinstance(run_config, dict)
                                       and all(isinstance(k, str) for k in run_config)):
        raise TypeError(f"run_config must be None or a dict with str keys (entries for the "
                        f"run's record), got {type(run_config).__name__}")


def checkpoint_options(checkpoint_dir: Any, **options: Any) -> None:
    """The options that shape checkpoints (``keep``, ``run_config``, ``allow_run_change``)
    are refused without a ``checkpoint_dir``, where nothing would read them."""
    given = [name for name, value in options.items() if value]   # None, False, {}: unset
    if checkpoint_dir is None and given:
        names = " and ".join(given)
        raise ValueError(f"{names} {'is' if len(given) == 1 else 'are'} used only for "
                         f"checkpoints, and checkpoint_dir is None: give a checkpoint_dir, "
                         f"or leave {names} out")


def optimizer_in_half_precision(optimizer: Any, state: Any) -> None:
    """Params in float16/bfloat16: the optimizer's update of a zero gradient is finite. In
    float16 adam's eps (1e-8) rounds to 0, so every gradient entry that is exactly 0 (a
    dead relu, a pixel that is 0 in every image) updates by 0/0: NaN params after the
    first step, which the step then reported as a NaN gradient. One update, before any."""
    dtype = jax.tree.leaves(state.params)[0].dtype
    if dtype not in (jnp.float16, jnp.bfloat16):
        return
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    try:
        updates = optimizer.update(zeros, state.opt_state, state.params)[0]
    except Exception:   # an optimizer that needs more (K-FAC's factors) is left to the step
        return
    if not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)):
        raise ValueError(f"the optimizer's update of a zero gradient is not finite for "
                         f"{dtype} params (adam's eps 1e-8 is 0 in float16: 0/0), so training "
                         f"would turn the params NaN at the first step: keep float32 params "
                         f"and compute in {dtype} (MLP/Network(..., "
                         f"compute_dtype='{dtype}')), or give the optimizer an eps {dtype} "
                         f"holds (optax.adam(lr, eps=1e-4))")


def flags(**values: Any) -> None:
    """Each of fit's switches is True or False (``progress="no"`` would mean True)."""
    for name, value in values.items():
        check_bool(name, value)


def destinations(plot: Any, checkpoint_dir: Any) -> None:
    """Where the results go, before any work: a run must not end in an error it could have
    had at the start, its trained state lost (a folder as ``plot``, no matplotlib)."""
    if plot is not None:
        files.check_figure_path("plot", plot)
    if checkpoint_dir is not None:
        files.check_writable_folder("checkpoint_dir", checkpoint_dir)


def mesh(mesh: Any, n_train: int, batch_size: int, drop_last: bool,
         private: bool = False) -> None:
    """A mesh with a data axis that splits every batch (and this process's share) evenly
    (a private run's Poisson batches are padded to a size that does:
    :meth:`jaxbp.train.private.Plan.on_mesh`)."""
    if mesh is None:
        return
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (jaxbp.parallel.make_mesh), got "
                        f"{type(mesh).__name__}")
    if parallel.DATA not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, expected a {parallel.DATA!r} axis")
    if private:
        return
    n_data, processes = mesh.shape[parallel.DATA], jax.process_count()
    sizes = [batch_size] + ([] if drop_last or n_train % batch_size == 0
                            else [n_train % batch_size])
    for size in sizes:
        if size % n_data or size % processes:
            raise ValueError(f"a batch of {size} rows does not split over the {n_data} devices "
                             f"of the mesh's data axis and {processes} process(es); choose "
                             f"batch_size (and drop_last=True) so that every batch does")

