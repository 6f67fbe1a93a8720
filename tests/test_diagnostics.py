"""layer_stats against autodiff, and the vanishing-gradient picture of seed 001."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp


def test_stats_match_autodiff():
    with jax.enable_x64(True):
        net = jaxbp.MLP((5, 7, 6, 3), "tanh", "identity", "softmax_cross_entropy", "float64")
        params = net.init(jax.random.key(0))
        rng = np.random.default_rng(0)
        x, y = jnp.asarray(rng.normal(size=(9, 5))), jnp.asarray(rng.integers(0, 3, 9))
        stats = jaxbp.layer_stats(net, params, x, y)
        grads = jax.grad(lambda p: net.cost(p, x, y))(params)

        def sample_loss(p, x_i, y_i):
            return net.loss_fn.sample_loss(net.apply(p, x_i[None]), y_i[None])[0]

        # per-sample bias gradients are the per-sample errors delta_i^l
        per_sample = jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0))(params, x, y)
        for l in range(3):
            np.testing.assert_allclose(stats["grad_norm"][l], jnp.linalg.norm(grads[l]["w"]),
                                       rtol=1e-12)
            np.testing.assert_allclose(stats["weight_norm"][l],
                                       jnp.linalg.norm(params[l]["w"]), rtol=1e-12)
            np.testing.assert_allclose(stats["mean_abs_delta"][l],
                                       jnp.mean(jnp.abs(per_sample[l]["b"])), rtol=1e-12)
            np.testing.assert_allclose(stats["update_ratio"][l],
                                       stats["grad_norm"][l] / stats["weight_norm"][l],
                                       rtol=1e-12)


def test_update_ratio_uses_the_given_updates():
    net = jaxbp.MLP((4, 5, 2), "relu")
    params = net.init(jax.random.key(1))
    x, y = np.ones((3, 4), np.float32), np.array([0, 1, 1])
    grads = jaxbp.backprop(net, params, x, y)
    updates, _ = optax.sgd(0.01).update(grads, optax.sgd(0.01).init(params))
    stats = jaxbp.layer_stats(net, params, x, y, updates)
    expected = [np.linalg.norm(np.asarray(u["w"], np.float64))
                / np.linalg.norm(np.asarray(p["w"], np.float64)) for u, p in zip(updates, params)]
    np.testing.assert_allclose(stats["update_ratio"], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="updates must have the structure of params"):
        jaxbp.layer_stats(net, params, x, y, updates[:1])
    rows = jax.tree.map(lambda u: u[:1], updates)     # broadcast into a ratio before
    with pytest.raises(ValueError, match=r"updates does not fit params: updates\[0\]\['b'\] "
                                         r"has shape \(1,\) but expected \(5,\)"):
        jaxbp.layer_stats(net, params, x, y, rows)


def test_sigmoid_errors_vanish_and_relu_he_errors_do_not():
    digits = jaxbp.data.load_digits()
    x, y = digits.x_train[:256], digits.y_train[:256]
    ratios = {}
    for activation in ("sigmoid", "relu"):
        net = jaxbp.MLP((64,) + (64,) * 9 + (10,), activation)
        stats = jaxbp.layer_stats(net, net.init(jax.random.key(0)), x, y)
        delta = np.asarray(stats["mean_abs_delta"])
        ratios[activation] = delta[0] / delta[-1]
    assert ratios["sigmoid"] < 1e-4   # measured 1.5e-6: g' <= 1/4 at each of 9 layers
    assert 0.1 < ratios["relu"] < 10  # measured 0.39


def test_fit_records_flow_and_the_cli_plots_it(tmp_path, capsys, monkeypatch):
    from jaxbp import cli
    from jaxbp.train.plots import plot_flow, plot_history, pyplot

    digits = jaxbp.data.load_digits()
    net = jaxbp.MLP((64, 32, 32, 10), "sigmoid")
    result = jaxbp.fit(net, optax.adam(1e-3), digits, epochs=2, batch_size=256,
                       key=jax.random.key(0), progress=False, diagnostics=True)
    stats = result.history["layer_stats"]
    assert len(stats) == 2 and len(stats[0]["mean_abs_delta"]) == 3
    assert plot_flow(result.history, tmp_path / "flow.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no layer_stats"):
        plot_flow({"epoch": [1]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"history must be fit's .* it has no \['train_loss', "
                                         r"'test_loss', 'train_accuracy', 'test_accuracy'\]"):
        plot_history({"epoch": [1]}, tmp_path / "x.png")      # was a KeyError
    assert plot_history(result.history, tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "x.png").exists()
    code = cli.main(["train", "--epochs", "2", "--sizes", "64,16,10", "--quiet",
                     "--diagnostics", str(tmp_path / "cli_flow.png")])
    assert code == 0 and (tmp_path / "cli_flow.png").exists()
    assert "wrote" in capsys.readouterr().out
    figures = []     # a one-epoch run: each value a marked point (a bare line was invisible)
    monkeypatch.setattr(sys.modules["jaxbp.train.plots"], "save_figure",
                        lambda fig, path: figures.append(fig))
    one = {k: v[:1] for k, v in result.history.items()}
    plot_history(one, tmp_path / "one.png")
    plot_flow(one, tmp_path / "one_flow.png")
    markers = {line.get_marker() for fig in figures for ax in fig.axes for line in ax.lines}
    assert len(figures) == 2 and markers == {"o"}
    assert stats[0]["layers"] == ["layers[0]", "layers[1]", "layers[2]"]   # the legend's
    assert [line.get_label() for line in figures[1].axes[0].lines] == stats[0]["layers"]
    for fig in figures:
        pyplot().close(fig)
