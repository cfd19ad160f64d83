import os

# Tests share the machine with other processes: keep XLA's thread pool modest and
# the persistent compilation cache inside the test session's temporary area.
os.environ.setdefault("ZTFPSF_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sim_run(tmp_path_factory):
    """A small simulated run with its outputs (tests/simrun.py), shared by figure and report tests."""
    from simrun import build_run

    return build_run(tmp_path_factory.mktemp("run"))
