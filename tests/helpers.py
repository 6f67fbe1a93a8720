"""Shared test helpers: the per-dtype tolerances (loosened here only, with the reason)."""

from __future__ import annotations

import jax
import numpy as np

# Manual vs jax.grad, normwise relative error per leaf: max|m - r| / max|r|.
# float64/float32: the targets (1e-12, 1e-5), about 1e4 and 100x eps.
# bfloat16 (eps 7.8e-3): the two gradients round differently at every step; a
# leaf that is small because its batch sum cancels keeps the error of the terms,
# so bf16 is measured against the largest entry of the whole gradient (1e-2),
# and only on small nets: deep bf16 nets are checked against the float64 truth
# instead (test_backprop.py::test_bfloat16_*).
RTOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-2}


def to_f64(tree):
    """A pytree of host float64 arrays."""
    return jax.tree.map(lambda a: np.asarray(a).astype(np.float64), tree)


def leaf_rel_errors(manual, reference):
    """Per leaf max|m - r| / max|r| (0 when both are exactly 0)."""
    errors = []
    for m, r in zip(jax.tree.leaves(to_f64(manual)), jax.tree.leaves(to_f64(reference))):
        err = np.max(np.abs(m - r), initial=0.0)
        scale = np.max(np.abs(r), initial=0.0)
        errors.append(0.0 if err == 0 else err / scale if scale > 0 else np.inf)
    return errors


def global_rel_error(manual, reference):
    """max over all leaves of |m - r| divided by the largest |r| of the whole gradient."""
    m_leaves = jax.tree.leaves(to_f64(manual))
    r_leaves = jax.tree.leaves(to_f64(reference))
    err = max(np.max(np.abs(m - r), initial=0.0) for m, r in zip(m_leaves, r_leaves))
    scale = max(np.max(np.abs(r), initial=0.0) for r in r_leaves)
    return 0.0 if err == 0 else err / scale


def assert_trees_close(manual, reference, dtype):
    """Manual vs reference within RTOL[dtype] (per leaf; bf16 against the global scale)."""
    assert jax.tree.structure(manual) == jax.tree.structure(reference)
    if dtype == "bfloat16":
        err = global_rel_error(manual, reference)
        assert err <= RTOL[dtype], f"bfloat16 global relative error {err:.3e}"
        return
    errors = leaf_rel_errors(manual, reference)
    assert max(errors) <= RTOL[dtype], f"{dtype} per-leaf relative errors {errors}"


def assert_no_less_accurate(manual, autodiff, truth, dtype):
    """Manual within RTOL[dtype] of the float64 truth, or, where the chain is
    ill-conditioned, no further from it than twice jax.grad's own error in that dtype;
    errors normwise over the whole gradient (:func:`global_rel_error`).

    Why twice jax.grad's: a LayerNorm over 2 features with 1/std = 18 amplifies float32
    rounding about 100-fold; there jax.grad is 3e-5 off the truth while the manual
    gradient is 3e-6 off, so manual vs jax.grad fails a 1e-5 test that manual vs the truth
    passes. Why normwise: each leaf is checked against jax.grad in float64 (1e-10); in
    float32 a one-element leaf (a conv bias: a sum over batch and positions that cancels)
    carries the rounding of whichever summation order the platform picks (on an H200 with
    cuDNN, 2.6e-5 off for the manual step and 1.3e-5 for jax.grad's on one case).
    """
    manual_error = global_rel_error(manual, truth)
    autodiff_error = global_rel_error(autodiff, truth)
    assert manual_error <= max(RTOL[dtype], 2 * autodiff_error), (
        f"{dtype}: manual {manual_error:.2e} off the float64 truth, jax.grad {autodiff_error:.2e}")


def random_inputs(rng, loss, batch, sample_shape, n_out, dtype, integer_labels):
    """NumPy-drawn x (batch, *sample_shape) and y for a loss: normal targets for squared
    error, 0/1 for sigmoid CE, labels or one-hot rows for softmax CE."""
    import jax.numpy as jnp

    x = jnp.asarray(rng.standard_normal((batch, *sample_shape)), dtype)
    labels = rng.integers(0, n_out, size=batch)
    if loss == "squared_error":
        y = jnp.asarray(rng.standard_normal((batch, n_out)), dtype)
    elif loss == "sigmoid_cross_entropy":
        y = jnp.asarray(rng.random((batch, n_out)) < 0.5, dtype)
    elif integer_labels:
        y = jnp.asarray(labels, jnp.int32)
    else:
        y = jnp.asarray(np.eye(n_out)[labels], dtype)
    return x, y


AUTODIFF = ("grad", "value_and_grad", "vjp", "jvp", "jacrev", "jacfwd", "linearize", "hessian",
            "linear_transpose")


def forbid_autodiff(monkeypatch):
    """Make every autodiff entry point of jax raise, and drop compiled caches, so a
    hand-written path that still runs provably calls none of them."""
    import jax

    def forbidden(*args, **kwargs):
        raise AssertionError("the manual path called jax autodiff")

    for name in AUTODIFF:
        monkeypatch.setattr(jax, name, forbidden)
    jax.clear_caches()  # nothing compiled before the patch may answer for the manual path


