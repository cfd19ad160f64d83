"""Forced PSF photometry: the flux of a source at a given position with a known PSF.

For every position a stamp is cut around the nearest pixel, the PSF there (analytic, or
hybrid with its residual surface) is taken from the :class:`~ztfpsf.psf.PSFModel`, and
``flux`` and ``background`` (and, with ``fit_position``, ``x, y``) are fitted with the PSF
held fixed: one batched call of :func:`ztfpsf.psf.measure.measure_stamps` for all
positions (a linear problem without ``fit_position``: one or two iterations). ``flux`` is
on the PSF's flux scale: the flux within its ``flux_radius`` (7 px by default).

A position whose stamp is not fully inside the image, or not finite, gives a NaN row
flagged ``OFF_IMAGE``; one outside the PSF's region of validity a NaN row flagged
``OUTSIDE_PSF``; nothing is raised for one bad position. A measured row is flagged
``POOR_FIT`` when its chi2 is above what the PSF allows and ``BLENDED`` when another
source (a catalogue neighbour, or a point source in the residual) shifts its flux
(:func:`_judge`, :mod:`ztfpsf.blends`).

With ``sources`` (``"detect"``: sep's detections on the image, or a catalogue of the
field) the positions are instead measured the way ``ztfpsf catalog`` measures every
source: grouped with the other sources near them (friends of friends) and fitted
together, the positions held, the neighbours' flux and position fitted
(:func:`ztfpsf.catalog.forced_groups`); the rows are the positions' only, their flags the
catalogue's (:mod:`ztfpsf.catalog`), with ``group_id, group_size`` added.
"""

import logging
import warnings

import numpy as np
from astropy.table import Table

from . import blends
from ._jax import with_x64
from .io.catalog import sky_to_pixel
from .stamps import cut
from .flags import Flag
from .psf import PSFModel
from .psf.measure import measure_stamps

log = logging.getLogger(__name__)

__all__ = ["photometry", "positions_xy", "magnitudes"]

_MAG_PER_LN = 2.5 / np.log(10.0)  # 1.0857: mag_err = 1.0857 * flux_err / flux


def magnitudes(flux, flux_err, zeropoint):
    """``mag = zeropoint - 2.5 log10(flux)`` and ``mag_err = 1.0857 flux_err / flux``; NaN
    for ``flux <= 0`` or without a zero point."""
    flux, flux_err = np.asarray(flux, np.float64), np.asarray(flux_err, np.float64)
    pos = np.isfinite(flux) & (flux > 0)
    if zeropoint is None:
        return np.full(flux.shape, np.nan), np.full(flux.shape, np.nan)
    safe = np.where(pos, flux, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(pos, float(zeropoint) - 2.5 * np.log10(safe), np.nan),
                np.where(pos, _MAG_PER_LN * flux_err / safe, np.nan))


def _names(table):
    """Column names of a Table, DataFrame or dict."""
    if hasattr(table, "colnames"):
        return list(table.colnames)
    if hasattr(table, "columns"):
        return list(table.columns)
    return list(table.keys())


def _column(table, name):
    return np.asarray(table[name], dtype=np.float64) if name in _names(table) else None


def positions_xy(positions, wcs=None):
    """``(id, x, y, ra, dec)`` arrays from a table / dict / DataFrame / ``(N, 2)`` x, y array.

    Pixel ``x, y`` columns are used when present; else ``ra, dec`` [deg] are projected with
    ``wcs`` (astropy WCS, 0-based pixels). ``ra, dec`` are None when not available.
    """
    if isinstance(positions, np.ndarray) or isinstance(positions, (list, tuple)):
        arr = np.asarray(positions, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"positions as an array must have shape (N, 2) [x, y]; got {arr.shape}")
        return np.arange(len(arr)), arr[:, 0].copy(), arr[:, 1].copy(), None, None
    x, y = _column(positions, "x"), _column(positions, "y")
    ra, dec = _column(positions, "ra"), _column(positions, "dec")
    if x is None or y is None:
        if ra is None or dec is None:
            raise ValueError("positions need columns x, y (pixels) or ra, dec (degrees)")
        if wcs is None:
            raise ValueError("positions are ra, dec but no WCS is available to project them: give x, y or an image with a WCS")
        x, y = sky_to_pixel(ra, dec, wcs)  # ICRS ra/dec, whatever the WCS's frame
    ident = np.asarray(positions["id"]) if "id" in _names(positions) else np.arange(len(x))
    return ident, x, y, ra, dec


