"""Batches of alerts through the stages: pixels -> stars and PSF choice -> forced fit ->
results. Each stage is one vectorised or compiled call per batch; no loop over alerts.

A batch is measured in two steps. Alerts whose science cutout has well-measured stars
(``psf_source = local``) are finished at once. The others need the PSF alpha or shape
of other alerts of their image, exposure or night (:class:`PSFGroups`); they wait, as
compact stamps (~10 kB each), until the stream ends or ``max_pending`` of them are
waiting, and are then finished together with the groups of every star seen so far.
The result therefore does not depend on how a stream is cut into batches, as long as
fewer than ``max_pending`` alerts wait.
"""

import dataclasses
import logging
import queue
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..flags import Flag
from ..io.alerts import DEFAULT_CHUNK, Alert, AlertBatch, batch_from_alerts, batch_from_records, batch_from_table, iter_batches
from .config import AlertPSFConfig
from .forced import forced_fit
from .pixels import Prepared, detect, prepare, star_stamps
from .psf import STAR_BAD, PSFGroups, fit_stars, grouped_weighted_median, judge_stars, star_weights, verify_on_candidate
from .results import packet_columns, result_frame, table_meta

log = logging.getLogger(__name__)

__all__ = ["measure_batch", "measure_stream", "measure_files", "MAX_PENDING"]

#: Alerts waiting for other alerts' PSFs before they are finished anyway (~10 kB each).
MAX_PENDING = 8192
_SOURCE_OF_LEVEL = {"pid": "quadrant", "jd": "exposure", "nid": "night", "all": "batch"}
_ROW = "_row"


def _config(config, gain):
    cfg = config or AlertPSFConfig()
    return cfg if gain is None else dataclasses.replace(cfg, gain=float(gain))


# --------------------------------------------------------------------------------------
# the stages of one batch
# --------------------------------------------------------------------------------------
@dataclass
class _Stars:
    """Star stamps of waiting alerts; ``owner`` indexes the alerts."""

    data: np.ndarray
    var: np.ndarray
    mask: np.ndarray
    origin: np.ndarray
    x: np.ndarray
    y: np.ndarray
    owner: np.ndarray

    def shifted(self, by):
        return dataclasses.replace(self, owner=self.owner + by)

    @staticmethod
    def concat(parts):
        return _Stars(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(_Stars)})


@dataclass
class _Waiting:
    """Alerts that wait for the PSFs of other alerts."""

    prep: Prepared
    packet: pd.DataFrame
    stars: _Stars

    def __len__(self):
        return len(self.prep)

    @staticmethod
    def concat(parts):
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
        return _Waiting(
            Prepared.concat([p.prep for p in parts]),
            pd.concat([p.packet for p in parts], ignore_index=True),
            _Stars.concat([p.stars.shifted(o) for p, o in zip(parts, offsets)]),
        )


def _sources(batch, prep, cfg):
    """Sources of the star cutouts and which of them are PSF stars (bright enough, far
    enough from the cutout's edge to hold the wings)."""
    k = 0 if cfg.star_cutout == "science" else 1
    same = (batch.shape[:, k] == batch.shape[:, 2]).all(axis=1)
    use = prep.measurable & same & (not cfg.free_shape)
    sky = prep.sky[:, k]
    stack = batch.cutout(cfg.star_cutout)
    peaks = detect(stack, sky, use, batch.shape[:, k], batch.offset, cfg.detect_snr)
    e = (cfg.star_size // 2) // 2
    ox, oy = batch.offset[peaks.alert, 0], batch.offset[peaks.alert, 1]
    ny, nx = batch.shape[peaks.alert, k, 0], batch.shape[peaks.alert, k, 1]
    cx, cy = peaks.x - ox, peaks.y - oy
    star = (peaks.snr >= cfg.min_star_snr) & (cx >= e) & (cx <= nx - 1 - e) & (cy >= e) & (cy <= ny - 1 - e)
    return stack, sky, peaks, np.nonzero(star)[0]


def _local_psfs(stack, sky, peaks, stars, prep, cfg, groups):
    """Shapes of the alerts with well-measured stars (free-shape fits of the bright ones),
    which are also added to ``groups``: ``(fwhm, alpha, n_stars)`` per alert."""
    n = len(prep)
    fwhm, alpha, nstars = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, np.int64)
    bright = stars[peaks.snr[stars] >= cfg.shape_snr]
    if bright.size == 0:
        return fwhm, alpha, nstars
    data, var, mask, origin = star_stamps(stack, sky, peaks, bright, cfg.star_size, cfg.gain)
    fit = fit_stars(data, var, mask, origin, peaks.x[bright].astype(float), peaks.y[bright].astype(float), cfg)
    capped, ok = judge_stars(fit, peaks.snr[bright], cfg)
    owner = peaks.alert[bright][ok]
    f, w = np.asarray(fit["fwhm"], float)[ok], star_weights(np.asarray(fit["fwhm_err"])[ok])
    alerts, fwhm_med, count = grouped_weighted_median(owner, f, w)
    _, alpha_med, _ = grouped_weighted_median(owner, capped[ok], w)
    fwhm[alerts], alpha[alerts], nstars[alerts] = fwhm_med, alpha_med, count
    groups.add(f, capped[ok], w, prep.keys[owner])
    return fwhm, alpha, nstars