def jaxpr_equations(fn, *args, primitive):
    """Every equation of ``primitive`` (a name, e.g. ``"dot_general"``) in the jaxpr of
    ``fn(*args)``, sub-jaxprs (jit, scan, cond, custom rules) included."""
    import jax.extend as jex  # noqa: F401  (the core types below live in jax.core)

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == primitive:
                found.append(eqn)
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def lowered_ops(fn, *args, platform, ops):
    """fn(*args) lowered for ``platform`` ("cpu", "cuda", "tpu": no such device needed)
    as StableHLO: its ``stablehlo.<op>`` lines for each op in ``ops``, SSA names dropped,
    as ``(op, attributes, operand types, result type)``. What runs there: a
    ``lax.platform_dependent`` choice is made in the lowering."""
    import re

    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    found = []
    for line in text.splitlines():
        match = re.search(r"stablehlo\.(\w+)(.*) : \((.*)\) -> (.*)$", line)
        if match and match.group(1) in ops:
            name, attributes, operands, result = match.groups()
            attributes = re.sub(r"%[\w#]+", "", attributes)
            found.append((name, attributes.strip(" (),"), operands.split(", "), result))
    return found


def assert_normwise_close(actual, desired, rtol, atol=0.0, err_msg=""):
    """``max|actual - desired| <= atol + rtol * max|desired|``: the error against the
    array's scale. For results that are sums of products (gradients, factors, Grams): an
    entry that is small because its terms cancel keeps the rounding of the terms, and a
    GPU's summation order moves it by more than an elementwise rtol of 1e-12 allows
    (measured on an H200: 1.6e-12 on an entry 1e-4 of the largest)."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
    err = np.max(np.abs(actual - desired), initial=0.0)
    scale = np.max(np.abs(desired), initial=0.0)
    assert err <= atol + rtol * scale, (f"normwise error {err:.3e} > {atol:.1e} + {rtol:.1e} "
                                        f"x {scale:.3e} {err_msg}")


def assert_leaves_close(actual, desired, rtol, atol=0.0, err_msg=""):
    """:func:`assert_normwise_close` leaf by leaf over two pytrees of the same structure."""
    actual, desired = jax.tree.leaves(actual), jax.tree.leaves(desired)
    assert len(actual) == len(desired), (len(actual), len(desired))
    for i, (a, d) in enumerate(zip(actual, desired)):
        assert_normwise_close(a, d, rtol, atol, err_msg=f"{err_msg} (leaf {i})")


def transformer_case(i: int, dtype: str):
    """Random transformer chain i of the suite, its params moved away from init (zero
    biases, unit scales) so that every term of the backward shows, and its tokens."""
    import jax
    import jax.numpy as jnp

    from jaxbp.check.suite import random_tokens, random_transformer

    net, batch = random_transformer(i, dtype)
    x, y = random_tokens(np.random.default_rng(i), net, batch)
    params = net.init(jax.random.key(i))
    params = jax.tree.map(lambda a: a + jnp.asarray(
        0.1 * np.random.default_rng(i + 1).standard_normal(a.shape), a.dtype), params)
    return net, params, jnp.asarray(x), jnp.asarray(y)


def _kfac_views(factors, grads):
    """(block, the gradient it acts on) pairs of K-FAC factors over a gradient pytree:
    tuples block by block, named dicts by ``grads[name]`` or the ``w``/``b`` pair."""
    if isinstance(factors, tuple):
        for f, g in zip(factors, grads):
            yield from _kfac_views(f, g)
    elif factors and not {"A", "A_diag", "diag"} & set(factors):
        for name, block in factors.items():
            view = grads[name] if name in grads else {
                key: grads[key + name] for key in ("w", "b") if key + name in grads}
            yield from _kfac_views(block, view)
    elif factors:
        yield factors, grads


def kfac_block_matrix(block):
    """The block's Fisher approximation as one explicit matrix (numpy), and the gradient
    as the vector it acts on: ``A kron G`` on ``[W rows; b]`` flattened (``W rows`` alone
    without a bias), ``diag(A) kron G`` on a table, ``diag`` on the flattened leaves."""
    import jax

    from jaxbp.network_curvature import kfac_rows

    def vector(grads):
        if "diag" in block:
            return np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
        if "A_diag" in block:
            return np.ravel(np.asarray(grads))
        rows = [np.asarray(kfac_rows(grads["w"]))]
        if "b" in grads:
            rows.append(np.asarray(grads["b"])[None])
        return np.concatenate(rows).ravel()

    if "diag" in block:
        matrix = np.diag(np.concatenate([np.ravel(d) for d in jax.tree.leaves(block["diag"])]))
    else:
        a = np.diag(block["A_diag"]) if "A_diag" in block else np.asarray(block["A"])
        matrix = np.kron(a, np.asarray(block["G"]))
    return matrix, vector


def kfac_blocks(factors, *trees):
    """Every K-FAC block with its explicit matrix and, for each gradient pytree given,
    the vector the block acts on."""
    views = [list(_kfac_views(factors, tree)) for tree in trees]
    for parts in zip(*views):
        block = parts[0][0]
        matrix, vector = kfac_block_matrix(block)
        yield block, matrix, [vector(view) for _, view in parts]
