"""Custom derivative rules for the checker's tests: a dozen correct ones and a dozen with a
planted bug each (the kind, and the leaf the report must point at).

Each case: ``(name, rule kind "vjp"/"jvp", f, reference, make_args(dtype), bad)`` where
``bad`` is None for a correct rule, else a substring every failing block's path holds.
Shared by tests/test_verify_fn.py and scripts/compare_checkers.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _vjp_rule(primal, fwd_res, bwd):
    """A jax.custom_vjp from a primal, a residual function and a backward."""
    f = jax.custom_vjp(primal)
    f.defvjp(lambda *a: (primal(*a), fwd_res(*a)), bwd)
    return f


def _jvp_rule(primal, jvp):
    f = jax.custom_jvp(primal)
    f.defjvp(jvp)
    return f


# ----- plain implementations (the references) ------------------------------------------
def softplus(x):
    return jnp.logaddexp(x, 0.0)


def sigmoid(x):
    return 1 / (1 + jnp.exp(-x))


def norm(x):
    return jnp.sqrt(jnp.sum(x * x))


def logsumexp(x):
    m = jnp.max(x)
    return m + jnp.log(jnp.sum(jnp.exp(x - m)))


def gram(a):
    return a @ a.T


def inverse(a):
    return jnp.linalg.inv(a)


def layer(p, x):
    return {"y": jnp.tanh(x @ p["w"] + p["b"]), "penalty": jnp.sum(p["w"] ** 2)}


def solve(a, b):
    return jnp.linalg.solve(a, b)


def cumsum(x):
    return jnp.cumsum(x)


def product(x, y):
    return x * y


def normalize(x):
    return x / norm(x)


def two_outputs(x):
    return jnp.sin(x), x ** 2


def matvec(a, x):
    return a @ x


# ----- correct custom rules --------------------------------------------------------------
def _softplus_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return softplus(x), sigmoid(x) * t


def _sigmoid_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    s = sigmoid(x)
    return s, s * (1 - s) * t


def _product_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    return x * y, tx * y + x * ty


def _layer_bwd(res, g):
    p, x, y = res
    dz = g["y"] * (1 - y * y)
    return ({"w": x.T @ dz + 2 * p["w"] * g["penalty"], "b": dz.sum(0)}, dz @ p["w"].T)


def _inverse_bwd(inv, g):
    return (-inv.T @ g @ inv.T,)


def _solve_bwd(res, g):
    a, x = res
    gb = jnp.linalg.solve(a.T, g)
    return -jnp.outer(gb, x), gb


CORRECT = {
    "softplus (custom_jvp, vector)": ("jvp", _jvp_rule(softplus, _softplus_jvp), softplus),
    "sigmoid (custom_jvp, vector)": ("jvp", _jvp_rule(sigmoid, _sigmoid_jvp), sigmoid),
    "product (custom_jvp, two inputs)": ("jvp", _jvp_rule(product, _product_jvp), product),
    "norm (custom_vjp, scalar out)": ("vjp", _vjp_rule(norm, lambda x: x,
                                                      lambda x, g: (g * x / norm(x),)), norm),
    "logsumexp (custom_vjp)": ("vjp", _vjp_rule(logsumexp, lambda x: x,
                                               lambda x, g: (g * jax.nn.softmax(x),)),
                               logsumexp),
    "gram A A^T (custom_vjp, matrix)": ("vjp", _vjp_rule(gram, lambda a: a,
                                                        lambda a, g: ((g + g.T) @ a,)), gram),
    "inverse (custom_vjp, matrix)": ("vjp", _vjp_rule(inverse, inverse, _inverse_bwd),
                                     inverse),
    "solve (custom_vjp, two inputs)": ("vjp", _vjp_rule(solve, lambda a, b: (a, solve(a, b)),
                                                       _solve_bwd), solve),
    "layer (custom_vjp, pytree in and out)": (
        "vjp", _vjp_rule(layer, lambda p, x: (p, x, layer(p, x)["y"]), _layer_bwd), layer),
    "cumsum (custom_vjp)": ("vjp", _vjp_rule(cumsum, lambda x: None,
                                            lambda _, g: (jnp.cumsum(g[::-1])[::-1],)),
                            cumsum),
    "normalize (custom_vjp)": (
        "vjp", _vjp_rule(normalize, lambda x: x,
                         lambda x, g: ((g - normalize(x) * jnp.vdot(normalize(x), g))
                                       / norm(x),)), normalize),
    "two outputs (custom_vjp, tuple out)": (
        "vjp", _vjp_rule(two_outputs, lambda x: x,
                         lambda x, g: (g[0] * jnp.cos(x) + g[1] * 2 * x,)), two_outputs),
}


# ----- planted bugs ----------------------------------------------------------------------
def _one_wrong_entry(x, g):
    grad = g * jax.nn.softmax(x)
    return (grad.at[2].multiply(1.5),)


PLANTED = {
    "scale error (softplus jvp 2x)": (
        "jvp", _jvp_rule(softplus, lambda p, t: (softplus(p[0]), 2 * sigmoid(p[0]) * t[0])),
        softplus, "args[0]"),
    "sign flip in one output component": (
        "vjp", _vjp_rule(two_outputs, lambda x: x,
                         lambda x, g: (g[0] * jnp.cos(x) - g[1] * 2 * x,)), two_outputs,
        "out[1]"),
    "transposed Jacobian (matvec)": (
        "vjp", _vjp_rule(matvec, lambda a, x: (a, x),
                         lambda r, g: (jnp.outer(g, r[1]), r[0] @ g)), matvec, "args[1]"),
    "one wrong pytree leaf (layer bias)": (
        "vjp", _vjp_rule(layer, lambda p, x: (p, x, layer(p, x)["y"]),
                         lambda r, g: ({**_layer_bwd(r, g)[0],
                                        "b": (g["y"] * (1 - r[2] ** 2)).mean(0)},
                                       _layer_bwd(r, g)[1])), layer, "['b']"),
    "missing product-rule term (vjp)": (
        "vjp", _vjp_rule(product, lambda x, y: (x, y),
                         lambda r, g: (g * r[1], jnp.zeros_like(r[1]))), product, "args[1]"),
    "one wrong entry (logsumexp)": ("vjp", _vjp_rule(logsumexp, lambda x: x, _one_wrong_entry),
                                    logsumexp, "args[0]"),
    "wrong custom_jvp tangent (sigmoid s(1+s))": (
        "jvp", _jvp_rule(sigmoid, lambda p, t: (sigmoid(p[0]),
                                                sigmoid(p[0]) * (1 + sigmoid(p[0])) * t[0])),
        sigmoid, "args[0]"),
    "ignored cotangent component": (
        "vjp", _vjp_rule(two_outputs, lambda x: x, lambda x, g: (g[0] * jnp.cos(x),)),
        two_outputs, "out[1]"),
    "missing minus sign (inverse)": ("vjp", _vjp_rule(inverse, inverse,
                                                      lambda inv, g: (inv.T @ g @ inv.T,)),
                                     inverse, "args[0]"),
    "missing normalisation (logsumexp exp(x))": (
        "vjp", _vjp_rule(logsumexp, lambda x: x, lambda x, g: (g * jnp.exp(x),)), logsumexp,
        "args[0]"),
    "missing product-rule term (custom_jvp)": (
        "jvp", _jvp_rule(product, lambda p, t: (p[0] * p[1], t[0] * p[1])), product,
        "args[1]"),
    "missing division (norm vjp g x)": ("vjp", _vjp_rule(norm, lambda x: x,
                                                         lambda x, g: (g * x,)), norm,
                                        "args[0]"),
}


def make_args(name: str, dtype: str = "float64", seed: int = 0) -> tuple:
    """The point a case is checked at (well conditioned, away from kinks)."""
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    square = jnp.asarray(rng.standard_normal((4, 4)) + 4 * np.eye(4), dtype)
    if "layer" in name:
        return ({"w": arr(3, 2), "b": arr(2)}, arr(5, 3))
    if "product" in name:
        return (arr(5), arr(5))
    if "inverse" in name:
        return (square,)
    if "solve" in name:
        return (square, arr(4))
    if "matvec" in name:
        return (arr(4, 4), arr(4))
    if "gram" in name:
        return (arr(3, 4),)
    return (arr(6),)
