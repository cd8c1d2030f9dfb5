"""Test set-up: several CPU devices so data-parallel code is exercised without accelerators."""

import os

# Must happen before JAX initialises its backends. XLA_FLAGS is the fallback for older jax.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

NUM_TEST_DEVICES = 4
jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)
