"""Type aliases shared by every module (one place, as the house style asks)."""

from typing import Any, TypeAlias

import jax

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
Layer: TypeAlias = dict[str, Array]
"""One dense layer's parameters: ``{"w": (fan_in, fan_out), "b": (fan_out,)}``."""
Params: TypeAlias = tuple[Layer, ...]
"""An MLP's parameters, one :data:`Layer` per weight layer, input side first."""
PyTree: TypeAlias = Any
PRNGKey: TypeAlias = jax.Array
