"""verify_layer: a record's hand-written rules against jax.vjp of its own forward, every
built-in record passing in float64, and a user's record with planted bugs failing on the
rule that holds the bug, and only there."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp import layers as L
from jaxbp.testing import assert_layer_correct


def _x(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape)


@pytest.mark.slow
def test_every_built_in_record_passes_in_float64(x64):
    records = (
        (L.Dense(5, "tanh"), _x(3, 4)),
        (L.Dense(5, "gelu"), _x(2, 3, 4)),                  # token-wise
        (L.Dense(5, "tanh", bias=False), _x(3, 4)),         # its rules on W alone
        (L.SelfAttention(2, rope=True, kv_heads=1, bias=False), _x(2, 5, 4)),
        (L.Conv2D(3, (3, 3), stride=2, padding="VALID", activation="relu"), _x(2, 7, 7, 2)),
        (L.AvgPool((2, 2)), _x(2, 4, 4, 2)),
        (L.RMSNorm(), _x(2, 3, 5)),
        (L.SelfAttention(2), _x(2, 5, 4)),
        (L.SelfAttention(2, causal=False, block=2, rope=True), _x(2, 5, 4)),
        (L.GatedDense(3), _x(2, 4, 5)),
        (L.GatedDense(3, "gelu"), _x(3, 4)),
        (L.Embedding(7, 4, positions=6), np.arange(10).reshape(2, 5) % 7),
        (L.Residual((L.LayerNorm(), L.Dense(4, "relu"), L.Dense(4))), _x(3, 4)),
    )
    for layer, x in records:
        report = assert_layer_correct(layer, x, n_fd=1)
        rows = {row.path.split("[")[0].split(":")[0] for row in report.leaves}
        if "no parameters: no per-sample rule to check" not in report.notes:
            assert {"per_sample_grads", "per_sample_sq_norms"} <= rows, (layer, rows)
    attention = jaxbp.verify_layer(L.SelfAttention(2), _x(2, 5, 4))
    assert {"per_sample_sq_norms_and_sum: sum['wq']", "backward_kept: grads['wo']",
            "backward: input error", "backward: grads['wq']"} <= {
        row.path for row in attention.leaves}
    assert "sq_grad_sum: not defined by the record, not checked" in attention.notes
    assert {"feedback: input error under feedback_of", "feedback: grads under feedback_of"
            "['wq']"} <= {row.path for row in attention.leaves}     # its four projections
    conv = jaxbp.verify_layer(L.Conv2D(3, (2, 3), stride=2, padding="VALID"),
                              _x(2, 7, 7, 2), n_fd=1)        # its patches, channel first
    assert {"kfac: input rows^T errors['w']", "kfac: input rows^T errors['b']"} <= {
        row.path for row in conv.leaves} and conv.ok
    pool = jaxbp.verify_layer(L.MaxPool((2, 2)), _x(2, 4, 4, 1))
    assert pool.ok and "no parameters: no per-sample rule to check" in pool.notes


@dataclasses.dataclass(frozen=True)
class Scale:
    """A user's record, ``a = s x`` per feature, with a bug planted by name."""

    bug: str = ""

    def output_shape(self, in_shape):
        return in_shape

    def init(self, key, in_shape, dtype):
        return {"s": jnp.linspace(0.5, 1.5, in_shape[-1], dtype=dtype)}

    def forward(self, params, x):
        return x * params["s"], x

    def backward(self, params, x, delta, need_input=True):
        grads = {"s": jnp.sum(delta * x, axis=0) * (2 if self.bug == "grads" else 1)}
        error = delta * (params["s"] if self.bug != "input error" else 1.0)
        return (error if need_input else None), grads

    def per_sample_grads(self, params, x, delta):
        return {"s": delta * x + (x if self.bug == "per_sample_grads" else 0)}

    def per_sample_sq_norms(self, params, x, delta):
        norms = jnp.sum((delta * x) ** 2, axis=1)
        return jnp.sqrt(norms) if self.bug == "per_sample_sq_norms" else norms

    def feedback_shape(self, in_shape):         # a feedback b in the place of s
        return (in_shape[-1],)

    def feedback_of(self, params, in_shape):
        return params["s"] * (2 if self.bug == "feedback_of" else 1)

    def feedback_params(self, params, feedback):
        return {**params, "s": feedback}


