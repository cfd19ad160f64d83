"""``fit_stamps``: fit a PSF model to every stamp of a batch, all stars at once.

Input checks, the noise model, initial guesses and the result table live here; the
numerical work is one compiled program per (model, method, options, batch shape).
"""

import functools
import logging
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from astropy.table import Table

from .. import __version__
from ..flags import BAD, Flag
from ..models import get_model
from . import linalg
from .adam import adam_solve
from .batching import run_chunked, select_devices
from .bfgs import bfgs_solve
from .lm import lm_solve
from .moments import initial_guess
from .objective import flatten, model_image, noise_weight, normal_equations, pixel_grid
from .tncg import tncg_solve

log = logging.getLogger(__name__)

__all__ = ["fit_stamps", "METHODS"]

METHODS = ("lm", "tncg", "adam", "scipy")
_MAX_ITER = {"lm": 30, "tncg": 50, "scipy": 200}


@dataclass(frozen=True)
class Options:
    """Static solver options (hashable: part of the compiled program's key)."""

    max_iter: int = 30
    tol: float = 1e-3
    history: bool = False
    reweight: bool = True
    cg_iter: int = 8
    adam_steps: int = 2000
    adam_lr: float = 5.0


# --------------------------------------------------------------------------------------
# the compiled part: one chunk of stars
# --------------------------------------------------------------------------------------
def _solve(method, model, free, opts, theta, data, weight, active, xx, yy):
    """Run one method: theta, n_iter, converged (None: decided from the decrement), history,
    and (chi2, A, g) at theta when the method has them (LM), else None."""
    if method == "lm":
        theta, chi2, A, g, n_iter, conv, hist = lm_solve(model, free, opts, theta, data, weight, active, xx, yy)
        return theta, n_iter, conv, hist, (chi2, A, g)
    if method == "tncg":
        return tncg_solve(model, free, opts, theta, data, weight, active, xx, yy) + (None,)
    if method == "adam":
        return adam_solve(model, free, opts, theta, data, weight, active, xx, yy) + (None,)
    raise ValueError(method)


def _start(model, free, data, valid, start, has_init):
    """Internal starting parameters: guesses from the pixels, fixed values kept."""
    flux, x, y, fwhm, bg = initial_guess(data, valid, start[:, 1], start[:, 2], has_init)
    shape = list(model.initial_shape(fwhm))
    for k in range(model.n_shape):
        if 3 + k not in free:
            shape[k] = start[:, 3 + k]
    guess = [flux, x, y, *model.shape_to_internal(tuple(shape)), bg]
    last = model.n_params - 1
    for k in (0, last):
        if k not in free:
            guess[k] = start[:, k]
    return jnp.stack(guess, axis=1)


def _fit_chunk(method, model, free, opts, noise_mode, data, valid, variance, noise, start, has_init, active):
    xx, yy = pixel_grid(data.shape[1], data.shape[2], data.dtype)
    theta = _start(model, free, data, valid, start, has_init)
    data, valid, variance = flatten(data), flatten(valid), flatten(variance)
    x0, y0 = theta[:, 1], theta[:, 2]
    gain, read_noise, sky = noise[:, 0], noise[:, 1], noise[:, 2]

    def weights(th):
        if noise_mode == "given":
            return jnp.where(valid, 1.0 / jnp.where(valid, variance, 1.0), 0.0)
        return noise_weight(model_image(model, th, xx, yy), valid, gain, read_noise, sky)

    weight = weights(theta)
    theta, n_iter, conv, hist, at_solution = _solve(method, model, free, opts, theta, data, weight, active, xx, yy)
    if noise_mode == "model" and opts.reweight:
        # source Poisson noise from the fitted model, not from the data (which biases flux)
        weight = weights(theta)
        theta, n2, conv, h2, at_solution = _solve(method, model, free, opts, theta, data, weight, active, xx, yy)
        n_iter = n_iter + n2
        if opts.history:
            hist = jnp.concatenate([hist, h2], axis=0)
    if at_solution is None:
        at_solution = normal_equations(model, free, theta, data, weight, xx, yy)
    chi2, A, g = at_solution
    n = len(free)
    cov, ok = linalg.inverse(A, n)
    decrement = sum(g[i] * sum(cov[max(i, j), min(i, j)] * g[j] for j in range(n)) for i in range(n))
    if conv is None:
        conv = decrement < opts.tol
    n_valid = jnp.sum(valid, axis=1)
    out = (theta, chi2, linalg.to_dense(cov, n), ok, n_iter, conv, n_valid, x0, y0)
    return out + ((hist.T,) if opts.history else (None,))


