"""Stars measured with a PSF held fixed: flux and background (and x, y) per star.

One compiled program for every use of a known PSF: the hybrid PSF's star updates, its
reserve and outlier stars, and forced photometry (:func:`ztfpsf.photometry`). Each star
carries its PSF as the internal shape block of its parameter vector (analytic shape, and
for a hybrid PSF the residual nodes at the star), so the per-star Levenberg-Marquardt of
:mod:`ztfpsf.fitting.lm` fits ``flux, x, y, background`` unchanged. The model-based
noise is re-evaluated at the solution and the fit repeated once, as in ``fit_stamps``.
Pure JAX, no I/O.
"""

import warnings
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from .._jax import with_x64
from ..fitting import linalg
from ..fitting.batching import run_chunked
from ..fitting.lm import lm_solve
from ..fitting.objective import flatten, model_image, noise_weight, pixel_grid
from ..flags import BAD, Flag

__all__ = ["MeasureOptions", "measure", "measure_stamps", "usable_pixels", "LOCAL"]

#: Local parameters, in the order of the returned ``local`` columns.
LOCAL = ("flux", "x", "y", "background")


@dataclass(frozen=True)
class MeasureOptions:
    """Static options (hashable: part of the compiled program's key)."""

    fit_position: bool = True
    noise: str = "model"  # 'model': gain/read noise/sky per star; 'given': variance
    max_iter: int = 30
    tol: float = 1e-3
    history: bool = False  # read by fitting.lm
    fit_size: bool = False  # also the first shape parameter (the log fwhm): returned as ``size``


def _free(model, opts):
    last = model.n_params - 1
    return ((0, 1, 2) if opts.fit_position else (0,)) + ((3,) if opts.fit_size else ()) + (last,)


def _measure_chunk(model, opts, data, valid, variance, noise, theta0, active):
    ny, nx = data.shape[1:]
    xx, yy = pixel_grid(ny, nx, data.dtype)
    data, valid = flatten(data), flatten(valid)
    free = _free(model, opts)
    active = active & (jnp.sum(valid, axis=1) > len(free))

    def weights(theta):
        if opts.noise == "given":
            var = flatten(jnp.broadcast_to(variance, (variance.shape[0], ny, nx)))
            return jnp.where(valid, 1.0 / jnp.where(valid & (var > 0), var, 1.0), 0.0)
        return noise_weight(model_image(model, theta, xx, yy), valid, noise[:, 0], noise[:, 1], noise[:, 2])

    data = jnp.where(valid, data, 0.0)
    theta, chi2, A, g, n_iter, conv, _ = lm_solve(model, free, opts, theta0, data, weights(theta0), active, xx, yy)
    if opts.noise == "model":  # source noise from the fitted model, not the data
        theta, chi2, A, g, n2, conv, _ = lm_solve(model, free, opts, theta, data, weights(theta), active, xx, yy)
        n_iter = n_iter + n2
    cov, ok = linalg.inverse(A, len(free))
    var = jnp.zeros((theta.shape[0], len(LOCAL)), theta.dtype)
    slot = {0: 0, 1: 1, 2: 2, free[-1]: 3}  # parameter -> column of ``local``
    for i, p in enumerate(free):
        if p in slot:
            var = var.at[:, slot[p]].set(cov[i, i])
    local = jnp.stack([theta[:, 0], theta[:, 1], theta[:, 2], theta[:, -1]], axis=1)
    out = dict(local=local, var=var, chi2=chi2, n_valid=jnp.sum(valid, axis=1), n_iter=n_iter,
               converged=conv, ok=ok & active)
    if opts.fit_size:
        out.update(size=theta[:, 3], size_var=cov[free.index(3), free.index(3)])
    return out