class _Clock:
    """Wall seconds per stage, added to ``totals`` (a dict) when one is given."""

    def __init__(self, totals):
        self.totals = totals

    @contextmanager
    def __call__(self, stage):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.totals is not None:
                self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - t0


def _finish(packet, prep, fwhm, alpha, source, nstars, shape_flags, cfg, clock):
    with clock("forced fit"):
        fit = forced_fit(prep, fwhm, alpha, cfg)
    with clock("results"):
        return result_frame(packet, prep, fit, {"source": source, "n_stars": nstars, "flags": shape_flags}, cfg)


def _measure_chunk(batch, cfg, groups, first_row, clock):
    """Finish the alerts of ``batch`` that can be (no data, or stars of their own);
    return their rows and the alerts that wait."""
    n = len(batch)
    with clock("pixels"):
        prep = prepare(batch, cfg)
        packet = packet_columns(batch)
        packet[_ROW] = first_row + np.arange(n)
        stack, sky, peaks, stars = _sources(batch, prep, cfg)
    with clock("stars"):
        fwhm, alpha, nstars = _local_psfs(stack, sky, peaks, stars, prep, cfg, groups)
    local = prep.measurable & (nstars > 0)
    now = np.nonzero(local | ~prep.measurable)[0]
    source = np.where(local, "local", "none").astype(object)
    done = _finish(packet.iloc[now], prep.take(now), fwhm[now], alpha[now], source[now], nstars[now], np.zeros(now.size, np.int64), cfg, clock)
    later = np.nonzero(prep.measurable & ~local)[0]
    position = np.full(n, -1)
    position[later] = np.arange(later.size)
    mine = stars[position[peaks.alert[stars]] >= 0]
    with clock("pixels"):
        data, var, mask, origin = star_stamps(stack, sky, peaks, mine, cfg.star_size, cfg.gain)
    waiting = _Waiting(
        prep.take(later), packet.iloc[later].reset_index(drop=True),
        _Stars(data, var, mask, origin, peaks.x[mine].astype(float), peaks.y[mine].astype(float), position[peaks.alert[mine]]),
    )
    return done, waiting


def _refit_fwhm(w, alpha, cfg):
    """fwhm of the waiting alerts from their stars refitted with alpha held (at low S/N a
    free alpha trades with the fwhm): ``(alerts, fwhm, n_stars)``."""
    s = w.stars
    fit = fit_stars(s.data, s.var, s.mask, s.origin, s.x, s.y, cfg, alpha=alpha[s.owner])
    f, fe = np.asarray(fit["fwhm"], float), np.asarray(fit["fwhm_err"], float)
    # SHAPE_LIMIT may come from the fixed alpha at its cap: the fwhm range is checked here
    ok = ((np.asarray(fit["flags"]) & STAR_BAD) == 0) & np.isfinite(fe) & (f >= cfg.fwhm_range[0]) & (f <= cfg.fwhm_range[1])
    return grouped_weighted_median(s.owner[ok], f[ok], star_weights(fe[ok]))


