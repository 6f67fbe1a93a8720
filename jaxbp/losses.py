"""Losses C, each beside its hand-written output gradient dl/da.

Every loss is a sum over the output units of one sample, averaged over the
samples of a batch (the textbook's quadratic cost is ``squared_error``):

.. math::
    C = \\frac{1}{N} \\sum_{n=1}^{N} l(a_n, y_n)

A record holds the per-sample loss ``l`` and its gradient ``dl/da`` for one
sample (not divided by N); the batch-mean versions are derived from them
(:func:`mean_loss`, :func:`mean_loss_grad`). For the two cross-entropies ``a``
are logits and the gradient is the fused form (``p - y``), never the product of
the softmax Jacobian with ``dl/dp``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbp import record_checks
from jaxbp.types import Array


class Loss(NamedTuple):
    """A loss with its hand-written gradient with respect to the network output.

    Attributes:
      name: the registry name, e.g. ``"squared_error"``.
      sample_loss: ``(a, y) -> (batch,)``, the loss of each sample.
      sample_grad: ``(a, y) -> (batch, n_out)``, d l_n / d a_n for each sample.
      integer_labels: whether ``y`` may also be integer class labels ``(batch,)``.
      sample_loss_and_grad: ``(a, y) -> (losses, grads)`` computing both from
        shared intermediates (softmax: one exp for the loss and p), or None
        to call the two above.
      sample_hvp: ``(a, y, r) -> H_n r_n``, the per-sample Hessian of l with
        respect to a^L times r: (batch, n_out).
      sample_hessian_factor: ``(a, y) -> S`` of shape (batch, n_out, k) with
        ``H_n = S_n S_n^T`` (for the generalised Gauss-Newton).
      hits: ``(a, y) -> (batch,)`` float, each sample's correctness (the accuracy),
        or None for a loss that is no classification.
      sample_targets: ``(a, key) -> y`` drawn from the model's own predictive
        distribution at a (the Monte Carlo Fisher's targets).
      probability_targets: its float targets must lie in [0, 1] (else the loss can go
        negative); ``normalised_targets``: and each row must sum to 1.
    """

    name: str
    sample_loss: Callable[[Array, Array], Array]
    sample_grad: Callable[[Array, Array], Array]
    integer_labels: bool
    sample_loss_and_grad: Callable[[Array, Array], tuple[Array, Array]] | None = None
    sample_hvp: Callable[[Array, Array, Array], Array] | None = None
    sample_hessian_factor: Callable[[Array, Array], Array] | None = None
    hits: Callable[[Array, Array], Array] | None = None
    sample_targets: Callable[[Array, Array], Array] | None = None
    probability_targets: bool = False
    normalised_targets: bool = False

    @property
    def is_classification(self) -> bool:
        """Whether its metrics include an accuracy (it has ``hits``)."""
        return self.hits is not None


def _squared_error(a: Array, y: Array) -> Array:
    """l = sum_j (a_j - y_j)^2, the quadratic cost of one sample."""
    return jnp.sum((a - y) ** 2, axis=-1)


def _squared_error_grad(a: Array, y: Array) -> Array:
    """dl/da_j = 2 (a_j - y_j)."""
    return 2 * (a - y)


def _as_targets(a: Array, y: Array) -> Array:
    """y as (batch, classes) probabilities: integer labels become one-hot rows."""
    if y.ndim == 1:
        return jax.nn.one_hot(y, a.shape[-1], dtype=a.dtype)
    return y.astype(a.dtype)


def _softmax_cross_entropy(a: Array, y: Array) -> Array:
    """l = sum_j y_j (logsumexp(a) - a_j), stable for any logits."""
    y = _as_targets(a, y)
    # logsumexp(a) = m + log sum_j exp(a_j - m), m = max_j a_j: no overflow.
    log_z = jax.nn.logsumexp(a, axis=-1)
    return jnp.sum(y, axis=-1) * log_z - jnp.sum(y * a, axis=-1)


def _softmax_cross_entropy_grad(a: Array, y: Array) -> Array:
    """dl/da_k = p_k sum_j y_j - y_k, p = softmax(a); = p - y for one-hot y."""
    y = _as_targets(a, y)
    p = jax.nn.softmax(a, axis=-1)
    return p * jnp.sum(y, axis=-1, keepdims=True) - y


def _softmax_cross_entropy_and_grad(a: Array, y: Array) -> tuple[Array, Array]:
    """Both of the above from one pass: p = exp(a - logsumexp(a)) reuses the loss's lse."""
    y = _as_targets(a, y)
    log_z = jax.nn.logsumexp(a, axis=-1, keepdims=True)
    mass = jnp.sum(y, axis=-1, keepdims=True)
    losses = (mass * log_z - jnp.sum(y * a, axis=-1, keepdims=True))[:, 0]
    return losses, jnp.exp(a - log_z) * mass - y


def _sigmoid_cross_entropy(a: Array, y: Array) -> Array:
    """l = sum_j BCE(a_j, y_j) = sum_j softplus(a_j) - a_j y_j."""
    y = y.astype(a.dtype)
    # -y log sigma(a) - (1 - y) log(1 - sigma(a)) = log(1 + e^a) - a y, and
    # softplus(a) = logaddexp(a, 0) never overflows.
    return jnp.sum(jax.nn.softplus(a) - a * y, axis=-1)


def _sigmoid_cross_entropy_grad(a: Array, y: Array) -> Array:
    """dl/da_j = sigma(a_j) - y_j."""
    return jax.nn.sigmoid(a) - y.astype(a.dtype)


def _squared_error_hvp(a: Array, y: Array, r: Array) -> Array:
    """H = 2 I: H r = 2 r."""
    del a, y
    return 2 * r


def _squared_error_factor(a: Array, y: Array) -> Array:
    """S = sqrt(2) I, (batch, n_out, n_out)."""
    del y
    return jnp.broadcast_to(jnp.sqrt(2.0).astype(a.dtype) * jnp.eye(a.shape[-1], dtype=a.dtype),
                            (*a.shape, a.shape[-1]))


def _softmax_cross_entropy_hvp(a: Array, y: Array, r: Array) -> Array:
    """H = m (diag(p) - p p^T), m = sum_j y_j: H r = m (p * r - p <p, r>)."""
    y = _as_targets(a, y)
    p = jax.nn.softmax(a, axis=-1)
    mass = jnp.sum(y, axis=-1, keepdims=True)
    return mass * (p * r - p * jnp.sum(p * r, axis=-1, keepdims=True))


def _softmax_cross_entropy_factor(a: Array, y: Array) -> Array:
    """S = sqrt(m) (diag(sqrt p) - p sqrt(p)^T): S S^T = m (diag(p) - p p^T) as sum p = 1."""
    y = _as_targets(a, y)
    p = jax.nn.softmax(a, axis=-1)
    root = jnp.sqrt(p)
    mass = jnp.sum(y, axis=-1)[:, None, None]
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    return jnp.sqrt(mass) * (eye * root[:, None, :] - p[:, :, None] * root[:, None, :])


def _sigmoid_cross_entropy_hvp(a: Array, y: Array, r: Array) -> Array:
    """H = diag(sigma(a) (1 - sigma(a))): H r elementwise."""
    del y
    s = jax.nn.sigmoid(a)
    return s * (1 - s) * r


def _sigmoid_cross_entropy_factor(a: Array, y: Array) -> Array:
    """S = diag(sqrt(sigma (1 - sigma)))."""
    del y
    s = jax.nn.sigmoid(a)
    return jnp.sqrt(s * (1 - s))[:, :, None] * jnp.eye(a.shape[-1], dtype=a.dtype)


def _softmax_hits(a: Array, y: Array) -> Array:
    """argmax(a) == the label (labels, or the argmax of one-hot/probability rows)."""
    labels = y if y.ndim == a.ndim - 1 else jnp.argmax(y, axis=-1)
    return (jnp.argmax(a, axis=-1) == labels).astype(jnp.float32)


def _sigmoid_hits(a: Array, y: Array) -> Array:
    """The fraction of output units with ``(a > 0) == (y >= 1/2)``."""
    return jnp.mean((a > 0) == (y >= 0.5), axis=-1, dtype=jnp.float32)


def _softmax_targets(a: Array, key: Array) -> Array:
    """A class from softmax(a), one-hot."""
    return jax.nn.one_hot(jax.random.categorical(key, a, axis=-1), a.shape[-1], dtype=a.dtype)


def _sigmoid_targets(a: Array, key: Array) -> Array:
    """Bernoulli(sigmoid(a)) per unit."""
    return jax.random.bernoulli(key, jax.nn.sigmoid(a)).astype(a.dtype)


def _squared_error_targets(a: Array, key: Array) -> Array:
    """``sum (a - y)^2`` is the negative log-likelihood of N(a, 1/2): y = a + N(0, 1/2)."""
    return a + jnp.sqrt(0.5).astype(a.dtype) * jax.random.normal(key, a.shape, a.dtype)


LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("squared_error", _squared_error, _squared_error_grad, integer_labels=False,
             sample_hvp=_squared_error_hvp, sample_hessian_factor=_squared_error_factor,
             sample_targets=_squared_error_targets),
        Loss("softmax_cross_entropy", _softmax_cross_entropy, _softmax_cross_entropy_grad,
             integer_labels=True, sample_loss_and_grad=_softmax_cross_entropy_and_grad,
             sample_hvp=_softmax_cross_entropy_hvp,
             sample_hessian_factor=_softmax_cross_entropy_factor, hits=_softmax_hits,
             sample_targets=_softmax_targets, probability_targets=True,
             normalised_targets=True),
        Loss("sigmoid_cross_entropy", _sigmoid_cross_entropy, _sigmoid_cross_entropy_grad,
             integer_labels=False, sample_hvp=_sigmoid_cross_entropy_hvp,
             sample_hessian_factor=_sigmoid_cross_entropy_factor, hits=_sigmoid_hits,
             sample_targets=_sigmoid_targets, probability_targets=True),
    )
}
"""Every loss by name, the built-ins and those added by :func:`register`; ``MLP`` and
``Network`` accept exactly these keys."""

