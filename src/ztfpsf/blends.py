"""Is a forced measurement clean? Its chi2 against what the PSF allows, and its neighbours.

Two warning bits for every measured row of :func:`ztfpsf.photometry` (values are kept):

``POOR_FIT``
    chi2/dof above ``1 + 5 sqrt(2/dof)`` (five sigma of the chi2 distribution of a right
    model) plus ``(eps S/N)^2 / dof``: the chi2 a PSF model with a fractional error ``eps``
    leaves on a star of signal-to-noise S/N (bright stars reveal any PSF's imperfection).
``BLENDED``
    another source whose light shifts the measured flux by more than half its error. The
    shift is predicted with the flux estimator's response to light in each pixel (the
    weighted least-squares row of flux, background fitted beside it): for catalogue
    neighbours, whose fluxes are known, and for point sources found in the residual off
    the centre (a PSF-matched filter of ``(data - model) / variance``, at >= 5 sigma, more
    for bright stars), whose amplitude is measured there. A neighbour within ~1.5 FWHM
    merges with the star and shows only through a catalogue: give one where blends matter.

Measured on a simulated 1024x1024 image (2,000 stars of mag 12-21, 1,181 positions at mag
14-20, the true PSF; ``tests/test_photometry.py``): before, every row had ``flags == 0``
and the flux pull std was 67; with these bits the unflagged rows have a pull std ~1.
"""

import numpy as np

__all__ = ["PSF_ERROR", "render", "flux_response", "poor_fit", "residual_sources", "catalogue_shift", "residual_shift"]

#: Fractional error allowed to a PSF model (chi2 allowance of bright stars).
PSF_ERROR = 0.03
#: Significance of a point source in the residual, and the flux shift (in units of the flux
#: error) from which a neighbour is a blend.
DETECT_SIGMA = 5.0
SHIFT_SIGMA = 0.5
_CHUNK = 1024  # stars rendered at once (a (chunk, size + 2 reach)^2 array)


def render(psf, x, y, x0, y0, size, reach):
    """Unit-flux PSF images ``(N, size, size)`` of stars at image ``(x, y)`` on the stamps
    whose pixel [0, 0] is at integer ``(x0, y0)``: rendered by ``psf.stamp`` on a
    ``size + 2 reach`` stamp around each star and sliced, so a star may be up to ``reach``
    px (per axis) from its stamp's centre pixel."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x0, y0 = np.asarray(x0, np.int64), np.asarray(y0, np.int64)
    big = int(size) + 2 * int(reach)
    out = np.zeros((x.size, size, size))
    offsets = np.arange(size)
    for s in range(0, x.size, _CHUNK):
        e = min(s + _CHUNK, x.size)
        img, (bx0, by0) = psf.stamp(x[s:e], y[s:e], (big, big), return_origin=True, extrapolate=True)
        img = np.asarray(img, np.float64).reshape(e - s, big, big)
        ox = np.clip(x0[s:e] - np.asarray(bx0, np.int64).reshape(-1), 0, big - size)
        oy = np.clip(y0[s:e] - np.asarray(by0, np.int64).reshape(-1), 0, big - size)
        rows = (oy[:, None] + offsets)[:, :, None]
        cols = (ox[:, None] + offsets)[:, None, :]
        out[s:e] = img[np.arange(e - s)[:, None, None], rows, cols]
    return np.nan_to_num(out)


def flux_response(p, weight):
    """``d flux / d data`` per pixel ``(N, s, s)`` of the weighted least-squares fit of
    ``flux * p + background`` (``weight`` = 1/variance, 0 on unused pixels)."""
    sw = weight.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (weight * p).sum(axis=(1, 2)) / sw
        q = p - mean[:, None, None]
        return np.nan_to_num(weight * q / (weight * q * q).sum(axis=(1, 2))[:, None, None])


def poor_fit(chi2, dof, snr, eps=PSF_ERROR):
    """chi2/dof above what a PSF with fractional error ``eps`` allows (False where unknown)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        dof = np.asarray(dof, np.float64)
        limit = 1.0 + 5.0 * np.sqrt(2.0 / dof) + (eps * np.nan_to_num(snr)) ** 2 / dof
        return (dof > 0) & (np.asarray(chi2) / dof > limit)


def residual_sources(residual, weight, p, centre, exclude, snr, eps=PSF_ERROR):
    """Point sources in the residual stamps: ``(star, col, row, amplitude)`` arrays of the
    local maxima of the PSF-matched filter whose significance reaches
    ``sqrt(DETECT_SIGMA^2 + (eps S/N)^2)`` farther than ``exclude`` px from the star's
    ``centre`` (stamp coordinates). ``p``: each star's unit PSF, the filter."""
    from scipy.ndimage import maximum_filter
    from scipy.signal import fftconvolve

    kernel = p[:, ::-1, ::-1]  # correlation with the PSF
    num = fftconvolve(residual * weight, kernel, mode="same", axes=(1, 2))
    den = fftconvolve(weight, kernel * kernel, mode="same", axes=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        sig = np.where(den > 0, num / np.sqrt(np.where(den > 0, den, 1.0)), 0.0)
        amp = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    n, ny, nx = residual.shape
    rows, cols = np.mgrid[0:ny, 0:nx]
    far = np.hypot(cols[None] - centre[:, 0, None, None], rows[None] - centre[:, 1, None, None]) > exclude[:, None, None]
    limit = np.sqrt(DETECT_SIGMA**2 + (eps * np.nan_to_num(snr)) ** 2)
    peak = (sig >= limit[:, None, None]) & (sig == maximum_filter(sig, size=(1, 3, 3))) & far
    star, row, col = np.nonzero(peak)
    return star, col, row, amp[star, row, col]


def residual_shift(psf, sources, origin, c, size):
    """Flux shift of each star (N,) predicted from the residual's point sources."""
    star, col, row, amp = sources
    shift = np.zeros(c.shape[0])
    if star.size:
        x0, y0 = origin[star, 0], origin[star, 1]
        pj = render(psf, x0 + col, y0 + row, x0, y0, size, reach=size // 2 + 1)
        np.add.at(shift, star, amp * np.sum(c[star] * pj, axis=(1, 2)))
    return shift


def catalogue_shift(psf, x, y, origin, c, size, cat_x, cat_y, cat_flux, self_radius=0.5):
    """Flux shift of each star (N,) predicted from catalogue neighbours of known flux
    within ``size`` px (per axis) of its stamp's centre; a catalogue entry within
    ``self_radius`` px of the star is the star itself."""
    from scipy.spatial import cKDTree

    shift = np.zeros(len(x))
    good = np.isfinite(cat_x) & np.isfinite(cat_y) & np.isfinite(cat_flux) & (cat_flux > 0)
    if not good.any() or not len(x):
        return shift
    cat_x, cat_y, cat_flux = cat_x[good], cat_y[good], cat_flux[good]
    centre = origin + size // 2
    found = cKDTree(np.column_stack([cat_x, cat_y])).query_ball_point(centre, r=size - 1, p=np.inf)
    i = np.repeat(np.arange(len(x)), [len(f) for f in found])
    j = np.concatenate([np.asarray(f, dtype=np.int64) for f in found]) if i.size else np.zeros(0, np.int64)
    other = np.hypot(cat_x[j] - x[i], cat_y[j] - y[i]) > self_radius
    i, j = i[other], j[other]
    if i.size:
        pj = render(psf, cat_x[j], cat_y[j], origin[i, 0], origin[i, 1], size, reach=size)
        np.add.at(shift, i, cat_flux[j] * np.sum(c[i] * pj, axis=(1, 2)))
    return shift
