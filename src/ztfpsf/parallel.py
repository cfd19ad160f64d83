"""Many files on Dask: the same per-file function, one task per file.

Nothing numerical knows about Dask. :func:`map_files` runs a picklable ``func(path)`` for
every path, on a ``LocalCluster`` of worker processes by default (one JAX runtime per
worker, each told to use ``cores // workers`` CPU devices so XLA and Dask do not
oversubscribe the machine), or on an existing cluster given by its scheduler address
(any Dask deployment, e.g. dask-jobqueue's ``SLURMCluster``). A file whose task fails —
an exception, or a worker that died — comes back with its error; the others finish.
Results are handed to ``on_result`` as each file finishes, so callers can write them at
once and an interrupted run keeps everything already done.

Paths travel to the workers as absolute paths (a worker's working directory is not the
client's); each worker configures JAX (:func:`ztfpsf.configure`) before its first task.
The local cluster binds to the loopback interface, its HTTP server to a free port (no
clash with another cluster's 8787), and is closed by letting every worker process exit on
its own (JAX takes a moment to shut down) rather than killing it after Dask's 4 s.
"""

import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

__all__ = ["FileResult", "map_files", "usable_cores"]


@dataclass
class FileResult:
    """Outcome of one file: its value, or the one-line reason it failed."""

    path: str
    value: Any = None
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def ok(self):
        return self.error is None


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _one_line(err):
    """First line of the error; input errors (ValueError, OSError) already name the file,
    anything else gets its type so that a bug is recognisable."""
    msg = str(err).strip().splitlines()
    first = msg[0] if msg else ""
    if isinstance(err, (ValueError, OSError)) and first:
        return first
    return f"{type(err).__name__}: {first}".rstrip(": ")


def _run_one(func, path, on_worker=False):
    """Run ``func(path)`` and never raise: a failure becomes the result's error.

    ``on_worker``: this is a Dask worker process, which ztfpsf configures (idempotent).
    """
    t0 = time.perf_counter()
    if on_worker:
        from ._jax import configure

        configure()
    try:
        value = func(path)
        return FileResult(str(path), value=value, seconds=time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001 - one bad file must not stop a batch
        log.debug("%s failed:\n%s", path, traceback.format_exc())
        return FileResult(str(path), error=_one_line(err), seconds=time.perf_counter() - t0)


def _progress(total, desc):
    return tqdm(total=total, desc=desc or "files", unit="file", disable=not sys.stderr.isatty())


def map_files(
    func: Callable,
    paths,
    *,
    workers: Optional[int] = None,
    scheduler: Optional[str] = None,
    desc: str = "",
    on_result: Optional[Callable[[FileResult], None]] = None,
):
    """Run ``func(path)`` for each path; return :class:`FileResult` in input order.

    ``workers``: worker processes of the local cluster (default: the usable cores, at
    most the number of files); 1 runs in this process without Dask. ``scheduler``: address
    of an existing Dask scheduler (``tcp://host:8786``) to send the work to instead.
    """
    paths = [str(p) for p in paths]
    results = [None] * len(paths)

    def done(i, res):
        res.path = paths[i]  # as given (the workers got it absolute)
        results[i] = res
        if res.ok:
            log.info("%s: done in %.1f s", res.path, res.seconds)
        else:
            log.warning("%s: failed: %s", res.path, res.error)
        if on_result is not None:
            on_result(res)

    if not paths:
        return []
    n_workers = workers or min(usable_cores(), len(paths))
    if scheduler is None and n_workers <= 1:
        with _progress(len(paths), desc) as bar:
            for i, p in enumerate(paths):
                done(i, _run_one(func, p))
                bar.update()
        return results
    return _map_dask(func, paths, n_workers, scheduler, desc, done, results)


def _quiet_dask():
    """Dask's own INFO lines (scheduler, workers) would drown ours: warnings only."""
    for name in ("distributed", "distributed.scheduler", "distributed.core", "distributed.nanny", "distributed.worker", "distributed.http"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def _map_dask(func, paths, n_workers, scheduler, desc, done, results):
    from distributed import Client, LocalCluster, as_completed

    _quiet_dask()

    cluster = None
    if scheduler is None:
        devices = max(1, usable_cores() // n_workers)
        env = {"ZTFPSF_CPU_DEVICES": str(devices), "OMP_NUM_THREADS": str(devices)}
        # set in this process too while the workers start: a spawned worker imports the
        # parent's __main__ (a script may configure ztfpsf there) before Dask applies `env`
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            cluster = LocalCluster(
                n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR, env=env,
            )  # fmt: skip
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        log.info("local Dask cluster: %d worker processes x %d CPU device(s)", n_workers, devices)
    try:
        with Client(cluster if cluster is not None else scheduler) as client:
            futures = {
                client.submit(_run_one, func, os.path.abspath(p), True, key=f"ztfpsf-{i}-{os.path.basename(p)}", pure=False): i
                for i, p in enumerate(paths)
            }  # fmt: skip
            with _progress(len(paths), desc) as bar:
                for fut in as_completed(futures):
                    i = futures[fut]
                    try:
                        res = fut.result()
                    except Exception as err:  # noqa: BLE001 - e.g. the worker died
                        res = FileResult(paths[i], error=_one_line(err))
                    done(i, res)
                    bar.update()
    finally:
        if cluster is not None:
            _close(cluster)
    return results


#: Seconds a closing worker process gets to exit by itself before it is killed.
_EXIT_TIMEOUT = 30.0


def _close(cluster):
    """Close the local cluster, letting each worker process exit on its own."""
    import asyncio

    async def close_workers():
        await asyncio.gather(*(w.close(timeout=_EXIT_TIMEOUT) for w in list(cluster.workers.values())))

    try:
        cluster.sync(close_workers)
    finally:
        cluster.close()
