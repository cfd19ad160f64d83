"""JAX set-up. Importing ztfpsf changes nothing in JAX; two things are offered instead:

:func:`configure` (public as ``ztfpsf.configure()``) is the process-wide set-up that
ztfpsf's own entry points call (the ``ztfpsf`` command, its Dask workers, the benchmarks):
float64 enabled, all usable cores as CPU host devices, one thread for the BLAS/LAPACK
library behind JAX's CPU linear algebra, and a persistent compilation cache so that a
second run starts in about a second. A host application may call it too;
otherwise its JAX stays as it set it.

:func:`with_x64` makes a library entry point correct whatever the host chose: it runs
the call with JAX's float64 enabled (``jax.enable_x64``, thread-local, restored on
return), so ``dtype="float64"`` fits and the float64 sums of the joint PSF fit are float64
in a process where x64 is off.

Environment: ``ZTFPSF_CPU_DEVICES`` (host devices; default: the usable cores),
``ZTFPSF_CACHE_DIR`` (compilation cache; ``off`` disables it); ``OPENBLAS_NUM_THREADS``
when set is kept.

Why one BLAS thread: JAX's CPU Cholesky, triangular and LU solves call scipy's OpenBLAS,
whose worker threads spin against XLA's own threads (one per host device). Measured on
this project's 2-core machine: an 812x812 Cholesky 0.09-1.0 s with OpenBLAS's default
threads, 0.009-0.012 s with one; a batch of 128 4x4 triangular solves 101 ms against 7 ms.
"""

import functools
import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)

__all__ = ["configure", "with_x64"]


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def configure():
    """Set up JAX in this process for ztfpsf: float64, CPU devices, compilation cache.

    Call it before the first JAX computation (the number of CPU devices cannot change
    after JAX started; then the caller's is kept). Calling it again is harmless.
    """
    jax.config.update("jax_enable_x64", True)
    _single_blas_thread()
    n = int(os.environ.get("ZTFPSF_CPU_DEVICES", _usable_cores()))
    try:
        if jax.config.jax_num_cpu_devices != max(1, n):
            jax.config.update("jax_num_cpu_devices", max(1, n))
    except Exception as err:  # backends already initialised by the caller: keep theirs
        log.debug("could not set jax_num_cpu_devices: %s", err)
    cache = os.environ.get("ZTFPSF_CACHE_DIR", str(Path.home() / ".cache" / "ztfpsf" / "jax"))
    if cache.lower() != "off" and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _single_blas_thread():
    """One OpenBLAS thread (see the module's notes): the environment variable for the
    libraries loaded later (scipy's, which JAX loads on its first solve), threadpoolctl
    for those loaded already. A caller's ``OPENBLAS_NUM_THREADS`` is kept."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def with_x64(func):
    """Decorator: run ``func`` with JAX's float64 enabled (thread-local, restored after)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True):
            return func(*args, **kwargs)

    return wrapper