def measure(model, theta0, data, valid, *, variance=None, noise=None, opts=MeasureOptions(), active=None,
            devices=None, chunk=None):
    """Fit the local parameters of every star with its PSF fixed.

    model : a profile of :mod:`ztfpsf.models` or :class:`ztfpsf.psf.residual.Hybrid`
    theta0 : (N, n_params) start, stamp coordinates: flux, x, y, internal shape, background
    data, valid : (N, ny, nx) stamps in ADU and usable pixels
    variance : (N, ny, nx), with ``opts.noise == 'given'``
    noise : (N, 3) gain, read noise, sky per star, with ``opts.noise == 'model'``
    active : (N,) bool, the stars to fit (others come back as they went in)

    Returns a dict of numpy arrays: ``local`` (N, 4) flux, x, y, background; ``var`` (N, 4)
    their variances (0 where held fixed); ``chi2``, ``n_valid``, ``n_iter``, ``converged``,
    ``ok`` (fitted with a positive-definite normal matrix).
    """
    from ..fitting.batching import select_devices

    n = data.shape[0]
    dtype = data.dtype
    devices = devices or select_devices("auto")
    active = np.ones(n, bool) if active is None else np.asarray(active, bool)
    variance = np.ones((n, 1, 1), dtype) if variance is None else np.asarray(variance, dtype)
    if noise is None:
        noise = np.tile(np.array([1.0, 0.0, 0.0], dtype), (n, 1))
    noise = np.array(noise, dtype=dtype)
    noise[:, 0] = np.where(noise[:, 0] > 0, noise[:, 0], 1.0)  # padding and unused rows stay finite
    arrays = (data.astype(dtype), np.asarray(valid, bool), variance, noise, np.asarray(theta0, dtype), active)
    return run_chunked((_measure_chunk, model, opts), arrays, devices, chunk)


# --------------------------------------------------------------------------------------
# host side: stamps of an image measured with a PSFModel
# --------------------------------------------------------------------------------------
def usable_pixels(data, mask=None, saturation=None, variance=None):
    """Usable pixels ``(N, ny, nx)`` and the per-star ``MASKED_PIXELS`` / ``SATURATED``
    flags: finite, not masked, below saturation, with a finite positive variance."""
    n = data.shape[0]
    finite = np.isfinite(data)
    valid = finite.copy()
    flags = np.zeros(n, np.int64)
    if mask is not None:
        valid &= ~np.broadcast_to(np.asarray(mask, bool), data.shape)
    if variance is not None:
        valid &= np.isfinite(variance) & (variance > 0)
    sat = np.zeros(data.shape, bool)
    if saturation is not None:
        level = np.broadcast_to(np.asarray(saturation, np.float64), (n,))[:, None, None]
        sat = finite & (np.where(finite, data, -np.inf) >= level)
        valid &= ~sat
        flags[sat.any(axis=(1, 2))] |= int(Flag.SATURATED)
    flags[(~valid & ~sat).any(axis=(1, 2))] |= int(Flag.MASKED_PIXELS)
    return valid, flags


