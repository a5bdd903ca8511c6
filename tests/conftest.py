"""Test-wide set-up: 8 fake CPU devices (before jax is imported) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile once per machine: later test processes reuse XLA executables.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "user_llm_jax_xla"))

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real datasets beside the checkout (../shared/data); skip when absent."""
  if not SHARED_DATA.exists():
    pytest.skip(f"real data not found at {SHARED_DATA}")
  return SHARED_DATA
