"""Brighter-fatter: the PSF's size against the star's flux, measured and modelled.

Bright stars spread their charge and look wider (brighter-fatter, the ZTF "pocket
effect"). A PSF that is the same for a 14th and an 18th magnitude star turns that into a
magnitude-dependent flux bias. This module holds the three pieces:

**The law** (:func:`size_factor`), used by the PSF model, the simulator and the fit::

    size(x, y, F) = size(x, y) * (1 + b * (log10 F - log10 F_ref))

``size`` is the fwhm (Moffat, elliptical Moffat; both widths of the Gaussian: the shape
is scaled, not deformed), ``F`` the star's flux on the PSF's flux scale (within its
``flux_radius``, ADU), ``b`` the *slope*: the fractional size change per decade of flux
(``b = 0.005``: 0.5 % wider per factor 10 in flux), ``F_ref`` the flux at which the PSF's
spatial polynomials give the size. Outside the flux range it was fitted on (``lg_range``,
log10 flux) the law is held at its ends; a non-positive flux takes the faint end.

**The diagnostic** (:func:`diagnose`), in every run: each star's own free-shape fwhm over
the PSF model's fwhm at its position, ``ln(fwhm_star / fwhm_psf)``, against ``log10(flux)``
(slope: the same unit as ``b``), and PSF minus aperture magnitude (the aperture of the
PSF's ``flux_radius``: 14 px diameter for ZTF) against the PSF magnitude (slope in mag
per mag). Both slopes are weighted least squares (:func:`robust_line`) with an intrinsic
scatter added to the errors until chi2/dof = 1 and 4-sigma clipping; the errors are the
fit's, so ``slope / slope_err`` is the trend's significance.

**The model's slope** (:func:`fit_slope`): a clean second stage after the joint PSF fit
(:func:`ztfpsf.psf.fit_psf`), which it leaves untouched. With the PSF's spatial shape
(analytic and residual surface) held, ``b`` and a global size offset ``d`` (added to the
size parameters' constant term: the joint fit at ``b = 0`` gives the size of a flux-
weighted average star) are fitted by profile likelihood: for trial ``(b, d)`` every
training star's flux and background are refitted (the per-star LM of
:mod:`ztfpsf.psf.measure`, fixed pixel weights from the stage-one model) and the total
chi2 is fitted with a quadric in ``(b, d)``, twice (the second grid around the first
minimum, step about 2 sigma). Its minimum is ``(b, d)``, its curvature their covariance. The stars' positions are held at
the joint fit's (a linear fit per star and trial: fast; a symmetric PSF's size and
centre are uncorrelated).

:func:`apply` is what the pipeline calls (``--brighter-fatter auto|on|off``): ``off``
only diagnoses; ``on`` fits ``b`` and re-measures every star with the flux-dependent PSF;
``auto`` does so when the diagnostic's size slope is significant (above
:data:`AUTO_SIGMA` sigma) and keeps the law only when its own slope is too. The
pipeline's default is ``off``: on the real ZTF quadrant the law's slope is small and of
the wrong sign for brighter-fatter (see the README) while fitting it costs more than the
PSF. Host-side numpy around the compiled per-star fits.
"""

import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "log_flux", "size_factor", "size_shift", "SIZE_INDICES", "robust_line", "size_trend", "aperture_trend", "diagnose",
    "fit_slope", "apply", "AUTO_SIGMA", "MODES", "SLOPE_UNIT", "star_sizes", "size_points", "aperture_points",
    "remeasure", "with_law",
]  # fmt: skip

#: Indices of each model's size parameters among its internal shape parameters (log widths).
SIZE_INDICES = {"moffat": (0,), "elliptical_moffat": (0,), "gaussian": (0, 1)}
#: ``auto`` turns the flux-dependent PSF on above this significance of the size slope.
AUTO_SIGMA = 3.0
#: ``--brighter-fatter`` choices.
MODES = ("auto", "on", "off")
SLOPE_UNIT = "fractional size change per decade of flux"
_MAG_PER_LN = 2.5 / np.log(10.0)


