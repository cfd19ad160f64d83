"""Choose the stars worth fitting: isolated, away from the edges, in a useful brightness
range, with clean cores. Defaults are those of the ZTF study (see the docs of
:func:`select_stars`); every cut is configurable, logged, and counted.
"""

import logging
import warnings
from collections import OrderedDict

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from .io.catalog import on_image
from .stamps import core_offsets, stamp_origin

log = logging.getLogger(__name__)

__all__ = ["select_stars", "EmptySelectionWarning", "SELECTION_COLUMNS", "isolation_radius_px"]

#: Columns of every selection table (then the catalogue's other columns).
SELECTION_COLUMNS = ("id", "ra", "dec", "mag", "x_init", "y_init", "snr", "peak", "nearest")

#: Pixel scale assumed when an image has none [arcsec/px]: ZTF's (1.01"), to the percent.
ASSUMED_PIXEL_SCALE = 1.0


class EmptySelectionWarning(UserWarning):
    """No star survived the selection."""


def isolation_radius_px(isolation, exposure, isolation_px=None):
    """Isolation radius in pixels and how it was obtained.

    ``isolation`` is in arcsec, converted with ``exposure.pixel_scale``. Without a pixel
    scale (no celestial WCS, no ``--pixel-scale``) 1"/px is assumed (ZTF has 1.01"/px, so
    the ZTF-tuned default of 20" stays 20 px) and a warning says so; ``isolation_px``
    overrides both."""
    if isolation_px is not None:
        return float(isolation_px), f"{isolation_px:g} px (given in pixels)"
    if exposure.pixel_scale:
        r = isolation / exposure.pixel_scale
        return r, f'{isolation:g}" = {r:.1f} px at {exposure.pixel_scale:.3f}"/px'
    px = isolation / ASSUMED_PIXEL_SCALE
    msg = f'{exposure.name}: pixel scale unknown: isolation radius {isolation:g}" taken as {px:g} px (1"/px assumed)'
    log.warning(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)
    return isolation / ASSUMED_PIXEL_SCALE, f'{isolation:g}" = {isolation:g} px (pixel scale unknown, 1"/px assumed)'


def _nearest_distance(x_all, y_all, idx):
    """Distance [px] from each source ``idx`` to its nearest other source (inf if alone)."""
    finite = np.isfinite(x_all) & np.isfinite(y_all)
    pos = np.stack([x_all[finite], y_all[finite]], axis=1)
    out = np.full(len(idx), np.inf)
    if len(idx) == 0 or len(pos) < 2:
        return out
    tree = cKDTree(pos)
    d, _ = tree.query(np.stack([x_all[idx], y_all[idx]], axis=1), k=2)
    # the first neighbour is the source itself (distance 0); an exact duplicate also gives 0
    return d[:, 1]


def _peak_and_core(exposure, x, y, core_radius):
    """Highest pixel in the core disc and whether any core pixel is masked/saturated."""
    ny, nx = exposure.data.shape
    cx, cy = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
    dy, dx = core_offsets(core_radius)
    rows, cols = cy[:, None] + dy, cx[:, None] + dx
    inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    r, c = np.clip(rows, 0, ny - 1), np.clip(cols, 0, nx - 1)
    bad = exposure.mask[r, c] | exposure.saturated[r, c] | ~inside
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        peak = np.nanmax(np.where(inside & ~exposure.mask[r, c], exposure.data[r, c], np.nan), axis=1) if len(x) else np.zeros(0)
    return peak, bad.any(axis=1)


