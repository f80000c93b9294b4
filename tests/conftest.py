"""Test setup: 8 simulated CPU devices (must happen before jax is imported anywhere)."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One on-disk XLA cache for the session (its workers and the CLIs tests start inherit it):
# a program one test file compiled is read back by the next, although each file's
# in-memory programs are dropped when it ends (below). Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dspark-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
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