# --------------------------------------------------------------------------------------
# the law
# --------------------------------------------------------------------------------------
def log_flux(flux, flux_ref, lg_range=None):
    """``log10 flux - log10 flux_ref``, flux clamped to ``10**lg_range`` (non-positive or
    non-finite flux: the faint end, or ``flux_ref`` without a range): the variable of
    every flux-dependent part of a PSF (the size law, the residual surface's flux term)."""
    flux = np.asarray(flux, dtype=np.float64)
    lg_ref = np.log10(float(flux_ref))
    with np.errstate(invalid="ignore", divide="ignore"):
        lg = np.where(np.isfinite(flux) & (flux > 0), np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
    if lg_range is not None:
        lo, hi = (float(v) for v in lg_range)
        lg = np.clip(np.where(np.isfinite(lg), lg, lo), lo, hi)
    return np.where(np.isfinite(lg), lg - lg_ref, 0.0)


def size_factor(flux, slope, flux_ref, lg_range=None):
    """``1 + slope (log10 flux - log10 flux_ref)`` (:func:`log_flux`), kept within [0.5, 2]."""
    return np.clip(1.0 + float(slope) * log_flux(flux, flux_ref, lg_range), 0.5, 2.0)


def size_shift(model_name, u, flux, slope, flux_ref, lg_range=None):
    """Internal shapes ``u (N, n_shape)`` of stars of ``flux (N,)``: the size parameters
    (:data:`SIZE_INDICES`, log widths) shifted by ``ln size_factor``."""
    u = np.array(u, dtype=np.float64, copy=True)
    if slope == 0 or flux is None:
        return u
    shift = np.log(size_factor(np.broadcast_to(flux, u.shape[:-1]), slope, flux_ref, lg_range))
    for k in SIZE_INDICES[model_name]:
        u[..., k] += shift
    return u


# --------------------------------------------------------------------------------------
# a robust straight line
# --------------------------------------------------------------------------------------
def _weighted_line(x, y, var):
    w = 1.0 / var
    A = np.column_stack([np.ones_like(x), x])
    cov = np.linalg.pinv(A.T @ (A * w[:, None]))
    coef = cov @ (A.T @ (w * y))
    return coef, cov, y - A @ coef


def _intrinsic(x, y, err):
    """The scatter ``s`` that, added in quadrature to ``err``, makes chi2/dof of the line 1."""
    dof = max(x.size - 2, 1)
    chi2 = lambda s: float(np.sum(_weighted_line(x, y, err**2 + s * s)[2] ** 2 / (err**2 + s * s))) / dof
    if chi2(0.0) <= 1.0:
        return 0.0
    lo, hi = 0.0, max(float(np.std(y)), 1e-12)
    while chi2(hi) > 1.0 and hi < 1e6:
        hi *= 2.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if chi2(mid) > 1.0 else (lo, mid)
    return hi


def robust_line(x, y, err=None, *, clip=4.0, max_iter=10, min_points=5):
    """Weighted least-squares line ``y = a + slope (x - x0)`` (``x0`` the median of ``x``)
    with an intrinsic scatter added to ``err`` until chi2/dof = 1, points beyond ``clip``
    robust sigmas (:func:`ztfpsf.apcorr.robust_sigma` of the normalised residuals) dropped
    and the fit repeated until nothing changes.

    Returns ``slope, slope_err, intercept, intercept_err, x0, n`` (points kept),
    ``n_clipped``, ``scatter`` (the intrinsic scatter) and ``significance`` (|slope| /
    slope_err); values None with fewer than ``min_points`` points.
    """
    from ..apcorr import robust_sigma

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    err = np.ones_like(y) if err is None else np.broadcast_to(np.asarray(err, dtype=np.float64), y.shape)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(err) & (err > 0)
    out = dict(slope=None, slope_err=None, intercept=None, intercept_err=None, x0=None, n=int(ok.sum()), n_clipped=0,
               scatter=None, significance=None)
    if ok.sum() < min_points:
        return out
    x0 = float(np.median(x[ok]))
    keep = ok.copy()
    for _ in range(max_iter):
        s = _intrinsic(x[keep] - x0, y[keep], err[keep])
        coef, cov, _ = _weighted_line(x[keep] - x0, y[keep], err[keep] ** 2 + s * s)
        z = (y - coef[0] - coef[1] * (x - x0)) / np.sqrt(err**2 + s * s)
        new = ok & (np.abs(z - np.median(z[keep])) <= clip * max(robust_sigma(z[keep]), 1e-12))
        if new.sum() < min_points or np.array_equal(new, keep):
            break
        keep = new
    slope_err = float(np.sqrt(cov[1, 1]))
    out.update(slope=float(coef[1]), slope_err=slope_err, intercept=float(coef[0]), intercept_err=float(np.sqrt(cov[0, 0])),
               x0=x0, n=int(keep.sum()), n_clipped=int(ok.sum() - keep.sum()), scatter=float(s),
               significance=float(abs(coef[1]) / slope_err) if slope_err > 0 else None)
    return out


# --------------------------------------------------------------------------------------
# the diagnostic
# --------------------------------------------------------------------------------------
def _clean(table, min_snr):
    """Stars to use: no flag but RESERVED / EXTRAPOLATED (on the joint row and on the
    star's own fit), positive flux with S/N >= ``min_snr``."""
    from ..flags import Flag

    allowed = int(Flag.RESERVED | Flag.EXTRAPOLATED)
    flags = np.asarray(table["flags"], np.int64)
    ok = (flags & ~allowed) == 0
    if "star_flags" in table.colnames:
        ok &= (np.asarray(table["star_flags"], np.int64) & ~allowed) == 0
    flux = np.asarray(table["flux"], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = flux / np.asarray(table["flux_err"], dtype=np.float64)
    return ok & np.isfinite(flux) & (flux > 0) & (snr >= min_snr)


def star_sizes(psf, data, origin, table, *, mask=None, gain=None, read_noise=None, saturation=None, backend="auto"):
    """Each star's size over the PSF's at its position, ``ln(size_star / size_psf)`` and
    its error: flux, position, background and the size (log fwhm) fitted per star with the
    rest of the PSF's shape (alpha, ellipticity, residual surface) held
    (:func:`ztfpsf.psf.measure.measure_stamps` with ``fit_size``). NaN where not measured."""
    from .measure import measure_stamps

    x, y = np.asarray(table["x"], np.float64), np.asarray(table["y"], np.float64)
    out = np.full((2, len(x)), np.nan)
    good = np.isfinite(x) & np.isfinite(y) & np.all(np.isfinite(origin), axis=1)
    if not good.any():
        return out
    idx = np.flatnonzero(good)
    rn = read_noise if read_noise is None or np.ndim(read_noise) == 0 else np.asarray(read_noise, np.float64)[idx]
    res = measure_stamps(psf, np.asarray(data, np.float64)[idx], np.asarray(origin, np.float64)[idx], x[idx], y[idx],
                         mask=None if mask is None else np.asarray(mask, bool)[idx], gain=gain, read_noise=rn,
                         saturation=saturation, fit_position=True, dtype="float64", backend=backend, fit_size=True)
    out[0, idx], out[1, idx] = res["ln_size"], res["ln_size_err"]
    return out


def size_trend(table, psf=None, *, sizes=None, min_snr=20.0):
    """Slope of the stars' log size against ``log10 flux`` (:data:`SLOPE_UNIT`).

    ``sizes``: ``(ln size, error)`` per star from :func:`star_sizes` (the size alone
    fitted, relative to the PSF: the measure the model's law uses). Without them: ``ln
    fwhm`` of each star's free-shape fit (``fwhm, fwhm_err``, or ``star_fwhm,
    star_fwhm_err`` after a joint PSF fit), over the ``psf``'s fwhm at the star when
    given (its spatial variation is not a trend); on undersampled stars the free fit's
    fwhm trades against alpha and is a poor size. ``table``: ``flux, flux_err, x, y,
    flags``. Returns :func:`robust_line`'s dict with keys prefixed ``size_`` and
    ``size_measure`` (``'size fit'`` or ``'free fit fwhm'``).
    """
    x, y, err, measure = size_points(table, psf, sizes=sizes, min_snr=min_snr)
    fit = robust_line(x, y, err)
    return dict({f"size_{k}": v for k, v in fit.items()}, size_measure=measure)


def size_points(table, psf=None, *, sizes=None, min_snr=20.0):
    """The points of :func:`size_trend`: ``log10 flux``, ``ln size`` and its error (NaN for
    stars not used), and the measure's name. ``sizes`` default: the table's ``ln_size,
    ln_size_err`` columns when it has them (:func:`apply` adds them)."""
    sel = _clean(table, min_snr)
    if sizes is None and "ln_size" in table.colnames:
        sizes = (table["ln_size"], table["ln_size_err"])
    if sizes is not None:
        y, err = (np.asarray(v, np.float64) for v in sizes)
        measure = "size fit"
    else:
        name = "star_fwhm" if "star_fwhm" in table.colnames else "fwhm"
        fwhm = np.asarray(table[name], dtype=np.float64)
        err = np.asarray(table[f"{name}_err"], dtype=np.float64) / fwhm
        sel &= np.isfinite(fwhm) & (fwhm > 0)
        y = np.full(len(table), np.nan)
        if sel.any():
            ref = psf.fwhm(np.asarray(table["x"])[sel], np.asarray(table["y"])[sel], extrapolate=True) if psf is not None else 1.0
            y[sel] = np.log(fwhm[sel] / ref)
        measure = "free fit fwhm"
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.log10(np.asarray(table["flux"], dtype=np.float64))
    return np.where(sel, x, np.nan), y, err, measure


def _difference_error(flux, flux_err, ap, background, radius, gain, read_noise):
    """Error of PSF - aperture magnitude: the aperture's variance less the PSF flux's
    (the PSF flux is the more efficient estimate of the same photons), at least half the
    PSF flux's. Without a gain, 3x the PSF flux's relative error (the sky-limited ratio of
    a 14 px aperture to a ~2 px fwhm PSF)."""
    rel_psf = flux_err / flux
    if gain is None:
        return 3.0 * _MAG_PER_LN * rel_psf
    rn = np.zeros_like(flux) if read_noise is None else np.broadcast_to(np.asarray(read_noise, np.float64), flux.shape)
    sky_var = np.maximum(background, 0.0) / gain + (rn / gain) ** 2
    var_ap = np.pi * radius**2 * sky_var + np.maximum(ap, 0.0) / gain
    return _MAG_PER_LN * np.sqrt(np.maximum(var_ap / ap**2 - rel_psf**2, 0.25 * rel_psf**2))


def aperture_trend(image, table, radius, *, mask=None, zeropoint=None, mag_range=(14.0, 19.0), gain=None,
                   read_noise=None, min_snr=20.0):
    """Slope of PSF minus ``radius`` aperture magnitude against the PSF magnitude [mag/mag].

    ``mag = zeropoint - 2.5 log10 flux`` (instrumental without a zero point, and then no
    ``mag_range`` cut); apertures of :func:`ztfpsf.apcorr.aperture_fluxes` (each star's
    fitted background subtracted). Errors: :func:`_difference_error` (``gain`` e-/ADU,
    ``read_noise`` e-, scalar or per star: the sky variance ``background/gain +
    (read_noise/gain)**2``). Returns :func:`robust_line`'s dict prefixed ``apcorr_``, with
    ``apcorr_mag_range``.
    """
    mag, diff, err, out_range = aperture_points(image, table, radius, mask=mask, zeropoint=zeropoint, mag_range=mag_range,
                                                gain=gain, read_noise=read_noise, min_snr=min_snr)
    fit = robust_line(mag, diff, err)
    return dict({f"apcorr_{k}": v for k, v in fit.items()}, apcorr_mag_range=out_range, apcorr_radius=float(radius))


def aperture_points(image, table, radius, *, mask=None, zeropoint=None, mag_range=(14.0, 19.0), gain=None,
                    read_noise=None, min_snr=20.0):
    """The points of :func:`aperture_trend`: magnitude, PSF - aperture magnitude, its error
    (NaN for stars not used) and the magnitude range applied (None without a zero point)."""
    from ..apcorr import aperture_fluxes

    flux = np.asarray(table["flux"], dtype=np.float64)
    sel = _clean(table, min_snr)
    with np.errstate(invalid="ignore", divide="ignore"):
        mag = -2.5 * np.log10(flux) + (0.0 if zeropoint is None else float(zeropoint))
    if zeropoint is not None and mag_range is not None:
        sel &= (mag >= mag_range[0]) & (mag <= mag_range[1])
    out_range = list(mag_range) if zeropoint is not None and mag_range is not None else None
    diff, err = np.full(flux.shape, np.nan), np.full(flux.shape, np.nan)
    if sel.sum() >= 5:
        bg = np.asarray(table["background"], dtype=np.float64)[sel]
        ap = aperture_fluxes(image, np.asarray(table["x"])[sel], np.asarray(table["y"])[sel], radius, bg, mask)
        rn = None if read_noise is None else np.broadcast_to(np.asarray(read_noise, np.float64), flux.shape)[sel]
        with np.errstate(invalid="ignore", divide="ignore"):
            diff[sel] = -2.5 * np.log10(flux[sel] / ap)
            err[sel] = _difference_error(flux[sel], np.asarray(table["flux_err"], np.float64)[sel], ap, bg, radius, gain, rn)
    return mag, diff, err, out_range


def diagnose(table, psf=None, image=None, *, stamps=None, mask=None, zeropoint=None, gain=None, read_noise=None,
             saturation=None, mag_range=(14.0, 19.0), min_snr=20.0, backend="auto"):
    """The run's brighter-fatter diagnostic (a JSON-able dict): :func:`size_trend` (with a
    Moffat ``psf`` and the ``stamps``, ``data, origin, mask``: on :func:`star_sizes`) and,
    with an ``image`` and a ``psf`` (its ``flux_radius`` is the aperture),
    :func:`aperture_trend`; ``size_unit``, ``apcorr_unit`` and ``significant`` (size slope
    beyond :data:`AUTO_SIGMA` sigma)."""
    sizes = None
    if psf is not None and stamps is not None and len(SIZE_INDICES[psf.model.name]) == 1 and "ln_size" not in table.colnames:
        sizes = star_sizes(psf, stamps.data, stamps.origin, table, mask=stamps.mask, gain=gain, read_noise=read_noise,
                           saturation=saturation, backend=backend)
    out = dict(size_trend(table, psf, sizes=sizes, min_snr=min_snr), size_unit=SLOPE_UNIT, apcorr_unit="mag per mag")
    if image is not None and psf is not None and psf.flux_radius > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out.update(aperture_trend(image, table, psf.flux_radius, mask=mask, zeropoint=zeropoint, gain=gain,
                                      read_noise=read_noise, mag_range=mag_range, min_snr=min_snr))
    sig = out.get("size_significance")
    out["significant"] = bool(sig is not None and sig > AUTO_SIGMA)
    return out


# --------------------------------------------------------------------------------------
# the model's slope: profile likelihood after the joint fit
# --------------------------------------------------------------------------------------
def with_law(psf, slope, offset=0.0, flux_ref=None, lg_range=None, slope_err=None):
    """A copy of ``psf`` with the law ``(slope, flux_ref, lg_range)`` and ``offset`` added
    to the constant term of its size parameters."""
    import copy

    out = copy.copy(psf)
    out.coef = psf.coef.copy()
    out.meta = dict(psf.meta)
    for k in SIZE_INDICES[psf.model.name]:
        out.coef[k, 0] += offset  # term 0 is P0(x) P0(y) = 1
    out.bf_slope = float(slope)
    out.bf_ref = psf.bf_ref if flux_ref is None else float(flux_ref)
    out.bf_range = psf.bf_range if lg_range is None else tuple(float(v) for v in lg_range)
    if slope_err is not None:
        out.bf_slope_err = float(slope_err)
    return out


def _fixed_variance(psf, data, origin, table, gain, read_noise):
    """Per-pixel variance of the stage-one model, ``max(model, 0)/gain + (read_noise/gain)**2``
    (held through the profile so that chi2 changes come from the fit, not the weights)."""
    n, ny, nx = data.shape
    x, y = np.asarray(table["x"], np.float64), np.asarray(table["y"], np.float64)
    model = psf.render(x, y, origin, (ny, nx)) * np.asarray(table["flux"], np.float64)[:, None, None]
    model += np.asarray(table["background"], np.float64)[:, None, None]
    rn = np.broadcast_to(np.asarray(0.0 if read_noise is None else read_noise, np.float64), (n,))
    return np.maximum(model, 0.0) / gain + (rn / gain)[:, None, None] ** 2


def _total_chi2(psf, slope, offset, flux_ref, lg_range, data, origin, x, y, flux, mask, variance, saturation, backend):
    from .measure import measure_stamps

    trial = with_law(psf, slope, offset, flux_ref, lg_range)
    res = measure_stamps(trial, data, origin, x, y, mask=mask, variance=variance, saturation=saturation,
                         fit_position=False, dtype="float64", backend=backend, flux=flux)
    return np.nansum(np.where(np.isfinite(res["chi2"]), res["chi2"], 0.0))


def _quadric(points, chi2):
    """Fit ``chi2 = c + g.p + p^T H p / 2`` to 2-d points; returns the minimum and its
    covariance ``2 H^-1``... as ``(p_min, cov)`` (None when H is not positive definite)."""
    b, d = points[:, 0], points[:, 1]
    A = np.column_stack([np.ones_like(b), b, d, 0.5 * b * b, b * d, 0.5 * d * d])
    c, *_ = np.linalg.lstsq(A, chi2 - chi2.min(), rcond=None)
    H = np.array([[c[3], c[4]], [c[4], c[5]]])
    g = np.array([c[1], c[2]])
    if not np.all(np.linalg.eigvalsh(H) > 0):
        return None, None
    return -np.linalg.solve(H, g), 2.0 * np.linalg.inv(H)


def fit_slope(psf, data, origin, table, *, use=None, mask=None, gain=None, read_noise=None, saturation=None,
              step=(0.01, 0.005), backend="auto"):
    """Fit the law's slope ``b`` and a size offset to the stars with the PSF's spatial
    shape held (see the module docstring). Returns ``(psf_with_law, info)``; ``info``:
    ``slope, slope_err, offset, offset_err, flux_ref, lg_range, n_stars``.

    ``data (N, ny, nx)`` stamps with pixel [0, 0] at ``origin (N, 2)``; ``table`` the
    joint fit's rows for them (``x, y, flux, background``); ``use`` the stars that fitted
    the PSF (default: unflagged but RESERVED); ``gain`` e-/ADU and ``read_noise`` e-
    (scalar or per star) for the fixed weights (unit weights without a gain).
    """
    flux = np.asarray(table["flux"], np.float64)
    ok = _clean(table, 0.0) if use is None else (np.asarray(use, bool) & np.isfinite(flux) & (flux > 0))
    if ok.sum() < 10:
        raise ValueError(f"only {int(ok.sum())} stars to fit the brighter-fatter slope; need >= 10")
    idx = np.flatnonzero(ok)
    sub = table[idx]
    d, o = np.asarray(data, np.float64)[idx], np.asarray(origin, np.float64)[idx]
    m = None if mask is None else np.asarray(mask, bool)[idx]
    rn = None if read_noise is None or np.ndim(read_noise) == 0 else np.asarray(read_noise, np.float64)[idx]
    rn = read_noise if rn is None else rn
    var = _fixed_variance(psf, d, o, sub, gain, rn) if gain else np.ones_like(d)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = (flux[idx] / np.asarray(sub["flux_err"], np.float64)) ** 2
    lg = np.log10(flux[idx])
    w = np.where(np.isfinite(w), w, 0.0)
    flux_ref = float(10 ** (np.sum(w * lg) / np.sum(w))) if np.sum(w) > 0 else float(10 ** np.median(lg))
    lg_range = (float(lg.min()), float(lg.max()))
    if psf.residual_flux:  # one reference for every flux term: the surface's
        flux_ref, lg_range = psf.bf_ref, psf.bf_range
    x, y = np.asarray(sub["x"], np.float64), np.asarray(sub["y"], np.float64)
    args = (flux_ref, lg_range, d, o, x, y, flux[idx], m, var, saturation, backend)
    centre, steps = np.zeros(2), np.asarray(step, np.float64)
    grid = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], np.float64)
    cov = None
    for _ in range(2):
        pts = centre + grid * steps
        chi2 = np.array([_total_chi2(psf, b, off, *args) for b, off in pts])
        best, cov_new = _quadric(pts, chi2)
        if best is None:
            log.warning("brighter-fatter profile not convex around (%.4g, %.4g); keeping the grid's best point", *centre)
            best = pts[np.argmin(chi2)]
        else:
            cov = cov_new
        # keep the next grid within reach of the previous one (no wild extrapolation)
        centre = np.clip(best, centre - 3 * steps, centre + 3 * steps)
        if cov is not None:
            steps = np.maximum(2.0 * np.sqrt(np.diag(cov)), 1e-4)
    slope, offset = (float(v) for v in centre)
    err = np.sqrt(np.diag(cov)) if cov is not None else np.full(2, np.nan)
    info = dict(slope=slope, slope_err=float(err[0]), offset=offset, offset_err=float(err[1]), flux_ref=flux_ref,
                lg_range=list(lg_range), n_stars=int(idx.size), unit=SLOPE_UNIT)
    return with_law(psf, slope, offset, flux_ref, lg_range, slope_err=float(err[0])), info