@pytest.mark.parametrize("bug, failing", [
    ("input error", {"backward: input error"}),
    ("grads", {"backward: grads['s']"}),
    ("per_sample_grads", {"per_sample_grads['s']"}),
    ("per_sample_sq_norms", {"per_sample_sq_norms"}),
    ("feedback_of", {"feedback: input error under feedback_of"}),
])
def test_a_planted_bug_fails_its_own_rule_only(x64, bug, failing):
    x = _x(4, 3)
    assert jaxbp.verify_layer(Scale(), x).ok
    report = jaxbp.verify_layer(Scale(bug), x)
    assert report.verdict == "FAILED"
    assert {row.path for row in report.leaves if not row.ok} == failing, report
    if bug in ("input error", "grads"):      # FD along random directions refutes it too
        assert any(d.fd_status == "FAIL" for d in report.directions)
    with pytest.raises(jaxbp.GradientCheckError, match=r"verify_layer \(Scale\): FAILED"):
        assert_layer_correct(Scale(bug), x)


@dataclasses.dataclass(frozen=True)
class ShuffledRows(L.Dense):
    """A Dense whose K-FAC input rows come in another order than its errors' (a layout
    slip K-FAC would not notice: it would precondition with the wrong Kronecker factor)."""

    def kfac_inputs(self, cache):
        rows, positions = super().kfac_inputs(cache)
        return rows[::-1], positions


def test_kfac_rows_out_of_order_fail_their_own_row(x64):
    report = jaxbp.verify_layer(ShuffledRows(3, "tanh"), _x(4, 3))
    assert {row.path for row in report.leaves if not row.ok} == {
        "kfac: input rows^T errors['w']"}, report
    assert jaxbp.verify_layer(L.Dense(3, "tanh"), _x(4, 3)).ok


class Misshapen(Scale):
    """Scale whose rules return what the chain cannot read, by ``bug``."""

    def backward(self, params, x, delta, need_input=True):
        error, grads = super().backward(params, x, delta, need_input)
        return {"tuple": lambda: grads, "grads key": lambda: (error, {"t": grads["s"]}),
                "input error": lambda: (error[:, :1], grads)}.get(self.bug,
                                                                  lambda: (error, grads))()

    def per_sample_sq_norms(self, params, x, delta):
        norms = super().per_sample_sq_norms(params, x, delta)
        return norms.sum() if self.bug == "norms" else norms

    def feedback_shape(self, in_shape):
        return (in_shape[-1] + (self.bug == "feedback shape"),)


@pytest.mark.parametrize("bug, error, words", [
    ("tuple", TypeError, r"the record's backward must return a tuple of 2 \(delta_in, "
                         r"grads\), got dict"),
    ("grads key", ValueError, r"the record's backward's grads has the structure "
                              r"PyTreeDef\(\{'t': \*\}\), expected PyTreeDef\(\{'s': \*\}\)"),
    ("input error", ValueError, r"the record's backward's input error has shape \(4, 1\), "
                                r"expected \(4, 3\)"),
    ("norms", ValueError, r"the record's per_sample_sq_norms has shape \(\), expected "
                          r"\(4,\)"),
    ("feedback shape", ValueError, r"the record's feedback_of has shape \(3,\), expected "
                                   r"\(4,\)"),
])
def test_rules_that_return_the_wrong_shapes_are_named(bug, error, words):
    """Were JAX's "Custom VJP bwd rule must produce an output with the same container",
    an unpacking error, or an IndexError from the comparison."""
    with pytest.raises(error, match=words):
        jaxbp.verify_layer(Misshapen(bug), _x(4, 3))


def test_float32_and_its_tolerance():
    report = jaxbp.verify_layer(L.Dense(6, "tanh"), _x(5, 4).astype(np.float32))
    assert report.ok and report.rtol["float32"] > 1e-7, report


def test_bad_arguments_are_named():
    class Wide(Scale):
        def output_shape(self, in_shape):
            return (in_shape[0] + 1,)

    class Bare(Scale):                          # the output without its cache
        def forward(self, params, x):
            return x * params["s"]

    for call, error, words in (
            (lambda: jaxbp.verify_layer(L.Dense(3), None), TypeError, "x must be a numeric "
                                                                      "array, got NoneType"),
            (lambda: jaxbp.verify_layer(L.Dense(3), np.ones((0, 4))), ValueError,
             r"x must be a batch \(batch, \*in_shape\) with at least one sample, got shape "
             r"\(0, 4\)"),
            (lambda: jaxbp.verify_layer("Dense", np.ones((2, 4))), TypeError,
             r"layer must be a layer record .* got str without output_shape, init, forward, "
             r"backward"),
            (lambda: jaxbp.verify_layer(Bare(), np.ones((2, 4))), TypeError,
             r"the record's forward must return a tuple \(output, cache\), got ArrayImpl"),
            (lambda: jaxbp.verify_layer(Wide(), np.ones((2, 4))), ValueError,
             r"layer.output_shape\(\(4,\)\) is \(5,\), but its forward gives samples of "
             r"shape \(4,\)"),
            (lambda: jaxbp.verify_layer(L.Dense(3), np.ones((2, 4)), n_fd=-1), ValueError,
             "n_fd must be")):
        with pytest.raises(error, match=words):
            call()