_BUILT_IN = frozenset(LOSSES)


def register(loss: Loss, *, check: bool = True) -> Loss:
    """Add a user's loss to :data:`LOSSES`: every network, train step and per-example
    quantity takes it by its name, like a built-in.

    Its ``sample_grad`` (``dl_n/da_n``, the output error) is the user's, by hand, and so
    are the optional ``sample_loss_and_grad``, ``sample_hvp`` and
    ``sample_hessian_factor``. With ``check`` (the default) each is compared, before any
    network uses it, with jax.grad, jax.jvp and jax.hessian of ``sample_loss`` in float64
    (:mod:`jaxbp.record_checks`). What needs a missing optional part says so by name:
    ``ggn_diag`` and ``kfac_factors(kind="exact")`` the Hessian factor, sampled K-FAC
    ``sample_targets``; without ``hits`` there is no accuracy.

    A name is registered once per process; built-ins cannot be replaced.

    Raises:
      TypeError: not a :class:`Loss`, a part that is not a function (or None where
        optional), or a flag that is not a bool.
      ValueError: the name is empty or taken, or a derivative differs from jax's.
    """
    if not isinstance(loss, Loss):
        raise TypeError(f"loss must be a jaxbp.losses.Loss(name, sample_loss, sample_grad, "
                        f"integer_labels, ...), got {type(loss).__name__}")
    record_checks.check_fields(
        "loss", loss.name, loss, ("sample_loss", "sample_grad"),
        ("sample_loss_and_grad", "sample_hvp", "sample_hessian_factor", "hits",
         "sample_targets"), ("integer_labels", "probability_targets", "normalised_targets"))
    record_checks.check_unregistered("loss", loss.name, LOSSES, _BUILT_IN)
    if check:
        record_checks.check_loss(loss)
    LOSSES[loss.name] = loss
    return loss