def _finish_waiting(w, cfg, groups, clock):
    """PSFs of the waiting alerts from the groups, then their forced fits.

    With stars of their own: alpha of their image, else exposure, night, all alerts, else
    ``default_alpha``, and the fwhm of their stars refitted at that alpha (``local_fwhm``).
    Else the PSF of their image (``quadrant``), else of their exposure, night or all
    alerts, checked on the candidate (:func:`verify_on_candidate`); with nothing to
    borrow, the candidate's own fwhm (``difference``). Unchecked or failed checks flag
    ``SHAPE_UNTRUSTED``.
    """
    n = len(w)
    fwhm, alpha, nstars = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, np.int64)
    source = np.full(n, "none", dtype=object)
    flags = np.zeros(n, np.int64)
    if cfg.free_shape:  # the degenerate baseline, for comparison: nothing from stars
        source[:], flags[:] = "difference", Flag.SHAPE_UNTRUSTED
    else:
        with clock("stars"):
            _borrowed_psfs(w, cfg, groups, fwhm, alpha, nstars, source, flags)
    return _finish(w.packet, w.prep, fwhm, alpha, source, nstars, flags, cfg, clock)


def _borrowed_psfs(w, cfg, groups, fwhm, alpha, nstars, source, flags):
    """Fill the shapes of the waiting alerts from the groups (see :func:`_finish_waiting`)."""
    keys, prep = w.prep.keys, w.prep
    with_stars = np.unique(w.stars.owner)
    if with_stars.size:
        _, a, _, _ = groups.lookup(keys[with_stars], cfg.group_keys, use_all=True)
        alpha[with_stars] = np.where(np.isfinite(a), a, cfg.default_alpha)
        alerts, f, count = _refit_fwhm(w, alpha, cfg)
        fwhm[alerts], nstars[alerts], source[alerts] = f, count, "local_fwhm"
    rest = np.nonzero(~np.isfinite(fwhm))[0]
    if rest.size:
        same_image = tuple(k for k in ("pid",) if k in groups.keys)
        f, a, c, level = groups.lookup(keys[rest], same_image)
        hit = level != ""
        fwhm[rest[hit]], alpha[rest[hit]], nstars[rest[hit]], source[rest[hit]] = f[hit], a[hit], c[hit], "quadrant"
        check = rest[~hit]
        f, a, c, level = groups.lookup(keys[check], tuple(k for k in ("jd", "nid") if k in groups.keys), use_all=True)
        found = level != ""
        fwhm[check], nstars[check] = f, c
        alpha[check] = np.where(found, a, cfg.default_alpha)
        named = np.full(check.size, "difference", dtype=object)
        for key, name in _SOURCE_OF_LEVEL.items():
            named[level == key] = name
        source[check] = named
        if check.size:
            p = prep.take(check)
            fv, trusted = verify_on_candidate(p.diff, p.diff_var, p.center, p.diff_origin, fwhm[check], alpha[check], cfg)
            own = ~found & np.isfinite(fv)
            fwhm[check[own]] = fv[own]
            flags[check[~found | ~trusted]] |= Flag.SHAPE_UNTRUSTED


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------
def _stream(batches, cfg, groups, max_pending, timings=None):
    """Result DataFrames (with the input position in ``_row``) as alerts are finished."""
    clock = _Clock(timings)
    waiting, n_waiting, first = [], 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for batch in _timed(batches, clock):
            done, w = _measure_chunk(batch, cfg, groups, first, clock)
            first += len(batch)
            log.debug("batch of %d alerts: %d finished, %d wait", len(batch), len(done), len(w))
            yield done
            if len(w):
                waiting.append(w)
                n_waiting += len(w)
            if waiting and (n_waiting >= max_pending):
                yield _finish_waiting(_Waiting.concat(waiting), cfg, groups, clock)
                waiting, n_waiting = [], 0
        if waiting:
            yield _finish_waiting(_Waiting.concat(waiting), cfg, groups, clock)


def _timed(batches, clock):
    """The batches, with the time spent waiting for each counted as reading."""
    batches = iter(batches)
    while True:
        with clock("reading (waited for)"):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def measure_stream(batches, *, config=None, gain=None, groups=None, max_pending=MAX_PENDING, timings=None):
    """Measure a stream of :class:`~ztfpsf.io.alerts.AlertBatch`; yields result DataFrames
    as alerts are finished: those with stars of their own batch by batch, the others
    (which borrow from their image, exposure or night) when the stream ends or
    ``max_pending`` of them wait. ``source`` (file#record) and ``candid`` identify rows.
    ``timings``: a dict to which the wall seconds of each stage are added.

    groups : :class:`PSFGroups`, optional
        Shapes of groups of alerts, updated with every batch's stars (carry one object
        across calls to borrow from earlier batches); default: a new one.
    """
    cfg = _config(config, gain)
    groups = groups if groups is not None else PSFGroups(cfg.group_keys)
    for frame in _stream(batches, cfg, groups, max_pending, timings):
        frame = frame.drop(columns=_ROW).reset_index(drop=True)
        frame.attrs.update(table_meta(cfg))
        yield frame


