"""Test setup: 8 simulated CPU devices (must happen before jax is imported anywhere)."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Free each test file's compiled programs when it ends. XLA:CPU maps every
    executable into memory; the whole suite's programs in one process exceed the kernel's
    map limit and compiling then fails (a segfault inside LLVM)."""
    yield
    import jax

    jax.clear_caches()