def remeasure(psf, data, origin, table, *, mask=None, gain=None, read_noise=None, saturation=None, backend="auto"):
    """The table's stars measured again with the flux-dependent ``psf`` (flux and shape
    iterated, :func:`ztfpsf.psf.measure.measure_stamps`): ``flux, x, y, background``, their
    errors (PSF fixed) and ``chi2`` replaced, the shape columns set to the PSF's at each
    star's flux. Rows whose new measurement fails keep their values."""
    from .measure import measure_stamps

    t = table.copy()
    x, y = np.asarray(t["x"], np.float64), np.asarray(t["y"], np.float64)
    good = np.isfinite(x) & np.isfinite(y) & np.isfinite(np.asarray(t["flux"], np.float64))
    if not good.any():
        return t
    idx = np.flatnonzero(good)
    rn = None if read_noise is None else (np.asarray(read_noise, np.float64)[idx] if np.ndim(read_noise) else read_noise)
    res = measure_stamps(psf, np.asarray(data, np.float64)[idx], np.asarray(origin, np.float64)[idx], x[idx], y[idx],
                         mask=None if mask is None else np.asarray(mask, bool)[idx], gain=gain, read_noise=rn,
                         saturation=saturation, fit_position=True, dtype="float64", backend=backend)
    from ..flags import BAD

    fine = (res["flags"] & int(BAD)) == 0
    rows = idx[fine]
    for name in ("flux", "x", "y", "background"):
        t[name][rows] = res[name][fine]
        t[f"{name}_err"][rows] = res[f"{name}_err"][fine]
    t["chi2"][rows] = res["chi2"][fine]
    flux = res["flux"][fine]
    shape = psf.shape(res["x"][fine], res["y"][fine], extrapolate=True, flux=flux)
    shape["fwhm"] = psf.fwhm(res["x"][fine], res["y"][fine], extrapolate=True, flux=flux)
    for name, v in shape.items():
        if name in t.colnames:
            t[name][rows] = v
    return t


