"""jaxbp: hand-written backpropagation in JAX, for MLPs and any chain of layers."""

from jaxbp import data, feedback, layers, models, privacy, sources, testing
from jaxbp.activations import ACTIVATIONS, Activation
from jaxbp.autodiff import value_and_autodiff
from jaxbp.backprop import (
    apply_with_manual_vjp,
    backprop,
    layer_deltas,
    value_and_backprop,
)
from jaxbp.check.layer import verify_layer
from jaxbp.check.suite import verify_mlp
from jaxbp.check.verify import GradientCheckError, GradReport, verify_grads
from jaxbp.check.verify_fn import verify_jvp, verify_vjp
from jaxbp.curvature import ggn_diag, hvp, kfac_factors, kfac_gradient, kfac_preconditioner
from jaxbp.diagnostics import layer_stats
from jaxbp.grad_variance import per_example_grad_variance
from jaxbp.losses import LOSSES, Loss
from jaxbp.mlp import MLP
from jaxbp.network import Network
from jaxbp.per_example import (
    clipped_grad,
    clipped_gradient,
    dp_sgd_grad,
    dp_sgd_gradient,
    per_example_grad_norms,
    per_example_grads,
)
from jaxbp.train import checkpoint
from jaxbp.train.fit import FitResult, fit
from jaxbp.train.resume import load_params
from jaxbp.train.step import TrainState, evaluate, make_train_loop, make_train_step

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "MLP",
    "Activation",
    "FitResult",
    "GradReport",
    "GradientCheckError",
    "Loss",
    "Network",
    "TrainState",
    "apply_with_manual_vjp",
    "backprop",
    "checkpoint",
    "clipped_grad",
    "clipped_gradient",
    "data",
    "dp_sgd_grad",
    "dp_sgd_gradient",
    "evaluate",
    "feedback",
    "fit",
    "ggn_diag",
    "hvp",
    "kfac_factors",
    "kfac_gradient",
    "kfac_preconditioner",
    "layer_deltas",
    "layer_stats",
    "layers",
    "load_params",
    "make_train_loop",
    "make_train_step",
    "models",
    "per_example_grad_norms",
    "per_example_grad_variance",
    "per_example_grads",
    "privacy",
    "sources",
    "testing",
    "value_and_autodiff",
    "value_and_backprop",
    "verify_grads",
    "verify_jvp",
    "verify_layer",
    "verify_mlp",
    "verify_vjp",
]
