"""JAX set-up done once at import: float64 available, all CPU cores as host devices,
and a persistent compilation cache so that a second run starts in about a second.

Environment: ``ZTFPSF_CPU_DEVICES`` (host devices; default: the usable cores),
``ZTFPSF_CACHE_DIR`` (compilation cache; ``off`` disables it).
"""

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def configure():
    jax.config.update("jax_enable_x64", True)
    n = int(os.environ.get("ZTFPSF_CPU_DEVICES", _usable_cores()))
    try:
        jax.config.update("jax_num_cpu_devices", max(1, n))
    except Exception as err:  # backends already initialised by the caller: keep theirs
        log.debug("could not set jax_num_cpu_devices: %s", err)
    cache = os.environ.get("ZTFPSF_CACHE_DIR", str(Path.home() / ".cache" / "ztfpsf" / "jax"))
    if cache.lower() != "off" and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