def _magnitude_cut(cat, idx, mag_kind, mag_range, min_snr, peak, bright_limit):
    """Keep mask over ``idx`` and the rule used.

    Calibrated magnitudes: ``mag_range[0] <= mag <= mag_range[1]`` (stars without a
    magnitude go). Instrumental or no magnitudes: the same two ends by other means: the
    faint end ``snr >= min_snr`` (when the table has ``snr``), the bright end a core peak
    (above the local sky) at most ``bright_limit`` (see :func:`select_stars`).
    """
    if mag_kind == "calibrated" and mag_range is not None:
        mag = np.asarray(cat["mag"], dtype=float)[idx]
        with np.errstate(invalid="ignore"):
            keep = (mag >= mag_range[0]) & (mag <= mag_range[1])
        return keep, f"{mag_range[0]:g} <= mag <= {mag_range[1]:g}"
    keep = np.ones(len(idx), bool)
    rules = []
    snr = np.asarray(cat["snr"], dtype=float)[idx] if "snr" in cat.colnames else np.full(len(idx), np.nan)
    if min_snr is not None and np.isfinite(snr).any():
        with np.errstate(invalid="ignore"):
            keep &= snr >= min_snr
        rules.append(f"snr >= {min_snr:g}")
    if bright_limit is not None and np.isfinite(bright_limit):
        with np.errstate(invalid="ignore"):
            keep &= ~(peak > bright_limit)
        rules.append(f"core peak above sky <= {bright_limit:.4g}")
    return keep, (" and ".join(rules) or "none (no calibrated magnitudes, no snr)") + f" ({mag_kind or 'no'} magnitudes)"


def _bright_limit(exposure, sky, peak_fraction):
    """Peak (above sky) beyond which a star is too bright: ``peak_fraction`` of the way
    from the sky to the saturation level, or to the image maximum when saturation is
    unknown (the brightest stars of an image usually define its saturation plateau)."""
    if peak_fraction is None:
        return None, None
    if exposure.saturation is not None:
        top, what = exposure.saturation, "saturation"
    else:
        usable = exposure.data[~exposure.mask]
        if usable.size == 0:
            return None, None
        top, what = float(np.max(usable)), "image maximum"
    return peak_fraction * (top - sky), what


