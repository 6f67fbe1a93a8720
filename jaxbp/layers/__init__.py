"""Layer records for :class:`jaxbp.Network`: each a forward beside its hand-written backward.

``Dense``, ``Conv2D``, ``MaxPool``, ``AvgPool``, ``Flatten``, ``LayerNorm``,
``Residual``; :data:`LAYER_TYPES` is the registry. See :mod:`jaxbp.layers.base`
for what every record provides.
"""

from jaxbp.layers.base import LAYER_TYPES, LayerError, register
from jaxbp.layers.conv import Conv2D
from jaxbp.layers.dense import Dense
from jaxbp.layers.flatten import Flatten
from jaxbp.layers.layernorm import LayerNorm
from jaxbp.layers.pool import AvgPool, MaxPool
from jaxbp.layers.residual import Residual

__all__ = [
    "LAYER_TYPES",
    "AvgPool",
    "Conv2D",
    "Dense",
    "Flatten",
    "LayerError",
    "LayerNorm",
    "MaxPool",
    "Residual",
    "register",
]
