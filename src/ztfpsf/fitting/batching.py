"""Run a per-chunk function over all stars with one compiled program.

Stars go through the program in batches of a fixed size (``n_devices * n_chunks *
chunk``): a batch is split over the devices of the chosen backend (``shard_map``; on a
2-core CPU two host devices keep both cores busy, jax#5506) and, on each device, mapped
chunk after chunk (``lax.map``): a chunk's arrays stay in cache on a CPU and each chunk's
solver loop stops as soon as its own stars are done. Full batches are zero-copy slices of
the caller's arrays; only the last, partial batch is padded, to 1, 2, 3, 4, 6, 8, 12, ...
chunks, so few distinct shapes are ever compiled and large inputs cost no host copy.
Batches are dispatched asynchronously, so the device works while the host slices.
"""

import functools
import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

__all__ = ["select_devices", "default_chunk", "layout", "run_chunked", "in_rounds"]

#: Stars per chunk by platform: cache-sized on a CPU, large on an accelerator.
CHUNK = {"cpu": 128}
CHUNK_ACCELERATOR = 65536
#: Chunks per device in one full batch.
BATCH_CHUNKS = {"cpu": 128}
BATCH_CHUNKS_ACCELERATOR = 1


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


def bucket(n):
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5x them) >= n:
    few distinct shapes to compile, at most a third of a batch padded."""
    p = _next_pow2(n)
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


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


def layout(n, devices, chunk=None):
    """``(chunk, batch)``: stars per chunk and per full batch of the compiled program."""
    ndev = len(devices)
    chunk = chunk or default_chunk(devices)
    chunk = int(min(chunk, max(8, _next_pow2(-(-n // ndev)))))
    per_device = BATCH_CHUNKS.get(devices[0].platform, BATCH_CHUNKS_ACCELERATOR)
    return chunk, ndev * chunk * per_device


def _padded(a, total):
    out = np.zeros((total,) + a.shape[1:], dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


def _batches(n, chunk, batch, ndev):
    """(start, stop, padded size) of each batch: full ones, then the padded tail."""
    out = [(i, i + batch, batch) for i in range(0, n - n % batch, batch)]
    rest = n % batch
    if rest:
        size = ndev * chunk * bucket(-(-rest // (ndev * chunk)))
        out.append((n - rest, n, size))
    return out


def run_chunked(task, arrays, devices, chunk=None):
    """Apply ``task = (function, *static_args)`` to all stars.

    ``function(*static_args, *chunk_arrays)`` returns a pytree of chunk arrays; the
    static arguments must be hashable (they key the compiled program). ``arrays`` all
    have the stars on axis 0; the outputs come back as numpy arrays, one row per star.
    """
    n = arrays[0].shape[0]
    chunk, batch = layout(n, devices, chunk)
    func, sharding = _compiled(tuple(task), tuple(devices), chunk)
    target = devices[0] if sharding is None else sharding
    pending = []
    for start, stop, size in _batches(n, chunk, batch, len(devices)):
        parts = [np.asarray(a[start:stop]) for a in arrays]
        if stop - start < size:
            parts = [_padded(p, size) for p in parts]
        placed = [jax.device_put(np.ascontiguousarray(p), target) for p in parts]
        pending.append((stop - start, func(*placed)))  # asynchronous: the next batch is sliced meanwhile
    log.debug("ran %d stars in %d batch(es) on %d device(s), chunks of %d", n, len(pending), len(devices), chunk)
    outs = [jax.tree.map(lambda o, k=k: np.asarray(o)[:k], out) for k, out in pending]
    return jax.tree.map(lambda *o: np.concatenate(o) if len(o) > 1 else o[0], *outs)


def in_rounds(fit, n, caps):
    """Fit ``n`` items in rounds of growing iteration caps: ``fit(idx, cap)`` fits the items
    ``idx`` with at most ``cap`` iterations (per solve) and returns a dict of per-item arrays
    with a bool ``"capped"`` (an item stopped by the cap, not by convergence). Each round
    refits, from the same start, only the items the previous cap stopped. A chunk of a
    compiled solver runs until its slowest item is done, and fits have long tails (most
    converge in a few iterations, a few percent need the whole cap), so the first round
    with a low cap does most of the work at a fraction of the cost. An item stops at
    convergence whatever its cap: its result is the one a single fit with the last cap
    would give. Returns the merged dict (``"capped"``: by the last cap)."""
    out, todo = None, np.arange(n)
    for cap in caps:
        res = fit(todo, cap)
        if out is None:
            out = {name: np.array(v) for name, v in res.items()}
        else:
            for name, v in res.items():
                out[name][todo] = v
        todo = todo[np.asarray(res["capped"], bool)]
        if todo.size == 0:
            break
    return out