def get_loss(name: str) -> Loss:
    """The registered loss called ``name``.

    Raises:
      ValueError: ``name`` is not one of :data:`LOSSES`.
    """
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown loss {name!r}. It needs to be one of {sorted(LOSSES)} (one of your "
            f"own, with its gradient: jaxbp.losses.register)."
        ) from None


def tokens(a: Array, y: Array) -> tuple[Array, Array, Array | None]:
    """``(rows, targets, valid)``: the outputs as (M, n_out) rows, one per sample or, for
    sequences (batch, T, n_out), per token; valid (M,) bool where integer targets of -1
    mark ignored tokens (padding), else None (every row counts)."""
    if a.ndim == 2:
        return a, y, None
    rows = a.reshape(-1, a.shape[-1])
    if y.ndim == a.ndim - 1:                                  # integer labels (batch, T)
        labels = y.reshape(-1)
        valid = labels >= 0
        return rows, jnp.where(valid, labels, 0), valid
    return rows, y.reshape(-1, y.shape[-1]), None


def _count(rows: Array, valid: Array | None) -> Array | int:
    """How many rows the mean is over: all, or the valid ones (at least 1)."""
    return rows.shape[0] if valid is None else jnp.maximum(jnp.sum(valid), 1).astype(rows.dtype)


def counted(a: Array, y: Array) -> Array | int:
    """M, how many rows the cost C averages: the samples, or the counted tokens of
    sequences (targets of -1 are not counted; at least 1)."""
    rows, _, valid = tokens(a, y)
    return _count(rows, valid)


def token_hessian_columns(loss: Loss, a: Array, y: Array) -> Array:
    """``(T k, batch, T, n_out)``: the loss Hessian's factor of every token, each column
    an output error at one position only (zero at the other T - 1 and at ignored tokens).

    For sequences the GGN is ``(1/M) sum_{n,t} J_{n,t}^T S_{n,t} S_{n,t}^T J_{n,t}``: the
    tokens of one sample share its parameters' Jacobian only through attention, so each
    token's columns go back alone (column ``(t, c)`` is ``S_{n,t}[:, c]`` at position t of
    every sample n, which the per-sample gradients then keep apart).
    """
    rows, targets, valid = tokens(a, y)
    factor = loss.sample_hessian_factor(rows, targets)                  # (B T, n_out, k)
    if valid is not None:
        factor = jnp.where(valid[:, None, None], factor, 0)
    batch, length, n_out = a.shape
    factor = factor.reshape(batch, length, n_out, -1)
    columns = jnp.einsum("tu,bunk->tkbun", jnp.eye(length, dtype=factor.dtype), factor)
    return columns.reshape(-1, batch, length, n_out)


