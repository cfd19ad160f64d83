"""The flux scale checked on the image: PSF against aperture magnitudes of bright stars.

A PSF flux is the flux within the PSF's ``flux_radius`` (7 px: ZTF's 14 px diameter
aperture, that of the header's ``APCOR6``). Aperture photometry of the bright, isolated,
unflagged stars in that same aperture (exact pixel overlap, photutils; each star's
fitted background subtracted) measures how well it holds on this image: the median of
``PSF - aperture`` magnitude (~0 when the model describes the stars out to the aperture)
and its trend with magnitude (a flux-dependent PSF, e.g. brighter-fatter, or a wrong
noise weighting shows as a slope). Host-side numpy; written to the summary and the PSF
file (``APCORR``...).
"""

import logging

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["aperture_check", "robust_sigma"]


def robust_sigma(values):
    """1.4826 x the median absolute deviation (NaN for no value)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(1.4826 * np.median(np.abs(v - np.median(v)))) if v.size else float("nan")


def aperture_fluxes(image, x, y, radius, background, mask=None):
    """Flux within circles of ``radius`` at (x, y) minus ``background`` x area; NaN where
    a masked, non-finite or off-image pixel has its centre inside (exact pixel overlap,
    photutils). Works on each aperture's cutout, not on copies of the whole image."""
    from photutils.aperture import CircularAperture

    x, y = np.atleast_1d(np.asarray(x, np.float64)), np.atleast_1d(np.asarray(y, np.float64))
    flux = np.full(x.shape, np.nan)
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.any():
        return flux
    masks = CircularAperture(np.column_stack([x[finite], y[finite]]), r=radius).to_mask(method="exact")
    for i, m in zip(np.flatnonzero(finite), masks if isinstance(masks, list) else [masks]):
        data = m.cutout(image, fill_value=np.nan)
        if data is None:  # entirely off the image
            continue
        data = np.asarray(data, np.float64)
        bad = ~np.isfinite(data)
        if mask is not None:
            bad |= np.asarray(m.cutout(np.asarray(mask, bool), fill_value=True), bool)
        iy, ix = np.ogrid[m.bbox.iymin: m.bbox.iymax, m.bbox.ixmin: m.bbox.ixmax]
        centre_inside = (ix - x[i]) ** 2 + (iy - y[i]) ** 2 <= radius**2
        if not (bad & centre_inside).any():
            flux[i] = np.sum(m.data * np.where(bad, 0.0, data))
    return flux - np.asarray(background, np.float64) * np.pi * radius**2


def aperture_check(image, table, radius, *, mask=None, min_snr=100.0, header_apcor=None):
    """PSF minus aperture magnitude of the bright unflagged stars of a result ``table``
    (``x, y, flux, flux_err, background, flags``).

    Returns ``apcorr`` (median, mag), ``apcorr_err`` (1.2533 robust sigma / sqrt(n)),
    ``apcorr_n``, ``apcorr_scatter`` (robust sigma, mag), ``apcorr_slope`` and
    ``apcorr_slope_err`` (mag per mag over the stars' magnitudes, least squares), the
    ``radius`` and the header's ``APCOR6`` when given; values None without enough stars.
    """
    flux = np.asarray(table["flux"], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = flux / np.asarray(table["flux_err"], dtype=np.float64)
    sel = (np.asarray(table["flags"]) == 0) & (snr >= min_snr) & (flux > 0)
    out = dict(radius=float(radius), apcorr=None, apcorr_err=None, apcorr_n=int(sel.sum()), apcorr_scatter=None,
               apcorr_slope=None, apcorr_slope_err=None, header_apcor=header_apcor)
    if sel.sum() < 5:
        return out
    ap = aperture_fluxes(image, np.asarray(table["x"])[sel], np.asarray(table["y"])[sel], radius,
                         np.asarray(table["background"])[sel], mask)
    ok = np.isfinite(ap) & (ap > 0)
    if ok.sum() < 5:
        return out
    mag = -2.5 * np.log10(flux[sel][ok])
    diff = mag - (-2.5 * np.log10(ap[ok]))
    sig = robust_sigma(diff)
    keep = np.abs(diff - np.median(diff)) < 5 * max(sig, 1e-4)  # a neighbour in the aperture
    A = np.column_stack([np.ones(keep.sum()), mag[keep] - np.median(mag[keep])])
    coef, *_ = np.linalg.lstsq(A, diff[keep], rcond=None)
    resid = diff[keep] - A @ coef
    cov = np.linalg.pinv(A.T @ A) * (np.sum(resid**2) / max(keep.sum() - 2, 1))
    out.update(apcorr=float(np.median(diff[keep])), apcorr_err=float(1.2533 * sig / np.sqrt(keep.sum())),
               apcorr_n=int(keep.sum()), apcorr_scatter=sig, apcorr_slope=float(coef[1]),
               apcorr_slope_err=float(np.sqrt(cov[1, 1])))
    return out
