"""Test setup: 8 simulated CPU devices (must happen before jax is imported anywhere)."""

import atexit
import os
import shutil
import sys
import tempfile

# The suite's programs are tiny, so XLA:CPU spends its time compiling, not running: compile
# them at LLVM's lowest optimisation level with the classic fusion emitters on one codegen
# thread (about 3x less suite time on two cores; results checked against the defaults in
# docs/test_suite_time.md). DSPARK_TEST_XLA_DEFAULTS=1 keeps XLA's defaults.
_FAST_COMPILE = ("" if os.environ.get("DSPARK_TEST_XLA_DEFAULTS") == "1" else
                 " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
                 " --xla_cpu_parallel_codegen_split_count=1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _FAST_COMPILE +
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


def cpu_env(devices):
    """The environment for a subprocess that should see `devices` CPU devices, compiling as
    the suite does."""
    return dict(os.environ, XLA_FLAGS=f"{_FAST_COMPILE} --xla_force_host_platform_device_count={devices}".strip(),
                JAX_PLATFORMS="cpu")


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