def _exposure_parts(image):
    """data, mask, wcs, gain, read_noise, zeropoint, saturation from an array or an Exposure."""
    if hasattr(image, "data") and not isinstance(image, np.ndarray):
        get = lambda name: getattr(image, name, None)
        return (np.asarray(image.data), get("mask"), get("wcs"), get("gain"), get("read_noise"),
                get("zeropoint"), get("saturation"))
    return np.asarray(image), None, None, None, None, None, None


def _neighbours(table, wcs, zeropoint, x, y, flux):
    """``(x, y, flux)`` of the sources that may blend with the measured ones: the measured
    positions (their fluxes) and the ``neighbours`` catalogue less its entries within
    0.5 px of a position (those are the positions themselves)."""
    nflux = np.clip(np.nan_to_num(flux), 0.0, None)
    if table is None:
        return x, y, nflux
    _, cx, cy, _, _ = positions_xy(table, wcs)
    names = _names(table)
    if "flux" in names:
        cf = _column(table, "flux")
    elif "mag" in names and zeropoint is not None:
        cf = 10 ** (-0.4 * (_column(table, "mag") - float(zeropoint)))
    else:
        raise ValueError("neighbours need a flux column [ADU], or mag with a zero point")
    if len(x) and len(cx):
        from scipy.spatial import cKDTree

        d, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([np.nan_to_num(cx, nan=-1e9), np.nan_to_num(cy, nan=-1e9)]))
        keep = d > 0.5
        cx, cy, cf = cx[keep], cy[keep], cf[keep]
    return np.concatenate([x, cx]), np.concatenate([y, cy]), np.concatenate([nflux, cf])


