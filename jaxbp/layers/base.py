"""What every layer record provides, the registry, and the pieces the records share.

A layer maps the error at its output to the error at its input,
``delta_in = J^T delta_out``, and reads its parameter gradient from its input
and that error. Each record (one frozen, hashable dataclass per layer type)
holds, written by hand from lax primitives:

* ``output_shape(in_shape)``: the shape of one sample's output (checks it);
* ``init(key, in_shape, dtype)``: its parameters (``{}`` when it has none);
* ``forward(params, x) -> (out, cache)``: the output and what the backward keeps;
* ``backward(params, cache, delta_out, need_input) -> (delta_in, grads)``: the
  error at its input (None when ``need_input`` is False: the first layer) and
  the gradient of its parameters for the batch (``delta_out`` already holds
  the 1/N of the mean cost);
* ``per_sample_grads(params, cache, delta_out)``: the same gradient for every
  sample apart, a leading batch axis (never by autodiff);
* ``per_sample_sq_norms(params, cache, delta_out)``: ``(batch,)`` squared norms.

Shapes are one sample's (no batch axis); arrays carry the batch first.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxbp._typing import Array

Shape = tuple[int, ...]

LAYER_TYPES: dict[str, type] = {}
"""Every layer record type by name (``Dense``, ``Conv2D``, ...)."""


def register(cls: type) -> type:
    """Class decorator: add a layer record type to :data:`LAYER_TYPES`."""
    LAYER_TYPES[cls.__name__] = cls
    return cls


class LayerError(ValueError):
    """A layer that does not fit where it stands in a network (names its index and type)."""


def fail(where: str, message: str) -> LayerError:
    """A :class:`LayerError` whose message starts with the layer's place, ``layers[2] (Dense)``."""
    return LayerError(f"{where}: {message}")


def variance_init(key: Array, shape: Shape, fan_in: int, fan_out: int, he: bool,
                  dtype: Any) -> Array:
    """Truncated-normal weights: He ``2/fan_in`` or Glorot ``2/(fan_in + fan_out)`` variance.

    The same scheme as :meth:`jaxbp.MLP.init` (normals truncated at two standard
    deviations, rescaled to the variance), per layer.
    """
    from jaxbp.mlp import _TRUNCATED_NORMAL_STD

    variance = 2.0 / fan_in if he else 2.0 / (fan_in + fan_out)
    unit = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    return (unit / _TRUNCATED_NORMAL_STD * math.sqrt(variance)).astype(dtype)
