"""Forced PSF photometry: the flux of a source at a given position with a known PSF.

For every position a stamp is cut around the nearest pixel, the PSF's shape there is
taken from the :class:`~ztfpsf.psf.PSFModel`, and ``flux`` and ``background`` (and,
with ``fit_position``, ``x, y``) are fitted with the shape held fixed: one batched
:func:`ztfpsf.fit_stamps` call for all positions (a linear problem without
``fit_position``: one or two iterations).

A position whose stamp is not fully inside the image, outside the PSF's region of
validity, or not finite gives a NaN row flagged ``OFF_IMAGE``; nothing is raised for one
bad position.
"""

import logging
import warnings

import numpy as np
from astropy.table import Table

from .fitting import fit_stamps
from .io.catalog import sky_to_pixel
from .stamps import cut
from .flags import Flag
from .psf import PSFModel

log = logging.getLogger(__name__)

__all__ = ["photometry", "positions_xy"]

_MAG_PER_LN = 2.5 / np.log(10.0)  # 1.0857: mag_err = 1.0857 * flux_err / flux


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

    Returns
    -------
    astropy.table.Table
        ``id, x_init, y_init, x, x_err, y, y_err, [ra, dec], flux, flux_err, background,
        background_err, fwhm`` (the PSF's there), ``mag, mag_err, chi2, dof, flags``.
        ``flux`` may be negative (a forced measurement of a faint or absent source);
        ``mag`` is NaN for ``flux <= 0``. ``x_err, y_err`` are 0 when not fitted.
        Positions that cannot be measured: NaN rows flagged ``OFF_IMAGE``.
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
    n = len(x)
    ny, nx = data.shape
    finite = np.isfinite(x) & np.isfinite(y)
    xs, ys = np.where(finite, x, 0.0), np.where(finite, y, 0.0)
    x0f, y0f = psf.stamp_origin(xs, ys, (size, size))
    inside = finite & (x0f >= 0) & (y0f >= 0) & (x0f + size <= nx) & (y0f + size <= ny) & psf.contains(xs, ys)
    idx = np.flatnonzero(inside)
    if idx.size < n:
        log.info("%d of %d positions off the image or outside the PSF's validity region: flagged OFF_IMAGE", n - idx.size, n)

    cols = {k: np.full(n, np.nan) for k in ("x", "x_err", "y", "y_err", "flux", "flux_err", "background", "background_err", "fwhm", "chi2")}
    dof = np.zeros(n, np.int32)
    flags = np.where(inside, 0, int(Flag.OFF_IMAGE)).astype(np.int64)
    if idx.size:
        x0, y0 = x0f[idx].astype(np.int64), y0f[idx].astype(np.int64)
        stamps = cut(data, x0, y0, size)
        m = None if mask is None else cut(mask, x0, y0, size, True)
        v = None if variance is None else cut(variance, x0, y0, size)
        shape = psf.shape(x[idx], y[idx])
        fixed = dict(shape)
        pos = {}
        if fit_position:
            pos = dict(x_init=x[idx], y_init=y[idx])
        else:
            fixed.update(x=x[idx], y=y[idx])
        with warnings.catch_warnings():
            if variance is None and gain is None:
                warnings.simplefilter("ignore")  # said once below, not per call
            t = fit_stamps(
                stamps, v, model=psf.model, mask=m, gain=gain if variance is None else None,
                read_noise=read_noise if variance is None else None, sky=sky, saturation=saturation,
                dtype=dtype, origin=np.stack([x0, y0], axis=1).astype(np.float64), fixed=fixed,
                max_shift=max_shift, backend=backend, chunk_size=chunk_size, **pos,
            )
        for k in ("x", "x_err", "y", "y_err", "flux", "flux_err", "background", "background_err", "chi2"):
            cols[k][idx] = t[k]
        if not fit_position:  # held fixed: the given values exactly (not via the fit's dtype)
            cols["x"][idx], cols["y"][idx] = x[idx], y[idx]
        cols["fwhm"][idx] = psf.fwhm(x[idx], y[idx])
        dof[idx] = t["dof"]
        flags[idx] = t["flags"]
    if variance is None and gain is None:
        warnings.warn("photometry without gain or variance: per-stamp border scatter used as the noise", stacklevel=2)

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
    elif ra is not None:
        out["ra"], out["dec"] = ra, dec
    for k in ("flux", "flux_err", "background", "background_err", "fwhm"):
        out[k] = cols[k]
    flux, ferr = cols["flux"], cols["flux_err"]
    pos_flux = np.isfinite(flux) & (flux > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if zeropoint is not None:
            out["mag"] = np.where(pos_flux, float(zeropoint) - 2.5 * np.log10(np.where(pos_flux, flux, 1.0)), np.nan)
            out["mag_err"] = np.where(pos_flux, _MAG_PER_LN * ferr / np.where(pos_flux, flux, 1.0), np.nan)
        else:
            out["mag"] = np.full(n, np.nan)
            out["mag_err"] = np.full(n, np.nan)
    out["chi2"] = cols["chi2"]
    out["dof"] = dof
    out["flags"] = flags.astype(np.int32)
    for c in ("x_init", "y_init", "x", "y", "x_err", "y_err"):
        out[c].unit = "pix"
    out.meta.update(
        psf_model=psf.model.name,
        psf_mode=psf.mode,
        psf_image=str(psf.meta.get("image", "")),
        fit_position=bool(fit_position),
        zeropoint=None if zeropoint is None else float(zeropoint),
        stamp=size,
        mag="zeropoint - 2.5 log10(flux); NaN for flux <= 0 or without a zero point",
        coordinates="0-based pixel coordinates, pixel centres at integers",
    )
    return out