@with_x64
def measure_stamps(psf, data, origin, x, y, *, mask=None, variance=None, gain=None, read_noise=None, sky=0.0,
                   saturation=None, fit_position=False, max_shift=2.0, dtype="float32", backend="auto", chunk=None,
                   flux=None, flux_iter=3, fit_size=False):
    """Measure stars with ``psf`` (a :class:`~ztfpsf.psf.PSFModel`, analytic or hybrid) held
    fixed: flux and background, and ``x, y`` with ``fit_position``.

    ``data (N, ny, nx)`` stamps with pixel [0, 0] at image ``origin (N, 2)``; ``x, y``
    image positions (the start when fitted). The noise is model-based from ``gain`` and
    ``read_noise`` (scalars or per star), or ``variance``, or each stamp's border scatter.
    Returns a dict of columns in image coordinates (``flux`` on the PSF's flux scale:
    within its ``flux_radius``), ``chi2``, ``dof``, ``n_iter`` and ``flags`` (BAD rows NaN).

    A flux-dependent PSF (brighter-fatter, ``psf.flux_dependent``) takes each star's shape
    at ``flux`` (N,) when given; otherwise flux and shape are iterated: the shape at the
    stamp's summed flux, then ``flux_iter - 1`` times at the flux just measured.

    ``fit_size``: also fit each star's size, the PSF's first shape parameter (log fwhm of
    the Moffats), the rest of its shape held: columns ``ln_size`` (log of the star's size
    over the PSF's there) and ``ln_size_err``.
    """
    from ..fitting.api import border_variance, check_variance, noise_mode

    n = data.shape[0]
    dtype = np.dtype(dtype)
    data = np.asarray(data, np.float64)
    variance = None if variance is None else np.broadcast_to(np.asarray(variance, np.float64), data.shape)
    check_variance(data, variance, mask, None if saturation is None else np.broadcast_to(np.asarray(saturation, np.float64), (n,)))
    valid, flags = usable_pixels(data, mask, saturation, variance)
    mode, noise = noise_mode(variance, gain, read_noise, sky, n)
    if mode == "border":
        variance, mode = np.asarray(border_variance(np.where(valid, data, 0.0), valid)), "given"
    # a start: the flux from the PSF's peak pixel, the background from the border
    d = np.where(valid, data, np.nan)
    border = np.concatenate([d[:, 0], d[:, -1], d[:, 1:-1, 0], d[:, 1:-1, -1]], axis=1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN stamps: NO_DATA below
        bg0 = np.nan_to_num(np.nanmedian(border, axis=1))
        flux0 = np.nan_to_num(np.nansum(d - bg0[:, None, None], axis=(1, 2)))
    opts = MeasureOptions(fit_position=bool(fit_position), noise="given" if mode == "given" else "model",
                          fit_size=bool(fit_size))
    variance = None if mode != "given" else np.broadcast_to(variance, data.shape).astype(dtype)
    iterate = psf.flux_dependent and flux is None
    law_flux = None if not psf.flux_dependent else (flux0 if flux is None else np.asarray(flux, np.float64))
    for _ in range(max(int(flux_iter), 1) if iterate else 1):
        cols, out, n_free, enough = _measure_once(psf, data, valid, variance, noise, origin, x, y, flux0, bg0, opts,
                                                  dtype, backend, chunk, flags, law_flux)
        if iterate:  # the next pass: the shape at the flux just measured (failed rows keep theirs)
            law_flux = np.where(np.isfinite(cols["flux"]), cols["flux"], law_flux)
    flags = cols.pop("_flags")
    if fit_position:
        with np.errstate(invalid="ignore"):
            flags[np.hypot(cols["x"] - x, cols["y"] - y) > max_shift] |= int(Flag.CENTER_SHIFT)
    bad = (flags & int(BAD)) != 0
    for k in cols:
        cols[k][bad] = np.nan
    cols["dof"] = np.where(enough, out["n_valid"] - n_free, 0).astype(np.int32)
    cols["n_iter"] = out["n_iter"].astype(np.int32)
    cols["flags"] = flags
    return cols


def _measure_once(psf, data, valid, variance, noise, origin, x, y, flux0, bg0, opts, dtype, backend, chunk, flags, law_flux):
    """One measurement of every star with the PSF's shape at ``law_flux`` (None: the PSF
    is not flux-dependent). Returns the columns (flux on the PSF's scale; ``_flags``: a
    copy of ``flags`` with the fit's bits), the raw result, the free parameters' count
    and which stars had enough pixels."""
    from ..fitting.batching import select_devices

    fit_position = opts.fit_position
    flags = flags.copy()
    model = psf.profile_model
    xs, ys = np.asarray(x, np.float64) - origin[:, 0], np.asarray(y, np.float64) - origin[:, 1]
    block = psf.shape_block(x, y, flux=law_flux)
    theta0 = np.concatenate([np.stack([flux0, xs, ys], 1), block, bg0[:, None]], axis=1)
    out = measure(model, theta0.astype(dtype), np.where(valid, data, 0.0).astype(dtype), valid,
                  variance=variance, noise=noise, opts=opts, devices=select_devices(backend), chunk=chunk)
    n_free = (4 if fit_position else 2) + int(opts.fit_size)
    local, sd = out["local"].astype(np.float64), np.sqrt(np.maximum(out["var"], 0.0))
    enough = out["n_valid"] > n_free
    finite = np.all(np.isfinite(local), axis=1) & np.isfinite(out["chi2"]) & np.all(np.isfinite(sd), axis=1)
    flags[~enough] |= int(Flag.NO_DATA)
    flags[enough & ~(out["ok"] & finite)] |= int(Flag.FIT_FAILED)
    flags[enough & ~out["converged"]] |= int(Flag.NOT_CONVERGED)
    cols = {
        "x": local[:, 1] + origin[:, 0], "x_err": sd[:, 1], "y": local[:, 2] + origin[:, 1], "y_err": sd[:, 2],
        "flux": local[:, 0], "flux_err": sd[:, 0], "background": local[:, 3], "background_err": sd[:, 3],
        "chi2": out["chi2"].astype(np.float64),
    }
    if opts.fit_size:
        cols["ln_size"] = np.asarray(out["size"], np.float64) - block[:, 0]
        cols["ln_size_err"] = np.sqrt(np.maximum(np.asarray(out["size_var"], np.float64), 0.0))
    good = (flags & int(BAD)) == 0
    for k in cols:
        cols[k][~good] = np.nan
    if good.any():  # the flux scale of the PSF: flux within its FLUXRAD
        scale = psf.enclosed(cols["x"][good], cols["y"][good], flux=None if law_flux is None else law_flux[good])
        cols["flux"][good] *= scale
        cols["flux_err"][good] *= scale
    cols["_flags"] = flags
    return cols, out, n_free, enough
