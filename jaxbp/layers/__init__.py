"""Layer records for :class:`jaxbp.Network`: each a forward beside its hand-written backward.

``Dense``, ``Conv2D``, ``MaxPool``, ``AvgPool``, ``Flatten``, ``LayerNorm``,
``RMSNorm``, ``Residual``, ``GatedDense``, ``Dropout``, and for sequences ``Embedding`` and
``SelfAttention``;
:data:`LAYER_TYPES` is the registry. See :mod:`jaxbp.layers.base`
for what every record provides.
"""

from jaxbp.layers.attention import SelfAttention
from jaxbp.layers.base import LAYER_TYPES, LayerError, LayerRecord, capability, register
from jaxbp.layers.conv import Conv2D
from jaxbp.layers.dense import Dense
from jaxbp.layers.dropout import Dropout
from jaxbp.layers.embedding import Embedding
from jaxbp.layers.flatten import Flatten
from jaxbp.layers.gated import GatedDense
from jaxbp.layers.layernorm import LayerNorm
from jaxbp.layers.pool import AvgPool, MaxPool
from jaxbp.layers.residual import Residual
from jaxbp.layers.rmsnorm import RMSNorm

__all__ = [
    "LAYER_TYPES",
    "AvgPool",
    "Conv2D",
    "Dense",
    "Dropout",
    "Embedding",
    "Flatten",
    "GatedDense",
    "LayerError",
    "LayerNorm",
    "LayerRecord",
    "MaxPool",
    "RMSNorm",
    "Residual",
    "SelfAttention",
    "capability",
    "register",
]