def select_stars(
    catalog,
    exposure,
    *,
    mag_range=(14.0, 18.0),
    isolation=20.0,
    isolation_px=None,
    edge=15,
    stamp=17,
    core_radius=3,
    min_snr=20.0,
    peak_fraction=0.8,
    stellar=True,
    sky=None,
):
    """Apply the selection cuts; return ``(table, counts)``.

    Cuts, in order (``counts`` holds the number left after each, in this order):

    ``catalog``
        every source of ``catalog`` (from :func:`ztfpsf.io.catalog.read_catalog` or
        :func:`ztfpsf.detect.detect_stars`).
    ``on_image``
        position on the image.
    ``edge``
        at least ``edge`` px from every edge (``edge <= x <= nx - 1 - edge``); 15 px keeps
        a 17 px stamp (plus a margin) inside the image.
    ``isolated``
        no other source of the *full* catalogue (faint ones and those just off the image
        included) within ``isolation`` arcsec (20": 5x the largest ZTF seeing), converted
        with the pixel scale; see :func:`isolation_radius_px` for images without one.
    ``magnitude``
        calibrated magnitudes (``catalog.meta['mag_kind'] == 'calibrated'``, e.g. Gaia G or
        detections on an image with a zero point): ``mag_range`` (14-18, where ZTF stars are
        neither saturated nor noisy). Otherwise the same two ends by other means: faint end
        ``snr >= min_snr`` (20), bright end a core peak above the sky of at most
        ``peak_fraction`` (0.8) of the way to the saturation level (or to the image maximum
        when saturation is unknown: photographic plates and sep's image saturate near it).
    ``stellar``
        ``catalog['stellar']`` when the table has it (detections: star-like size and shape)
        and ``stellar`` is True; otherwise nothing is cut.
    ``clean``
        no masked or saturated pixel within ``core_radius`` px of the star's pixel, and the
        whole ``stamp`` inside the image.

    Parameters
    ----------
    sky : float, optional
        Sky level for the bright-end rule (default: the median of the usable pixels).

    Returns
    -------
    table : astropy.table.Table
        ``id, ra, dec, mag, x_init, y_init, snr, peak`` (core peak above the sky),
        ``nearest`` (distance to the nearest other source [px]), then the catalogue's
        other columns. Empty (with these columns) and an :class:`EmptySelectionWarning`
        when no star survives. ``meta``: ``counts``, ``rules`` (each cut in words),
        ``isolation_px``.
    counts : OrderedDict
    """
    ny, nx = exposure.data.shape
    x_all = np.asarray(catalog["x"], dtype=float)
    y_all = np.asarray(catalog["y"], dtype=float)
    counts, rules = OrderedDict(), OrderedDict()
    idx = np.arange(len(catalog))

    def cut(name, keep, rule):
        nonlocal idx
        before = len(idx)
        idx = idx[keep]
        counts[name], rules[name] = len(idx), rule
        log.info("%s: selection %-9s %6d -> %6d  (%s)", exposure.name, name, before, len(idx), rule)

    counts["catalog"], rules["catalog"] = len(idx), catalog.meta.get("catalog", catalog.meta.get("method", "table"))
    log.info("%s: selection %-9s %6d", exposure.name, "catalog", len(idx))
    cut("on_image", on_image(x_all, y_all, (ny, nx)), f"on the {nx}x{ny} image")
    x, y = x_all[idx], y_all[idx]
    cut("edge", (x >= edge) & (x <= nx - 1 - edge) & (y >= edge) & (y <= ny - 1 - edge), f">= {edge} px from the edges")
    radius, how = isolation_radius_px(isolation, exposure, isolation_px)
    nearest_all = np.full(len(catalog), np.nan)
    nearest = _nearest_distance(x_all, y_all, idx)
    nearest_all[idx] = nearest
    cut("isolated", nearest > radius, f"no other source within {how} (full catalogue, {len(catalog)} sources)")

    if sky is None:
        usable = exposure.data[~exposure.mask]
        sky = float(np.median(usable)) if usable.size else 0.0
    peak, dirty = _peak_and_core(exposure, x_all[idx], y_all[idx], core_radius)
    peak_all = np.full(len(catalog), np.nan)
    peak_all[idx] = peak - sky
    dirty_all = np.zeros(len(catalog), bool)
    dirty_all[idx] = dirty
    limit, what = _bright_limit(exposure, sky, peak_fraction)
    mag_kind = catalog.meta.get("mag_kind")
    keep, rule = _magnitude_cut(catalog, idx, mag_kind, mag_range, min_snr, peak_all[idx], limit)
    if what and "peak" in rule:
        rule += f"; bright limit {peak_fraction:g} x ({what} - sky)"
    cut("magnitude", keep, rule)
    if stellar and "stellar" in catalog.colnames:
        cut("stellar", np.asarray(catalog["stellar"], bool)[idx], "star-like size and shape (detections)")
    else:
        cut("stellar", np.ones(len(idx), bool), "not applied (no 'stellar' column)" if stellar else "not applied (disabled)")
    x0, y0 = stamp_origin(x_all[idx], y_all[idx], stamp)
    stamp_inside = (x0 >= 0) & (x0 + stamp <= nx) & (y0 >= 0) & (y0 + stamp <= ny)
    rule = f"no masked/saturated pixel within {core_radius:g} px; {stamp}x{stamp} stamp inside the image"
    cut("clean", ~dirty_all[idx] & stamp_inside, rule)

    table = _selection_table(catalog, idx, peak_all, nearest_all)
    table.meta.update(counts=dict(counts), rules=dict(rules), isolation_px=radius, stamp=stamp, mag_kind=mag_kind)
    if len(idx) == 0:
        msg = f"{exposure.name}: no star left after the selection ({', '.join(f'{k} {v}' for k, v in counts.items())})"
        log.warning(msg)
        warnings.warn(msg, EmptySelectionWarning, stacklevel=2)
    return table, counts


def _selection_table(catalog, idx, peak_all, nearest_all):
    t = Table()
    n = len(catalog)
    if "id" in catalog.colnames:
        t["id"] = catalog["id"][idx]
    else:
        t["id"] = np.arange(n, dtype=np.int64)[idx]
    for name in ("ra", "dec", "mag"):
        t[name] = np.asarray(catalog[name], dtype=float)[idx] if name in catalog.colnames else np.full(len(idx), np.nan)
    t["x_init"] = np.asarray(catalog["x"], dtype=float)[idx]
    t["y_init"] = np.asarray(catalog["y"], dtype=float)[idx]
    t["snr"] = np.asarray(catalog["snr"], dtype=float)[idx] if "snr" in catalog.colnames else np.full(len(idx), np.nan)
    t["peak"] = peak_all[idx]
    t["nearest"] = nearest_all[idx]
    for name, unit in (("ra", "deg"), ("dec", "deg"), ("mag", "mag"), ("x_init", "pix"), ("y_init", "pix"), ("nearest", "pix")):
        t[name].unit = unit
    for name in catalog.colnames:
        if name not in t.colnames and name not in ("x", "y"):
            t[name] = catalog[name][idx]
    return t
