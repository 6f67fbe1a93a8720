"""Checking a gradient: verify_grads (any pytree) and verify_vjp/verify_jvp (any function),
their reports, and the random-architecture suite of ``jaxbp verify``."""
