"""Optimizers: SAM / ASAM as an optax transform and the factory that builds one from the config."""

from mdjax.optim.factory import make_optimizer, make_schedule
from mdjax.optim.sam import SAMState, sam

__all__ = ["SAMState", "make_optimizer", "make_schedule", "sam"]
