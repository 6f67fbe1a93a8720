"""jaxbp: hand-written backpropagation for multi-layer perceptrons in JAX."""

from jaxbp.activations import ACTIVATIONS, Activation
from jaxbp.autodiff import value_and_autodiff
from jaxbp.backprop import (
    apply_with_manual_vjp,
    backprop,
    grads_from_deltas,
    layer_deltas,
    output_delta,
    value_and_backprop,
)
from jaxbp.losses import LOSSES, Loss
from jaxbp.mlp import MLP, Cache, forward
from jaxbp.verify import GradientCheckError, GradReport, verify_grads

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "MLP",
    "Activation",
    "Cache",
    "GradReport",
    "GradientCheckError",
    "Loss",
    "apply_with_manual_vjp",
    "backprop",
    "forward",
    "grads_from_deltas",
    "layer_deltas",
    "output_delta",
    "value_and_autodiff",
    "value_and_backprop",
    "verify_grads",
]