# --------------------------------------------------------------------------------------
# input checks and preparation (numpy)
# --------------------------------------------------------------------------------------
def _as_stamps(data):
    data = np.asarray(data)
    if data.ndim == 2:
        raise ValueError(f"data must be a stack of stamps of shape (N, ny, nx); got one image {data.shape}: use data[None]")
    if data.ndim != 3 or min(data.shape[1:]) < 3:
        raise ValueError(f"data must have shape (N, ny, nx) with ny, nx >= 3; got {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise ValueError(f"data must be numeric; got dtype {data.dtype}")
    return data


def _per_star(name, value, n, dtype=float, allow_none=True):
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required")
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        return np.full(n, arr, dtype=dtype)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},); got {arr.shape}")
    return arr


def _like_stamps(name, value, shape, dtype):
    if value is None:
        return None
    arr = np.asarray(value, dtype=dtype)
    if arr.shape != shape:
        try:
            arr = np.broadcast_to(arr, shape)
        except ValueError:
            raise ValueError(f"{name} must have the shape of data {shape}; got {arr.shape}") from None
    return arr


def _noise_inputs(data, variance, valid, gain, read_noise, sky, n):
    """Noise mode, variance array and per-star (gain, read_noise, sky)."""
    noise = np.zeros((n, 3))
    noise[:, 0] = 1.0
    if variance is not None:
        if gain is not None or read_noise is not None:
            warnings.warn("variance given: gain and read_noise are ignored", stacklevel=3)
        bad = valid & ~(variance > 0)
        if np.any(bad & np.isfinite(variance)):
            stars = np.unique(np.nonzero(bad)[0])
            raise ValueError(
                f"variance must be > 0 on every pixel used: {int(np.sum(bad))} pixels <= 0 "
                f"in {stars.size} stamps (first: {stars[0]}); mask those pixels instead"
            )
        return "given", noise
    if gain is None:
        if read_noise is not None:
            raise ValueError("read_noise given without gain: pass gain [e-/ADU] too")
        warnings.warn(
            "no variance and no gain: using each stamp's border scatter as a constant variance; "
            "uncertainties of bright stars will be too small (pass gain/read_noise or variance)",
            stacklevel=3,
        )
        return "border", noise
    g = _per_star("gain", gain, n)
    rn = _per_star("read_noise", 0.0 if read_noise is None else read_noise, n)
    s = _per_star("sky", sky, n)
    if np.any(~(g > 0)):
        raise ValueError(f"gain must be > 0 e-/ADU; got {g[~(g > 0)][0]}")
    if np.any(rn < 0) or np.any(s < 0):
        raise ValueError("read_noise and sky must be >= 0")
    noise[:, 0], noise[:, 1], noise[:, 2] = g, rn, s
    return "model", noise


