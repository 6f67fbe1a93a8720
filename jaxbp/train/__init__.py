"""Training: the jitted step and loop (step), the epoch loop (fit), its feeds, plots and
checkpoints.

``jaxbp.train`` itself re-exports the step's public names; the epoch loop is
:func:`jaxbp.fit` (``jaxbp.train.fit``), which this package does not import so that the
sharded step (``jaxbp.parallel``) can sit between the two.
"""

from jaxbp.train.step import (
    GRADIENTS,
    TrainState,
    check_optimizer,
    evaluate,
    gradient_source,
    make_train_loop,
    make_train_step,
)

__all__ = ["GRADIENTS", "TrainState", "check_optimizer", "evaluate", "gradient_source",
           "make_train_loop", "make_train_step"]
