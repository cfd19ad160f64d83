import os

# Tests share the machine with other processes: keep XLA's thread pool modest and
# the persistent compilation cache inside the test session's temporary area.
os.environ.setdefault("ZTFPSF_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))
# Most of the suite's time is XLA compiling programs that then run for milliseconds: LLVM's
# optimisation passes off (tests only; the same numbers, slower loops) cut compile times
# by about a third. Subprocesses (the CLI, Dask workers) inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


import pytest  # noqa: E402

import ztfpsf  # noqa: E402

# the test process is ztfpsf's own: the set-up of its commands (float64, all cores, cache)
ztfpsf.configure()


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Each test module's compiled programs are dropped after it (the persistent cache
    keeps them on disk): one process holding every program of the suite grew past 6 GB and
    once aborted inside an XLA compilation late in the run."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(scope="session")
def sim_run(tmp_path_factory):
    """A small simulated run with its outputs (tests/simrun.py), shared by figure and report tests."""
    from simrun import build_run

    return build_run(tmp_path_factory.mktemp("run"))
