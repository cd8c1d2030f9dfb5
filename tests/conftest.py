"""Test set-up: several CPU devices so data-parallel code is exercised without accelerators."""

import os
import socket
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, inherited by the subprocesses that run
# `mdjax.main`: the same programs compiled again (resumed runs, repeated configs) load in ~1 s.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mdjax-test-xla-cache-"))

import jax  # noqa: E402
import pytest  # noqa: E402

NUM_TEST_DEVICES = 4
jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)


@pytest.fixture
def free_port() -> int:
  """A free localhost port for a test's jax.distributed coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
