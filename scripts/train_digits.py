"""Train an MLP on the shipped digits with the hand-written gradient (public API only).

    python scripts/train_digits.py [--epochs 30] [--plot scripts/figures/digits_curves.png]

Checks the gradient once in float64 on the first batch, trains with adam, and
prints the test accuracy.
"""

from __future__ import annotations

import jax
import optax

import jaxbp
from jaxbp.cli.common import OneLineParser


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--plot", default=None, help="PNG of the train/test curves")
    args = parser.parse_args()

    digits = jaxbp.data.load_digits()
    net = jaxbp.MLP((64, 256, 256, 10), "relu", "identity", "softmax_cross_entropy")
    key = jax.random.key(0)
    params = net.init(jax.random.split(key)[0])

    report = jaxbp.verify_mlp(net, params, digits.x_train[:128], digits.y_train[:128],
                              float64=True)
    print(report.summary())
    report.raise_if_failed()

    result = jaxbp.fit(net, optax.adam(1e-3), digits, epochs=args.epochs, batch_size=128,
                       key=key, params=params, plot=args.plot)
    test = jaxbp.evaluate(net, result.state.params, digits.x_test, digits.y_test)
    print(f"test accuracy {test['accuracy']:.4f}, test loss {test['loss']:.4f}")


if __name__ == "__main__":
    main()