def _border_variance(data, valid):
    """Robust (1.4826 MAD) variance of each stamp's border pixels, broadcast to the stamp."""
    d = np.where(valid, data, np.nan)
    border = np.concatenate([d[:, 0], d[:, -1], d[:, 1:-1, 0], d[:, 1:-1, -1]], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(border, axis=1, keepdims=True)
        sig = 1.4826 * np.nanmedian(np.abs(border - med), axis=1)
    sig = np.where(np.isfinite(sig) & (sig > 0), sig, 1.0)
    return np.broadcast_to((sig**2)[:, None, None], data.shape)


def _fixed_params(model, fixed, n):
    """Validated {param index: physical values} of the parameters held fixed."""
    if not fixed:
        return {}
    names = model.param_names
    out = {}
    for name, value in fixed.items():
        if name not in names:
            raise ValueError(f"cannot fix {name!r}: {model.name} parameters are {names}")
        out[names.index(name)] = _per_star(f"fixed[{name!r}]", value, n)
    if model.name == "elliptical_moffat" and len({5, 6} & set(out)) == 1:
        raise ValueError("e1 and e2 must be fixed together")
    return out


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _outputs_fn(model, free):
    """Compiled map theta -> (physical outputs, their errors from the covariance)."""
    ns = model.n_shape

    def phys(theta):
        u = tuple(theta[3 + k] for k in range(ns))
        shape = model.shape_to_physical(u)
        extra = model.derived(shape)
        return jnp.stack([theta[0], theta[1], theta[2], *shape, theta[-1], *extra.values()])

    def one(theta, cov):
        T = jax.jacfwd(phys)(theta)[:, jnp.asarray(free)]
        var = jnp.einsum("ij,jk,ik->i", T, cov, T)
        return phys(theta), jnp.sqrt(jnp.maximum(var, 0.0))

    return jax.jit(jax.vmap(one))


def _output_names(model):
    probe = model.derived(model.initial_shape(jnp.asarray(2.0)))
    return ("flux", "x", "y") + model.shape_names + ("background",) + tuple(probe)


def _column_order(model):
    shape = [n for n in _output_names(model) if n not in ("flux", "x", "y", "background", "fwhm")]
    return ["x", "y", "flux", "background", "fwhm"] + shape


def _build_table(model, free, method, opts, res, init, flags_in, fixed, origin, stamp_shape, dtype, min_snr, max_shift, noise_desc):
    theta, chi2, cov, ok, n_iter, conv, n_valid = res[:7]
    n = theta.shape[0]
    n_free = len(free)
    values, errors = (np.array(a, dtype=np.float64) for a in _outputs_fn(model, tuple(free))(theta, cov))
    names = _output_names(model)
    col = {name: values[:, i] for i, name in enumerate(names)}
    err = {name: errors[:, i] for i, name in enumerate(names)}
    flags = flags_in.copy()

    finite = np.isfinite(values).all(axis=1) & np.isfinite(chi2) & np.isfinite(errors).all(axis=1)
    flags[n_valid <= n_free] |= Flag.NO_DATA
    flags[(n_valid > n_free) & ~(ok & finite)] |= Flag.FIT_FAILED
    flags[~conv & (n_valid > n_free)] |= Flag.NOT_CONVERGED
    shape_free = any(3 <= i < 3 + model.n_shape for i in free)
    if shape_free and 0 in free:
        snr = col["flux"] / np.where(err["flux"] > 0, err["flux"], np.inf)
        flags[~(snr >= min_snr) & ((flags & (Flag.NO_DATA | Flag.FIT_FAILED)) == 0)] |= Flag.NO_SOURCE
    if shape_free:
        shape = tuple(jnp.asarray(col[s]) for s in model.shape_names)
        shape_ok = np.asarray(model.shape_ok(shape, float(max(stamp_shape))))
        flags[~shape_ok & finite] |= Flag.SHAPE_LIMIT
    shift = np.hypot(col["x"] - init["x"], col["y"] - init["y"])
    flags[shift > max_shift] |= Flag.CENTER_SHIFT

    bad = (flags & BAD) != 0
    for name in names:
        col[name][bad] = np.nan
        err[name][bad] = np.nan
    chi2 = np.where(bad & ((flags & Flag.NO_DATA) != 0), np.nan, chi2)

    ox, oy = (origin[:, 0], origin[:, 1]) if origin is not None else (0.0, 0.0)
    t = Table()
    t["x_init"] = init["x"] + ox
    t["y_init"] = init["y"] + oy
    for name in _column_order(model):
        v = col[name] + (ox if name == "x" else oy if name == "y" else 0.0)
        t[name] = v
        t[f"{name}_err"] = err[name]
    t["chi2"] = np.asarray(chi2, dtype=np.float64)
    t["dof"] = (n_valid - n_free).astype(np.int32)
    t["n_iter"] = n_iter.astype(np.int32)
    t["flags"] = flags.astype(np.int32)
    for c in ("x_init", "y_init", "x", "y", "x_err", "y_err"):
        t[c].unit = "pix"
    t.meta.update(
        model=model.name,
        integration=model.integration,
        method=method,
        dtype=np.dtype(dtype).name,
        noise=noise_desc,
        free=[model.param_names[i] for i in free],
        fixed=sorted(model.param_names[i] for i in fixed),
        tol=opts.tol,
        max_iter=opts.max_iter,
        errors="sqrt(diag((J^T W J)^-1)) at the solution, not scaled by chi2/dof",
        coordinates="0-based pixel coordinates, pixel centres at integers",
        ztfpsf_version=__version__,
        n_stars=n,
    )
    return t


# --------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------
def fit_stamps(
    data,
    variance=None,
    *,
    model="moffat",
    mask=None,
    gain=None,
    read_noise=None,
    sky=0.0,
    saturation=None,
    method="lm",
    dtype="float32",
    integration=None,
    x_init=None,
    y_init=None,
    fixed=None,
    origin=None,
    max_iter=None,
    tol=1e-3,
    reweight=True,
    min_snr=3.0,
    max_shift=3.0,
    return_history=False,
    adam_steps=2000,
    adam_lr=5.0,
    backend="auto",
    chunk_size=None,
    progress=False,
):
    """Fit a PSF model to every stamp in ``data``; one row per stamp.

    Parameters
    ----------
    data : array (N, ny, nx)
        Star stamps in ADU. Pixel coordinates are 0-based with pixel centres at integers.
    variance : array (N, ny, nx), optional
        Per-pixel variance in ADU**2; NaN marks a pixel unusable. Without it, the variance
        is built from ``gain`` [e-/ADU] and ``read_noise`` [e-]: ``(model + sky)/gain +
        (read_noise/gain)**2``, with the model of the current fit (one refit after the
        first pass, ``reweight``). With neither, each stamp's border scatter is used (a
        warning says so).
    model : {'moffat', 'gaussian', 'elliptical_moffat'} or a model instance
    mask : bool array (N, ny, nx), optional
        True where a pixel must not be used. NaN pixels and pixels at or above
        ``saturation`` are excluded too.
    sky : float or (N,)
        Sky level [ADU] already subtracted from the stamps (adds its Poisson noise).
    method : {'lm', 'tncg', 'adam', 'scipy'}
        Levenberg-Marquardt (default); truncated-Newton CG; optax Adam; per-star
        ``scipy.optimize.minimize(method='BFGS')``. All share model, noise and the
        uncertainty computation.
    dtype : {'float32', 'float64'}
    integration : str, optional
        Pixel integration (see :mod:`ztfpsf.models`); the model's default otherwise.
    x_init, y_init : (N,) arrays, optional
        Initial centres, in the same coordinates as the output (image coordinates when
        ``origin`` is given); else from the pixels.
    fixed : dict, optional
        ``{parameter: value or (N,) array}`` held fixed (physical units, e.g.
        ``{'fwhm': 2.1, 'alpha': 3.0}`` for PSF photometry with a known shape).
    origin : (N, 2) array, optional
        Image coordinates ``(x, y)`` of each stamp's pixel [0, 0]: output positions are
        then image coordinates.
    tol : float
        Convergence: the chi2 decrease predicted for the next step is below ``tol``.
    min_snr : float
        With a free shape, a star whose flux/flux_err is below this is flagged
        ``NO_SOURCE`` (its values are NaN).
    max_shift : float
        Flag ``CENTER_SHIFT`` if the centre moved more than this [px] from its start.
    return_history : bool
        Record the per-star chi2 at every iteration: ``table.meta['loss_history']``,
        an array (N, n_iterations) (NaN after a star's loop ended).
    backend : {'auto', 'cpu', 'gpu'}
    chunk_size : int, optional
        Stars per chunk of the compiled loop (default 128 on a CPU, 8192 on a GPU).

    Returns
    -------
    astropy.table.Table
        ``x_init, y_init, x, y, flux, background, fwhm`` and the model's other shape
        parameters, each with ``<name>_err``, then ``chi2, dof, n_iter, flags``
        (:mod:`ztfpsf.flags`). Errors are ``sqrt(diag((J^T W J)^-1))`` at the solution,
        not scaled by chi2/dof; fixed parameters have error 0. Failed stars are NaN rows
        with flags set; nothing is raised for a bad star.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {dtype}")
    model = get_model(model, integration)
    data = _as_stamps(data)
    n, ny, nx = data.shape
    if n == 0:
        raise ValueError("data holds no stamps (N = 0)")
    data = data.astype(np.float64)
    variance = _like_stamps("variance", variance, data.shape, np.float64)
    mask = _like_stamps("mask", mask, data.shape, bool)
    origin = None if origin is None else np.asarray(origin, dtype=np.float64)
    if origin is not None and origin.shape != (n, 2):
        raise ValueError(f"origin must have shape ({n}, 2); got {origin.shape}")

    finite = np.isfinite(data)
    valid = finite.copy()
    flags = np.zeros(n, dtype=np.int64)
    if mask is not None:
        valid &= ~mask
    if variance is not None:
        valid &= np.isfinite(variance)
    sat = np.zeros_like(valid)
    if saturation is not None:
        level = _per_star("saturation", saturation, n)[:, None, None]
        sat = finite & (data >= level)
        valid &= ~sat
        flags[sat.any(axis=(1, 2))] |= Flag.SATURATED
    flags[(~valid & ~sat).any(axis=(1, 2))] |= Flag.MASKED_PIXELS

    noise_mode, noise = _noise_inputs(data, variance, valid, gain, read_noise, sky, n)
    noise_desc = {
        "given": "variance given by the caller",
        "model": "model-based: (model + sky)/gain + (read_noise/gain)^2, refit once" if reweight else "model-based from the initial guess",
        "border": "constant per stamp: robust scatter of the border pixels (no gain given)",
    }[noise_mode]
    if noise_mode == "border":
        variance, noise_mode = _border_variance(data, valid), "given"

    fixed_vals = _fixed_params(model, fixed, n)
    free = tuple(i for i in range(model.n_params) if i not in fixed_vals)
    if not free:
        raise ValueError("every parameter is fixed: nothing to fit")

    # fixed values and initial centres, in stamp coordinates; guesses are made in the fit
    ox = origin[:, 0] if origin is not None else 0.0
    oy = origin[:, 1] if origin is not None else 0.0
    xi = _per_star("x_init", x_init, n)
    yi = _per_star("y_init", y_init, n)
    if (xi is None) != (yi is None):
        raise ValueError("give both x_init and y_init, or neither")
    if xi is not None and (1 in fixed_vals or 2 in fixed_vals):
        raise ValueError("fix x and y through fixed={'x': ..., 'y': ...} or x_init/y_init, not both")
    if (1 in fixed_vals) != (2 in fixed_vals):
        raise ValueError("fix x and y together")
    if 1 in fixed_vals:
        xi, yi = fixed_vals[1], fixed_vals[2]
    start = np.zeros((n, model.n_params))
    for k, v in fixed_vals.items():
        start[:, k] = v
    has_init = np.full(n, xi is not None)
    if xi is not None:
        start[:, 1], start[:, 2] = xi - ox, yi - oy

    active = valid.sum(axis=(1, 2)) > len(free)
    opts = Options(
        max_iter=int(max_iter or _MAX_ITER.get(method, 30)),
        tol=float(tol),
        history=bool(return_history),
        reweight=bool(reweight),
        adam_steps=int(adam_steps),
        adam_lr=float(adam_lr),
    )
    devices = select_devices(backend)
    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)
    arrays = (
        cast(np.where(valid, data, 0.0)),
        valid,
        cast(np.where(valid, variance, 1.0)) if variance is not None else cast(np.ones((n, 1, 1))),
        cast(noise),
        cast(start),
        has_init,
        active,
    )
    if method == "scipy":
        theta0 = run_chunked((_start_chunk, model, free), arrays[:2] + arrays[4:6], devices, chunk_size)
        res = bfgs_solve(model, free, opts, noise_mode, arrays[:4] + (theta0, active), progress=progress)
        res = _finish_host(model, free, opts, noise_mode, arrays[:4] + (theta0, active), res, devices, chunk_size)
    else:
        res = run_chunked((_fit_chunk, method, model, free, opts, noise_mode), arrays, devices, chunk_size)
    init = {"x": np.asarray(res[7], np.float64), "y": np.asarray(res[8], np.float64)}
    table = _build_table(
        model, free, method, opts, res, init, flags, fixed_vals, origin, (ny, nx), dtype, min_snr, max_shift, noise_desc
    )
    if return_history:
        table.meta["loss_history"] = np.asarray(res[9], dtype=np.float64)
    return table


def _start_chunk(model, free, data, valid, start, has_init):
    theta = _start(model, free, data, valid, start, has_init)
    return theta


def _finish_chunk(model, free, opts, noise_mode, data, valid, variance, noise, theta, active):
    """Uncertainties and chi2 at a solution found outside JAX (the scipy method)."""
    xx, yy = pixel_grid(data.shape[1], data.shape[2], data.dtype)
    data, valid, variance = flatten(data), flatten(valid), flatten(variance)
    if noise_mode == "given":
        weight = jnp.where(valid, 1.0 / variance, 0.0)
    else:
        weight = noise_weight(model_image(model, theta, xx, yy), valid, noise[:, 0], noise[:, 1], noise[:, 2])
    chi2, A, _ = normal_equations(model, free, theta, data, weight, xx, yy)
    cov, ok = linalg.inverse(A, len(free))
    return chi2, linalg.to_dense(cov, len(free)), ok, jnp.sum(valid, axis=1)


def _finish_host(model, free, opts, noise_mode, arrays, res, devices, chunk_size):
    theta0 = arrays[4]
    theta, n_iter, conv, hist = res
    arrays = arrays[:4] + (np.ascontiguousarray(theta, dtype=arrays[0].dtype),) + arrays[5:]
    chi2, cov, ok, n_valid = run_chunked((_finish_chunk, model, free, opts, noise_mode), arrays, devices, chunk_size)
    return (theta, chi2, cov, ok, n_iter, conv, n_valid, theta0[:, 1], theta0[:, 2], hist)
