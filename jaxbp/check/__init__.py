"""Checking a gradient: verify_grads (any pytree), verify_vjp/verify_jvp (any function),
verify_layer (a layer record's rules), their reports, and the random-architecture suite of
``jaxbp verify``."""