def mean_loss(loss: Loss, a: Array, y: Array) -> Array:
    """C, the mean of the loss over the samples (over the tokens of sequences), a scalar.

    Args:
      loss: the loss record.
      a: (batch, n_out) network outputs (logits for the cross-entropies), or
        (batch, T, n_out) for sequences.
      y: (batch, n_out) targets, or (batch,) integer labels where allowed; for
        sequences (batch, T, n_out) or (batch, T) labels, -1 where a token is
        ignored (counted nowhere: C is the mean over the other tokens).
    """
    rows, targets, valid = tokens(a, y)
    losses = loss.sample_loss(rows, targets)
    if valid is None:
        return jnp.mean(losses)
    return jnp.sum(jnp.where(valid, losses, 0)) / _count(rows, valid)


def cost_and_output_error(loss: Loss, a: Array, y: Array) -> tuple[Array, Array]:
    """``(C, dC/da)``: the mean loss and the output error of the reversed loop, one pass.

    ``dC/da_m = dl_m/da_m / M`` over the M rows (samples, or valid tokens: an ignored
    token's error is 0), the fused softmax form where the loss has it.
    """
    rows, targets, valid = tokens(a, y)
    losses, grads = sample_loss_and_grad(loss, rows, targets)
    if valid is not None:
        losses = jnp.where(valid, losses, 0)
        grads = jnp.where(valid[:, None], grads, 0)
    count = _count(rows, valid)
    return jnp.sum(losses) / count, (grads / count).reshape(a.shape)


def per_sample_losses_and_errors(loss: Loss, a: Array, y: Array) -> tuple[Array, Array]:
    """``(l_i (batch,), dl_i/da_i)``: each sample's own loss and its error at the output, not
    divided by the batch (what per-example gradients, clipping and DP-SGD differentiate).

    For vector outputs ``l_i`` is the loss of sample i. For sequences (batch, T, n_out)

    .. math:: l_i = \\frac{1}{T} \\sum_{t\\ \\mathrm{counted}} l_{i,t}

    with T the sequence length: an ignored token (target -1) adds nothing but still
    counts in T, so ``l_i`` depends on sample i alone (the per-sample sensitivity DP-SGD's
    accounting assumes). Without ignored tokens ``mean_i l_i`` is the cost C; with them C
    divides by the number of counted tokens M instead, ``mean_i l_i = (M / (B T)) C``.
    """
    rows, targets, valid = tokens(a, y)
    losses, grads = sample_loss_and_grad(loss, rows, targets)
    if a.ndim == 2:
        return losses, grads
    if valid is not None:
        losses = jnp.where(valid, losses, 0)
        grads = jnp.where(valid[:, None], grads, 0)
    length = a.shape[1]
    return (jnp.sum(losses.reshape(a.shape[0], -1), axis=1) / length,
            (grads / length).reshape(a.shape))


def sample_sums(loss: Loss, a: Array, y: Array) -> tuple[Array, Array | None, Array]:
    """Per sample ``(loss sum, hit sum or None, count)``, each (batch,) float32: for vector
    outputs ``(l_n, hits_n, 1)``; for sequences the sums over the sample's counted tokens
    (targets not -1) and how many there are. Means over a data set are ratios of sums."""
    rows, targets, valid = tokens(a, y)
    losses = loss.sample_loss(rows, targets).astype(jnp.float32)
    hits = None if loss.hits is None else loss.hits(rows, targets)
    weight = jnp.ones_like(losses) if valid is None else valid.astype(jnp.float32)
    batch = a.shape[0]

    def per_sample(values: Array) -> Array:
        return jnp.sum((values * weight).reshape(batch, -1), axis=1)

    return (per_sample(losses), None if hits is None else per_sample(hits),
            per_sample(jnp.ones_like(losses)))


def sample_loss_and_grad(loss: Loss, a: Array, y: Array) -> tuple[Array, Array]:
    """``(l_n, dl_n/da_n)`` for every sample, fused where the loss has a fused form."""
    if loss.sample_loss_and_grad is not None:
        return loss.sample_loss_and_grad(a, y)
    return loss.sample_loss(a, y), loss.sample_grad(a, y)


def mean_loss_grad(loss: Loss, a: Array, y: Array) -> Array:
    """dC/da = (1/N) dl/da, shape (batch, n_out)."""
    return loss.sample_grad(a, y) / a.shape[0]
