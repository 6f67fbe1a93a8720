"""The data of a run, fed to the compiled loop: chunks of batches on the device, one ahead.

An epoch is a list of chunks ``(xs, ys)`` of shape (k, batch, ...), k steps each, or
``(xs, ys, masks)`` for Poisson-sampled (DP-SGD) batches. The host waits for the device
once per chunk (:func:`check_chunk` reads the chunk's metrics then, while the next one runs).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import network, user_warnings, value_checks
from jaxbp.data import AnyDataset, epoch_order
from jaxbp.parallel import process_rows
from jaxbp.types import PRNGKey

DEVICE_DATA_BYTES = 2 * 2**30
"""Data sets up to this size (x and y of train and test together) are put on the device
once and batched there; larger ones are gathered on the host chunk by chunk and copied
to the device one chunk ahead of the step that needs it."""

CHUNK_STEPS = 100
"""Default steps per compiled chunk: the host waits for the device once per chunk."""


def check_chunk(metrics: dict[str, np.ndarray], first_step: int) -> None:
    """Raise for the first step of a chunk that went wrong; steps are numbered from 1.

    Raises:
      FloatingPointError: a loss or a layer's gradient that is NaN/inf.
      ValueError: labels outside ``[0, n_out)`` (``[-1, n_out)`` for a sequence's) or
        tokens outside ``[0, vocab)`` in a batch.
    """
    layers = metrics["nonfinite_layer"]
    losses = metrics["loss"]
    invalid = metrics.get("invalid_labels", np.zeros_like(layers))
    tokens = metrics.get("invalid_tokens", np.zeros_like(layers))
    bad = np.flatnonzero((layers >= 0) | ~np.isfinite(losses) | (invalid > 0) | (tokens > 0))
    if bad.size == 0:
        return
    i = int(bad[0])
    step = first_step + i + 1
    if invalid[i] > 0:
        raise ValueError(f"training stopped at step {step}: its batch holds {int(invalid[i])} "
                         f"labels outside [0, n_out) (-1 allowed for a sequence's ignored "
                         f"tokens); fix the labels of the data set")
    if tokens[i] > 0:
        raise ValueError(f"training stopped at step {step}: its batch holds {int(tokens[i])} "
                         f"tokens outside [0, vocab); fix the tokens of the data set")
    layer, loss = int(layers[i]), float(losses[i])
    where = (f"the gradient of layer {layer} (params[{layer}]) is the first that is not "
             f"finite" if layer >= 0 else "the gradients are finite")
    raise FloatingPointError(f"training stopped at step {step}: loss {loss}; {where}. "
                             f"Lower the learning rate or check the data for NaN/inf.")


class EpochFeed:
    """One epoch's batches as chunks of ``(xs, ys)``: (k, batch, ...) arrays on the device.

    The order is :func:`jaxbp.data.epoch_order`'s (the same permutation of the
    same key). Data that fit in :data:`DEVICE_DATA_BYTES` live on the device:
    the permutation and each chunk's gather run there, dispatched without a
    host round trip. Larger data are gathered on the host and copied over one
    chunk ahead, so the copy overlaps the previous chunk's steps.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, drop_last: bool,
                 on_device: bool, per_process: bool = False):
        self.on_device, self.batch_size, self.drop_last = on_device, batch_size, drop_last
        self.x, self.y = (jax.device_put(x), jax.device_put(y)) if on_device else (x, y)
        self.n = len(x)
        self.per_process = per_process  # a mesh run: each process feeds its own rows

    def _order(self, key: PRNGKey) -> tuple[Any, Any]:
        if not self.on_device:
            return epoch_order(self.n, self.batch_size, key, self.drop_last)
        full, tail = device_order(key, self.n, self.batch_size)
        keep_tail = not self.drop_last and self.n % self.batch_size
        return full, tail if keep_tail else None

    def _take(self, order: Any, start: int, steps: int) -> tuple[Any, Any]:
        """The batches ``order[start:start + steps]`` of x and y: (steps, batch, ...)."""
        if self.on_device:                      # the slice and the gather in one dispatch
            return gather(self.x, self.y, order, start, steps)
        index = order[start:start + steps]
        if self.per_process:  # rows [i B/n, (i+1) B/n) of every batch; the mesh places them
            index = process_rows(np.asarray(index).T).T
            return self.x[index], self.y[index]
        return jax.device_put((self.x[index], self.y[index]))

    def chunks(self, key: PRNGKey, chunk: int):
        """Yield ``(xs, ys)``; the next chunk is already on its way while one is used."""
        full, tail = self._order(key)
        pieces = [(full, i, min(chunk, len(full) - i)) for i in range(0, len(full), chunk)]
        if tail is not None:
            pieces.append((tail[None], 0, 1))
        upcoming = self._take(*pieces[0]) if pieces else None
        for i in range(len(pieces)):
            current = upcoming
            if i + 1 < len(pieces):
                upcoming = self._take(*pieces[i + 1])
            yield current