def apply(mode, psf, table, *, stamps=None, image=None, mask=None, zeropoint=None, gain=None, read_noise=None,
          saturation=None, backend="auto"):
    """The pipeline's step: diagnose, and with ``mode`` 'on' (or 'auto' and a significant
    size slope) fit the law and re-measure the stars. Returns ``(psf, table, info)``:
    ``info`` the diagnostic plus ``model`` (the fit's info, or None) and ``mode``; the
    table gains the stars' ``ln_size, ln_size_err`` (:func:`star_sizes`, relative to the
    flux-independent PSF) with a Moffat PSF and stamps. Without a PSF (independent fits)
    only the size trend of the free fits is measured."""
    if mode not in MODES:
        raise ValueError(f"brighter_fatter must be one of {MODES}; got {mode!r}")
    stamp_mask = None if stamps is None else stamps.mask
    if psf is not None and stamps is not None and len(SIZE_INDICES[psf.model.name]) == 1:
        table = table.copy(copy_data=False)
        table["ln_size"], table["ln_size_err"] = star_sizes(psf, stamps.data, stamps.origin, table, mask=stamp_mask, gain=gain,
                                                            read_noise=read_noise, saturation=saturation, backend=backend)
    info = diagnose(table, psf, image, mask=mask, zeropoint=zeropoint, gain=gain, read_noise=read_noise)
    info.update(mode=mode, model=None)
    wanted = mode == "on" or (mode == "auto" and info["significant"])
    if psf is None or stamps is None or not wanted:
        return psf, table, info
    try:
        law, info["model"] = fit_slope(psf, stamps.data, stamps.origin, table, mask=stamp_mask, gain=gain,
                                       read_noise=read_noise, saturation=saturation, backend=backend)
    except ValueError as err:
        log.warning("no flux-dependent PSF: %s", err)
        info["model_error"] = str(err)
        return psf, table, info
    log.info("brighter-fatter slope %.4g +- %.2g per decade of flux (reference flux %.4g ADU)",
             law.bf_slope, law.bf_slope_err, law.bf_ref)
    if mode == "auto" and not abs(law.bf_slope) > AUTO_SIGMA * law.bf_slope_err:
        info["model"]["kept"] = False  # the trend was not the law's: the flux-independent PSF stays
        return psf, table, info
    psf = law
    table = remeasure(psf, stamps.data, stamps.origin, table, mask=stamp_mask, gain=gain, read_noise=read_noise,
                      saturation=saturation, backend=backend)
    after = diagnose(table, psf, image, mask=mask, zeropoint=zeropoint, gain=gain, read_noise=read_noise)
    info["after"] = {k: after.get(k) for k in ("apcorr_slope", "apcorr_slope_err", "apcorr_n")}
    return psf, table, info
