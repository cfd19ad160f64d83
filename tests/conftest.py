import os

# Tests share the machine with other processes: keep XLA's thread pool modest and
# the persistent compilation cache inside the test session's temporary area.
os.environ.setdefault("ZTFPSF_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))