@functools.partial(jax.jit, static_argnums=(1, 2))
def device_order(key: PRNGKey, n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """:func:`jaxbp.data.epoch_order` computed on the device: (full, tail) index arrays."""
    order = jax.random.permutation(key, n).astype(jnp.int32)
    n_full = n // batch_size
    return order[:n_full * batch_size].reshape(n_full, batch_size), order[n_full * batch_size:]


@functools.partial(jax.jit, static_argnums=4)
def gather(x: jax.Array, y: jax.Array, order: jax.Array, start: Any,
           steps: int) -> tuple[jax.Array, jax.Array]:
    """The rows of batches ``order[start:start + steps]`` ((steps, batch) indices) of x
    and y: (steps, batch, ...); one program per chunk length, whatever the start."""
    index = jax.lax.dynamic_slice_in_dim(order, start, steps)
    return x[index], y[index]


fold_in = jax.jit(jax.random.fold_in)
"""``jax.random.fold_in`` as one compiled call: the eager one dispatches the hash's
primitives one by one (about 60 us a call on a CPU, each epoch)."""


class PoissonFeed:
    """One epoch of Poisson-sampled batches (DP-SGD) as chunks of ``(xs, ys, masks)``.

    Each step takes every row independently with the sample rate, padded to
    ``max_batch`` with a mask (:func:`jaxbp.privacy.poisson_batches`). The draw is a
    pure function of the epoch's key, so a resumed run samples what it would have.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, rate: float, steps: int, max_batch: int,
                 per_process: bool = False):
        self.x, self.y, self.rate, self.steps, self.max_batch = x, y, rate, steps, max_batch
        self.overflow = 0
        self.on_device = False  # gathered on the host: the padded rows differ every step
        self.per_process = per_process  # a mesh run: host arrays, each process its own rows

    def chunks(self, key: PRNGKey, chunk: int):
        from jaxbp.privacy import poisson_batches

        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        index, masks, overflow = poisson_batches(np.random.default_rng(seed), len(self.x),
                                                 self.rate, self.steps, self.max_batch)
        self.overflow += overflow
        # P < 1e-12 per step by max_batch_size; said, never silent, and once: every process
        # drew the same batches, so process 0 speaks for all
        if overflow and jax.process_index() == 0:
            user_warnings.warn(f"{overflow} Poisson-sampled rows did not fit the padded batch of "
                               f"{self.max_batch} this epoch and were left out of their step",
                               RuntimeWarning)
        for i in range(0, self.steps, chunk):
            rows, mask = index[i:i + chunk], masks[i:i + chunk]
            if not self.per_process:
                yield jax.device_put((self.x[rows], self.y[rows], mask))
                continue
            # every process drew the same batches (the same key); it feeds its own rows of
            # each, the mesh places them (jaxbp.parallel.process_rows)
            rows, mask = process_rows(rows.T).T, process_rows(mask.T).T
            yield self.x[rows], self.y[rows], mask


def make_feed(net: Any, data: AnyDataset, dtype: Any, batch_size: int, drop_last: bool,
              mesh: Any, private: Any, steps_per_epoch: int
              ) -> tuple[EpochFeed | PoissonFeed, tuple[Any, Any]]:
    """The training feed and the test set ``(x, y)``, cast once to the params' ``dtype``.

    Integer tokens stay integers and class labels int32. Without a mesh, data up to
    :data:`DEVICE_DATA_BYTES` go to the device once (the test set with them); a private
    run (``private``: rate and padded batch) draws Poisson batches on the host (on a mesh,
    each process its own rows of each).
    """
    tokens = getattr(network.as_network(net), "input_dtype", None)
    x_train = np.asarray(data.x_train, tokens or dtype)
    labels = np.ndim(data.y_train) == value_checks.label_rank(net)
    y_train = np.asarray(data.y_train, np.int32 if labels else dtype)
    if private is not None:
        feed = PoissonFeed(x_train, y_train, private.rate, steps_per_epoch,
                           private.max_batch, per_process=mesh is not None)
    else:
        nbytes = sum(np.asarray(a).nbytes for a in data)
        feed = EpochFeed(x_train, y_train, batch_size, drop_last,
                         on_device=mesh is None and nbytes <= DEVICE_DATA_BYTES,
                         per_process=mesh is not None)
    test = (np.asarray(data.x_test, x_train.dtype), np.asarray(data.y_test, y_train.dtype))
    return feed, jax.device_put(test) if feed.on_device else test
