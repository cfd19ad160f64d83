"""Run a per-chunk function over all stars in one compiled program.

Stars are padded to ``n_devices * n_chunks * chunk`` (``n_chunks`` a power of two, so
few distinct shapes are ever compiled), split over the devices of the chosen backend
(``shard_map``: on a 2-core CPU, 2 host devices keep both cores busy, jax#5506) and,
on each device, mapped chunk after chunk (``lax.map``): a chunk's arrays stay in cache
on a CPU and each chunk's solver loop stops as soon as its own stars are done.
"""

import functools
import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

__all__ = ["select_devices", "default_chunk", "run_chunked"]

#: Stars per chunk by platform: cache-sized on a CPU, large on an accelerator.
CHUNK = {"cpu": 128}
CHUNK_ACCELERATOR = 8192


def select_devices(backend="auto"):
    """Devices of ``backend`` ('auto': an accelerator when JAX sees one, else the CPU)."""
    if backend in (None, "auto"):
        return tuple(jax.devices())
    name = {"gpu": "gpu", "cuda": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(str(backend).lower())
    if name is None:
        raise ValueError(f"unknown backend {backend!r}; use 'auto', 'cpu' or 'gpu'")
    try:
        return tuple(jax.devices(name))
    except RuntimeError as err:
        raise ValueError(f"backend {backend!r} requested but JAX sees no such device ({err})") from None


def default_chunk(devices):
    env = os.environ.get("ZTFPSF_CHUNK")
    if env:
        return int(env)
    return CHUNK.get(devices[0].platform, CHUNK_ACCELERATOR)


def _next_pow2(n):
    return 1 << max(0, int(np.ceil(np.log2(max(n, 1)))))


@functools.lru_cache(maxsize=128)
def _compiled(task, devices, chunk):
    fn = functools.partial(*task)

    def per_device(*arrays):
        n_chunks = arrays[0].shape[0] // chunk
        xs = tuple(a.reshape((n_chunks, chunk) + a.shape[1:]) for a in arrays)
        out = jax.lax.map(lambda c: fn(*c), xs)
        return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:]), out)

    if len(devices) == 1:
        return jax.jit(per_device), None
    mesh = Mesh(np.array(devices), ("stars",))
    spec = PartitionSpec("stars")
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    return jax.jit(mapped), NamedSharding(mesh, spec)


def run_chunked(task, arrays, devices, chunk=None):
    """Apply ``task = (function, *static_args)`` to all stars at once.

    ``function(*static_args, *chunk_arrays)`` returns chunk arrays; the static arguments
    must be hashable (they key the compiled program).

    ``arrays`` all have the stars on axis 0; the outputs come back as numpy arrays with
    the padding removed (``None`` outputs stay ``None``).
    """
    n = arrays[0].shape[0]
    ndev = len(devices)
    chunk = chunk or default_chunk(devices)
    chunk = int(min(chunk, max(8, _next_pow2(-(-n // ndev)))))
    n_chunks = _next_pow2(-(-n // (ndev * chunk)))
    total = ndev * n_chunks * chunk
    padded = [np.concatenate([a, np.zeros((total - n,) + a.shape[1:], a.dtype)]) if total > n else a for a in arrays]
    func, sharding = _compiled(tuple(task), tuple(devices), chunk)
    if sharding is None:
        placed = [jax.device_put(a, devices[0]) for a in padded]
    else:
        placed = [jax.device_put(a, sharding) for a in padded]
    log.debug("running %d stars as %d device(s) x %d chunk(s) x %d", n, ndev, n_chunks, chunk)
    out = func(*placed)
    return jax.tree.map(lambda o: np.asarray(o)[:n], out)