def _as_batches(alerts, chunk_size):
    """Batches of at most ``chunk_size`` alerts from what a caller holds."""
    import pyarrow as pa

    if isinstance(alerts, AlertBatch):
        yield from (alerts.take(np.arange(i, min(i + chunk_size, len(alerts)))) for i in range(0, max(len(alerts), 1), chunk_size))
        return
    if isinstance(alerts, pd.DataFrame):
        alerts = pa.Table.from_pandas(alerts, preserve_index=False)
    if isinstance(alerts, (pa.Table, pa.RecordBatch)):
        for i in range(0, max(alerts.num_rows, 1), chunk_size):
            yield batch_from_table(alerts.slice(i, chunk_size), [f"#{k}" for k in range(i, min(i + chunk_size, alerts.num_rows))])
        return
    alerts = list(alerts)  # Alert objects or packet dicts
    for i in range(0, max(len(alerts), 1), chunk_size):
        part = alerts[i : i + chunk_size]
        if part and isinstance(part[0], Alert):
            yield batch_from_alerts(part)
        else:
            yield batch_from_records(part, [f"#{k}" for k in range(i, i + len(part))])


def measure_batch(alerts, *, config=None, gain=None, groups=None, chunk_size=DEFAULT_CHUNK):
    """PSF photometry of the candidates of alerts a caller holds; one row per alert, in
    input order (the entry point for a broker: a Kafka poll, a Spark pandas UDF).

    Parameters
    ----------
    alerts : pyarrow.Table or RecordBatch, pandas.DataFrame, AlertBatch, or a list of
        :class:`~ztfpsf.io.alerts.Alert` or packet dicts
        ZTF alert packets, one per row: ``objectId``, ``candid``, ``candidate`` (struct or
        flattened ``candidate.<field>`` columns), ``cutoutScience``, ``cutoutTemplate``,
        ``cutoutDifference`` (structs with ``stampData``, or the bytes).
    config : :class:`AlertPSFConfig`, optional
    gain : float, optional
        e-/ADU for the sources' Poisson noise; overrides ``config.gain`` (ZTF: 6.2).
    groups : :class:`PSFGroups`, optional
        Carried across calls, lets alerts borrow the PSFs of earlier batches' images.
    chunk_size : int
        Alerts decoded at a time (bounds memory: ~0.1 GB of cutouts per 2048).

    Returns
    -------
    pandas.DataFrame
        :data:`RESULT_COLUMNS`, the pipeline's :data:`PIPELINE_COLUMNS` (``fwhm`` as
        ``fwhm_ztf``), ``source`` and ``problem``; ``attrs`` say what they mean. ``x, y``
        are 0-based difference-cutout pixels. An alert that cannot be measured is a NaN
        row flagged ``NO_DATA`` with the reason in ``problem``; nothing is raised for it.
        For a pandas input the index is the input's.
    """
    cfg = _config(config, gain)
    groups = groups if groups is not None else PSFGroups(cfg.group_keys)
    parts = list(_stream(_as_batches(alerts, chunk_size), cfg, groups, max_pending=np.inf))
    out = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    out = out.sort_values(_ROW, kind="stable").drop(columns=_ROW).reset_index(drop=True)
    if isinstance(alerts, pd.DataFrame):
        out.index = alerts.index
    out.attrs.update(table_meta(cfg))
    return out


def _prefetch(iterator):
    """Iterate in a thread one item ahead: the next batch is read and decoded (zlib and
    numpy release the GIL) while this one is measured."""
    items = queue.Queue(maxsize=1)
    stop = threading.Event()
    end = object()

    def run():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            items.put(err)
            return
        items.put(end)

    thread = threading.Thread(target=run, name="ztfpsf-alert-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def measure_files(paths, *, config=None, gain=None, groups=None, chunk_size=DEFAULT_CHUNK, max_pending=MAX_PENDING, on_error=None, timings=None):
    """Measure Avro/Parquet files of alerts as one stream (:func:`measure_stream`), read
    in batches of ``chunk_size`` one batch ahead in a thread; each file is read once.
    ``on_error(path, error)`` is told of a file that cannot be read (else it raises)."""
    batches = iter_batches(paths, chunk_size=chunk_size, on_error=on_error)
    yield from measure_stream(_prefetch(batches), config=config, gain=gain, groups=groups, max_pending=max_pending, timings=timings)