def _judge(psf, origin, stamps, mask, variance, saturation, noise, res, neighbours):
    """``POOR_FIT`` and ``BLENDED`` bits (:mod:`ztfpsf.blends`) of measured rows, from the
    result columns ``res`` (x, y, flux, flux_err, background, chi2, dof), the stamps
    (with their mask and variance, or ``noise = (gain, read_noise, sky)``) and the PSF;
    ``neighbours``: ``(x, y, flux)`` of the catalogue sources."""
    from .fitting.api import border_variance
    from .psf.measure import usable_pixels

    size = stamps.shape[1]
    flux, err = res["flux"], res["flux_err"]
    ok = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    x = np.where(ok, res["x"], origin[:, 0] + size // 2)
    y = np.where(ok, res["y"], origin[:, 1] + size // 2)
    usable, _ = usable_pixels(stamps, mask, saturation, variance)
    data = np.where(usable, stamps, 0.0)
    p = blends.render(psf, x, y, origin[:, 0], origin[:, 1], size, reach=size // 2)
    model = np.nan_to_num(flux)[:, None, None] * p + np.nan_to_num(res["background"])[:, None, None]
    gain, read_noise, sky = noise
    if variance is not None:
        var = variance
    elif gain is not None:
        var = (np.maximum(model, 0.0) + sky) / gain + (np.nan_to_num(read_noise) / gain) ** 2
    else:
        var = np.broadcast_to(np.asarray(border_variance(data, usable)), data.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        weight = np.where(usable & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0)
        snr = flux / err
    c = blends.flux_response(p, weight)
    centre = np.column_stack([x, y]) - origin
    found = blends.residual_sources(np.where(usable, data - model, 0.0), weight, p, centre, 1.5 * psf.fwhm(x, y, extrapolate=True), snr)
    shifts = (blends.residual_shift(psf, found, origin, c, size), blends.catalogue_shift(psf, x, y, origin, c, size, *neighbours))
    blended = np.any([np.abs(s) > blends.SHIFT_SIGMA * err for s in shifts], axis=0)
    bits = np.where(blends.poor_fit(res["chi2"], res["dof"], snr), int(Flag.POOR_FIT), 0) | np.where(blended, int(Flag.BLENDED), 0)
    return np.where(ok, bits, 0).astype(np.int64)


@with_x64  # the PSF model's shape evaluation too, whatever the host's JAX setting
def photometry(
    image,
    psf,
    positions,
    *,
    fit_position=False,
    gain=None,
    read_noise=None,
    zeropoint=None,
    saturation=None,
    mask=None,
    variance=None,
    sky=0.0,
    wcs=None,
    stamp=17,
    dtype="float32",
    max_shift=2.0,
    backend="auto",
    chunk_size=None,
    neighbours=None,
    sources=None,
    options=None,
):
    """Forced PSF photometry at ``positions`` on ``image`` with the PSF ``psf``.

    Parameters
    ----------
    image : 2-D array or Exposure
        Pixels in ADU (sky not subtracted: a background is fitted per stamp). An
        Exposure (:func:`ztfpsf.io.fits.read_exposure`) also provides mask, WCS, gain,
        read noise, zero point and saturation; explicit arguments take precedence.
    psf : PSFModel or path of a PSF file
    positions : Table, dict, DataFrame or (N, 2) array
        ``x, y`` image pixel coordinates (0-based, centres at integers) or ``ra, dec``
        [deg] with a WCS; an ``id`` column is carried through.
    fit_position : bool
        Fit ``x, y`` too (starting at the given position); else they are held fixed.
    gain, read_noise : float
        [e-/ADU], [e-]: model-based per-pixel variance (see :func:`ztfpsf.fit_stamps`).
        Without them and without ``variance``, each stamp's border scatter is used.
    zeropoint : float, optional
        Magnitude zero point (ZTF ``MAGZP``): ``mag = zeropoint - 2.5 log10(flux)``.
        Without one, ``mag`` and ``mag_err`` are NaN.
    saturation : float, optional
        Pixels at or above are not used (flag ``SATURATED``).
    mask : bool array like ``image``, optional
        True where a pixel must not be used.
    variance : array like ``image``, optional
        Per-pixel variance [ADU**2] instead of the gain-based model.
    sky : float
        Sky level already subtracted from the image [ADU] (adds its Poisson noise).
    wcs : astropy.wcs.WCS, optional
        To project ``ra, dec`` positions and report ``ra, dec`` of the results.
    stamp : int
        Stamp size [px] (odd); the stamp is centred on the pixel nearest the position.
    max_shift : float
        With ``fit_position``: flag ``CENTER_SHIFT`` beyond this shift [px].
    neighbours : Table, dict or DataFrame, optional
        Other sources of the field (``x, y`` or ``ra, dec``, and ``flux`` [ADU] or ``mag``
        with a zero point), e.g. the full catalogue: a row whose flux their light shifts by
        more than half its error is flagged ``BLENDED``. The positions themselves, with
        their measured fluxes, always count as neighbours of each other.
    sources : "detect", Table, dict or DataFrame, optional
        Measure the positions together with the image's other sources, grouped and
        fitted as by ``ztfpsf catalog`` (:func:`ztfpsf.catalog.forced_groups`):
        ``"detect"`` for sep's detections, or a catalogue of ``x, y`` or ``ra, dec``
        (fluxes not needed: they are fitted). A source within 0.5 FWHM of a position is
        that position's own. Each group's window replaces the stamp (``stamp`` and
        ``chunk_size`` unused); the noise is the sky measured on the image plus the
        sources' Poisson noise with the gain (``variance`` and ``neighbours`` cannot be
        given with it; ``sky`` is not needed); with ``fit_position`` the positions have a 1 px prior around the
        given ones. Flags are the catalogue's: ``BLENDED`` another fitted source within 1
        FWHM, ``NEIGHBOUR``, ``POOR_FIT`` over the position's fit disc, ...; a position
        whose fit disc leaves the image is a NaN row flagged ``OFF_IMAGE``.
    options : ztfpsf.catalog.CatalogOptions, optional
        With ``sources``: linking length, fit radius, passes, ``redetect`` ... (its
        ``max_shift`` is replaced by ``max_shift``).

    Returns
    -------
    astropy.table.Table
        ``id, x_init, y_init, x, x_err, y, y_err, [ra, dec], flux, flux_err, background,
        background_err, fwhm`` (the PSF's there), ``mag, mag_err, chi2, dof, flags``.
        ``flux`` may be negative (a forced measurement of a faint or absent source);
        ``mag`` is NaN for ``flux <= 0``. ``x_err, y_err`` are 0 when not fitted.
        Positions that cannot be measured: NaN rows flagged ``OFF_IMAGE`` (off the
        image) or ``OUTSIDE_PSF`` (outside the PSF's region of validity). With
        ``sources``, also ``group_id, group_size`` (the group the position was fitted
        in, and its members: the position and its neighbours), and ``chi2, dof`` are
        over the position's fit disc (``fit_radius`` FWHM).
    """
    data, e_mask, e_wcs, e_gain, e_rn, e_zp, e_sat = _exposure_parts(image)
    if data.ndim != 2:
        raise ValueError(f"image must be 2-D; got shape {data.shape}")
    mask = e_mask if mask is None else mask
    wcs = e_wcs if wcs is None else wcs
    zeropoint = e_zp if zeropoint is None else zeropoint
    saturation = e_sat if saturation is None else saturation
    if gain is None and variance is None:
        gain, read_noise = e_gain, (e_rn if read_noise is None else read_noise)
    if not isinstance(psf, PSFModel):
        psf = PSFModel.read(psf)
    size = int(stamp)
    if size < 3 or size % 2 == 0:
        raise ValueError(f"stamp must be an odd size >= 3; got {stamp}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != data.shape:
            raise ValueError(f"mask must have the image's shape {data.shape}; got {mask.shape}")
        mask = mask.astype(bool)
    if variance is not None:
        variance = np.asarray(variance, dtype=np.float64)
        if variance.shape != data.shape:
            raise ValueError(f"variance must have the image's shape {data.shape}; got {variance.shape}")

    ident, x, y, ra, dec = positions_xy(positions, wcs)
    if sources is not None:
        if variance is not None or neighbours is not None:
            raise ValueError("sources= (neighbours fitted together) takes no variance= or neighbours=: "
                             "its noise is the image's measured sky, its neighbours are fitted")
        if sky and options is not None and options.noise == "header":
            raise ValueError("sky= with sources= needs noise='measured' (the sky noise measured on the image)")
        exposure = _exposure(image, data, mask, wcs, gain, read_noise, zeropoint, saturation)
        return _grouped(exposure, psf, positions, (ident, x, y, ra, dec), sources, fit_position, max_shift, dtype,
                        backend, options)
    n = len(x)
    ny, nx = data.shape
    finite = np.isfinite(x) & np.isfinite(y)
    xs, ys = np.where(finite, x, 0.0), np.where(finite, y, 0.0)
    x0f, y0f = psf.stamp_origin(xs, ys, (size, size))
    on_image = finite & (x0f >= 0) & (y0f >= 0) & (x0f + size <= nx) & (y0f + size <= ny)
    in_psf = finite & psf.contains(xs, ys)
    inside = on_image & in_psf
    idx = np.flatnonzero(inside)
    if idx.size < n:
        log.info("%d of %d positions off the image (OFF_IMAGE), %d outside the PSF's validity region (OUTSIDE_PSF)",
                 int((~on_image).sum()), n, int((on_image & ~in_psf).sum()))

    cols = {k: np.full(n, np.nan) for k in ("x", "x_err", "y", "y_err", "flux", "flux_err", "background", "background_err", "fwhm", "chi2")}
    dof = np.zeros(n, np.int32)
    flags = np.where(on_image, 0, int(Flag.OFF_IMAGE)) | np.where(in_psf | ~on_image, 0, int(Flag.OUTSIDE_PSF))
    flags = flags.astype(np.int64)
    if idx.size:
        x0, y0 = x0f[idx].astype(np.int64), y0f[idx].astype(np.int64)
        stamps = cut(data, x0, y0, size)
        m = None if mask is None else cut(mask, x0, y0, size, True)
        v = None if variance is None else cut(variance, x0, y0, size)
        with warnings.catch_warnings():
            if variance is None and gain is None:
                warnings.simplefilter("ignore")  # said once below, not per call
            t = measure_stamps(
                psf, stamps, np.stack([x0, y0], axis=1).astype(np.float64), x[idx], y[idx], mask=m, variance=v,
                gain=gain if variance is None else None, read_noise=read_noise if variance is None else None, sky=sky,
                saturation=saturation, fit_position=fit_position, max_shift=max_shift, dtype=dtype, backend=backend,
                chunk=chunk_size,
            )
        for k in ("x", "x_err", "y", "y_err", "flux", "flux_err", "background", "background_err", "chi2"):
            cols[k][idx] = t[k]
        if not fit_position:  # held fixed: the given values exactly, error 0
            cols["x"][idx], cols["y"][idx] = x[idx], y[idx]
            cols["x_err"][idx], cols["y_err"][idx] = 0.0, 0.0
        cols["fwhm"][idx] = psf.fwhm(x[idx], y[idx])
        dof[idx] = t["dof"]
        flags[idx] = t["flags"] | np.where(psf.supported(x[idx], y[idx]), 0, int(Flag.EXTRAPOLATED))
        cat = _neighbours(neighbours, wcs, zeropoint, x[idx], y[idx], cols["flux"][idx])
        res = {k: cols[k][idx] for k in ("x", "y", "flux", "flux_err", "background", "chi2")}
        flags[idx] |= _judge(psf, np.stack([x0, y0], axis=1), stamps, m, v, saturation, (gain, read_noise, sky),
                             dict(res, dof=dof[idx]), cat)
    if variance is None and gain is None:
        warnings.warn("photometry without gain or variance: per-stamp border scatter used as the noise", stacklevel=2)

    out = _output(ident, x, y, (ra, dec), wcs, cols, dof, flags, zeropoint)
    out.meta.update(_meta(psf, fit_position, zeropoint), stamp=size)
    return out


def _meta(psf, fit_position, zeropoint):
    """The output table's metadata common to both ways of measuring."""
    return dict(
        psf_model=psf.model.name,
        psf_mode=psf.mode,
        psf_image=str(psf.meta.get("image", "")),
        fit_position=bool(fit_position),
        zeropoint=None if zeropoint is None else float(zeropoint),
        mag="zeropoint - 2.5 log10(flux); NaN for flux <= 0 or without a zero point",
        coordinates="0-based pixel coordinates, pixel centres at integers",
    )


def _output(ident, x, y, radec, wcs, cols, dof, flags, zeropoint):
    """The output table's columns (see :func:`photometry`) from the result ``cols``;
    ``ra, dec`` from the fitted position with a WCS, else ``radec`` as given (if any)."""
    n = len(x)
    out = Table()
    out["id"] = ident
    out["x_init"], out["y_init"] = x, y
    for k in ("x", "x_err", "y", "y_err"):
        out[k] = cols[k]
    if wcs is not None:
        ok = np.isfinite(cols["x"])
        r, d = (np.full(n, np.nan) for _ in range(2))
        if ok.any():
            rr, dd = wcs.pixel_to_world_values(cols["x"][ok], cols["y"][ok])
            r[ok], d[ok] = rr, dd
        out["ra"], out["dec"] = r, d
    elif radec[0] is not None:
        out["ra"], out["dec"] = radec
    for k in ("flux", "flux_err", "background", "background_err", "fwhm"):
        out[k] = cols[k]
    out["mag"], out["mag_err"] = magnitudes(cols["flux"], cols["flux_err"], zeropoint)
    out["chi2"] = cols["chi2"]
    out["dof"] = dof
    out["flags"] = flags.astype(np.int32)
    for c in ("x_init", "y_init", "x", "y", "x_err", "y_err"):
        out[c].unit = "pix"
    return out


def _exposure(image, data, mask, wcs, gain, read_noise, zeropoint, saturation):
    """An :class:`~ztfpsf.io.fits.Exposure` for the group fit from photometry's arguments
    (an Exposure given keeps its path and header; explicit arguments take precedence)."""
    from dataclasses import replace
    from pathlib import Path

    from .io.fits import Exposure

    bad = ~np.isfinite(data) if mask is None else (np.asarray(mask, bool) | ~np.isfinite(data))
    with np.errstate(invalid="ignore"):
        sat = np.zeros(data.shape, bool) if saturation is None else np.nan_to_num(data) >= saturation
    kw = dict(data=data, mask=bad, saturated=sat, wcs=wcs, gain=gain, read_noise=read_noise, zeropoint=zeropoint,
              saturation=saturation)
    return replace(image, **kw) if isinstance(image, Exposure) else Exposure(path=Path("image"), **kw)


def _grouped(exposure, psf, positions, parsed, sources, fit_position, max_shift, dtype, backend, options):
    """:func:`photometry` with ``sources``: :func:`ztfpsf.catalog.forced_groups`, its rows
    in photometry's columns (plus ``group_id, group_size``); a position whose fit disc
    leaves the image is a NaN row (``OFF_IMAGE``), as a stamp that does."""
    from dataclasses import replace

    from .catalog import CatalogOptions, forced_groups
    from .flags import BAD

    ident, x, y, ra, dec = parsed
    opt = replace(options or CatalogOptions(), max_shift=float(max_shift), dtype=dtype, backend=backend)
    t = forced_groups(exposure, psf, positions, sources, fit_position=fit_position, options=opt)
    flags = np.asarray(t["flags"], np.int64)
    gone = (flags & int(BAD | Flag.OFF_IMAGE)) != 0
    cols = {k: np.where(gone, np.nan, np.asarray(t[k], np.float64))
            for k in ("x", "x_err", "y", "y_err", "flux", "flux_err", "background", "background_err", "chi2")}
    measured = np.isfinite(cols["x"]) & np.isfinite(cols["y"])
    cols["fwhm"] = np.full(len(x), np.nan)
    cols["fwhm"][measured] = psf.fwhm(cols["x"][measured], cols["y"][measured])
    dof = np.where(gone, 0, np.asarray(t["dof"])).astype(np.int32)
    out = _output(ident, x, y, (ra, dec), exposure.wcs, cols, dof, flags, exposure.zeropoint)
    out["group_id"], out["group_size"] = np.where(gone, -1, t["group_id"]), np.where(gone, 0, t["group_size"])
    out.meta.update(
        _meta(psf, fit_position, exposure.zeropoint),
        grouped=True, fit_radius=opt.fit_radius, link=opt.link, fwhm=t.meta["fwhm"],
        n_groups=t.meta["n_groups"], n_other_sources=t.meta["n_other_sources"], other_sources=t.meta["other_sources"],
        group="group_id, group_size: the group the position was fitted in (the position and its neighbours); "
              "chi2, dof over the position's fit disc",
    )
    log.info("%d positions fitted with %d other sources in %d groups: %d unflagged", len(out), t.meta["n_other_sources"],
             t.meta["n_groups"], int(np.sum(flags == 0)))
    return out
