"""``fit_stamps``: fit a PSF model to every stamp of a batch, all stars at once.

Argument checks and the result table are host-side numpy; everything per pixel (which
pixels are usable, the noise model, initial guesses, the fit, uncertainties and their
propagation to the reported parameters) is one compiled program per (model, method,
options, batch shape), so a large batch costs one copy of the stamps to the device.
"""

import logging
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from astropy.table import Table

from .. import __version__
from .._jax import with_x64
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

__all__ = ["fit_stamps", "check_variance", "METHODS"]

METHODS = ("lm", "tncg", "adam", "scipy")
_MAX_ITER = {"lm": 30, "tncg": 50, "scipy": 200}


@dataclass(frozen=True)
class Options:
    """Static options (hashable: part of the compiled program's key)."""

    max_iter: int = 30
    tol: float = 1e-3
    history: bool = False
    reweight: bool = True
    cg_iter: int = 8
    adam_steps: int = 2000
    adam_lr: float = 5.0
    noise_mode: str = "given"  # "given" variance, "model" (gain/read noise), "border" scatter
    has_mask: bool = False
    has_variance: bool = False
    dtype: str = "float32"


# --------------------------------------------------------------------------------------
# the compiled part: one chunk of stars
# --------------------------------------------------------------------------------------
def border_variance(data, valid):
    """Robust (1.4826 MAD) variance of each stamp's border pixels (the noise model when
    neither a variance nor a gain is given), shape ``(N, 1, 1)``."""
    d = jnp.where(valid, data, jnp.nan)
    border = jnp.concatenate([d[:, 0], d[:, -1], d[:, 1:-1, 0], d[:, 1:-1, -1]], axis=1)
    med = jnp.nanmedian(border, axis=1, keepdims=True)
    sig = 1.4826 * jnp.nanmedian(jnp.abs(border - med), axis=1)
    return jnp.where(jnp.isfinite(sig) & (sig > 0), sig * sig, 1.0)[:, None, None]


def _start(model, free, data, valid, start, has_init):
    """Internal starting parameters: guesses from the pixels, fixed values kept."""
    flux, x, y, fwhm, bg = initial_guess(data, valid, start[:, 1], start[:, 2], has_init)
    shape = list(model.initial_shape(fwhm))
    for k in range(model.n_shape):
        if 3 + k not in free:
            shape[k] = start[:, 3 + k]
    guess = [flux, x, y, *model.shape_to_internal(tuple(shape)), bg]
    for k in (0, model.n_params - 1):
        if k not in free:
            guess[k] = start[:, k]
    return jnp.stack(guess, axis=1)


def _prepare(model, free, opts, data, mask, variance, per_star, start, has_init):
    """Usable pixels, per-star pixel flags, the starting point and the weight function."""
    data, variance = data.astype(opts.dtype), variance.astype(opts.dtype)
    finite = jnp.isfinite(data)
    valid = finite
    if opts.has_mask:
        valid = valid & ~mask
    if opts.has_variance:
        valid = valid & jnp.isfinite(variance)
    saturated = finite & (data >= per_star[:, 3, None, None])
    valid = valid & ~saturated
    pix_flags = jnp.where(jnp.any(saturated, axis=(1, 2)), int(Flag.SATURATED), 0) | jnp.where(
        jnp.any(~valid & ~saturated, axis=(1, 2)), int(Flag.MASKED_PIXELS), 0
    )
    data = jnp.where(valid, data, 0.0)
    theta = _start(model, free, data, valid, start, has_init)
    if opts.noise_mode == "border":
        variance = border_variance(data, valid)
    var = flatten(jnp.broadcast_to(variance, data.shape)) if opts.noise_mode != "model" else None
    valid = flatten(valid)
    gain, read_noise, sky = per_star[:, 0], per_star[:, 1], per_star[:, 2]
    xx, yy = pixel_grid(data.shape[1], data.shape[2], data.dtype)

    def weights(th):
        if var is not None:
            return jnp.where(valid, 1.0 / jnp.where(valid & (var > 0), var, 1.0), 0.0)
        return noise_weight(model_image(model, th, xx, yy), valid, gain, read_noise, sky)

    return flatten(data), valid, theta, weights, pix_flags, (xx, yy)


def _solve(method, model, free, opts, theta, data, weight, active, xx, yy):
    """One method: theta, n_iter, converged (None: from the decrement), history, and the
    (chi2, A, g) at theta when the method has them (LM), else None."""
    if method == "lm":
        theta, chi2, A, g, n_iter, conv, hist = lm_solve(model, free, opts, theta, data, weight, active, xx, yy)
        return theta, n_iter, conv, hist, (chi2, A, g)
    if method == "tncg":
        return tncg_solve(model, free, opts, theta, data, weight, active, xx, yy) + (None,)
    if method == "adam":
        return adam_solve(model, free, opts, theta, data, weight, active, xx, yy) + (None,)
    raise ValueError(method)


def _physical(model, theta):
    """Reported values of one star: flux, x, y, shape, background, derived quantities."""
    shape = model.shape_to_physical(tuple(theta[3 + k] for k in range(model.n_shape)))
    extra = model.derived(shape)
    return jnp.stack([theta[0], theta[1], theta[2], *shape, theta[-1], *extra.values()])


def _results(model, free, opts, theta, data, weight, at_solution, conv, xx, yy):
    """chi2, values, errors (delta method through the internal parameterisation), status."""
    if at_solution is None:
        at_solution = normal_equations(model, free, theta, data, weight, xx, yy)
    chi2, A, g = at_solution
    n = len(free)
    cov, ok = linalg.inverse(A, n)
    if conv is None:  # methods without their own test: the Gauss-Newton decrement
        decrement = sum(g[i] * sum(cov[max(i, j), min(i, j)] * g[j] for j in range(n)) for i in range(n))
        conv = decrement < opts.tol
    cov = linalg.to_dense(cov, n)
    idx = jnp.asarray(free)

    def one(th, c):
        T = jax.jacfwd(lambda t: _physical(model, t))(th)[:, idx]
        return _physical(model, th), jnp.sqrt(jnp.maximum(jnp.einsum("ij,jk,ik->i", T, c, T), 0.0))

    values, errors = jax.vmap(one)(theta, cov)
    # detection significance: flux over its error with the shape held at the fit (a faint
    # star's shape-flux degeneracy inflates flux_err, not the evidence that a star is there)
    detection = theta[:, 0] * jnp.sqrt(A[0, 0]) if 0 in free else jnp.full_like(chi2, jnp.inf)
    return chi2, values, errors, ok, conv, detection


def _fit_chunk(method, model, free, opts, data, mask, variance, per_star, start, has_init):
    data, valid, theta, weights, pix_flags, (xx, yy) = _prepare(
        model, free, opts, data, mask, variance, per_star, start, has_init
    )
    x0, y0 = theta[:, 1], theta[:, 2]
    n_valid = jnp.sum(valid, axis=1)
    active = n_valid > len(free)
    weight = weights(theta)
    theta, n_iter, conv, hist, at_solution = _solve(method, model, free, opts, theta, data, weight, active, xx, yy)
    if opts.noise_mode == "model" and opts.reweight:
        # source Poisson noise from the fitted model, not from the data (which biases flux)
        weight = weights(theta)
        theta, n2, conv, h2, at_solution = _solve(method, model, free, opts, theta, data, weight, active, xx, yy)
        n_iter = n_iter + n2
        if opts.history:
            hist = jnp.concatenate([hist, h2], axis=0)
    chi2, values, errors, ok, conv, detection = _results(model, free, opts, theta, data, weight, at_solution, conv, xx, yy)
    out = dict(values=values, errors=errors, chi2=chi2, ok=ok, n_iter=n_iter, converged=conv, n_valid=n_valid, detection=detection,
               pix_flags=pix_flags, x0=x0, y0=y0)
    if opts.history:
        out["history"] = hist.T
    return out


def _prepare_chunk(model, free, opts, data, mask, variance, per_star, start, has_init):
    """For the host-side scipy method: the prepared arrays and the starting point."""
    data, valid, theta, weights, pix_flags, _ = _prepare(model, free, opts, data, mask, variance, per_star, start, has_init)
    var = jnp.where(valid, 1.0 / jnp.maximum(weights(theta), 1e-30), 1.0) if opts.noise_mode != "model" else jnp.ones_like(data)
    return dict(data=data, valid=valid, variance=var, theta=theta, pix_flags=pix_flags,
                x0=theta[:, 1], y0=theta[:, 2], n_valid=jnp.sum(valid, axis=1))


def _finish_chunk(model, free, opts, stamp_shape, data, valid, variance, per_star, theta):
    """For the scipy method: chi2, values and errors at a solution found outside JAX."""
    xx, yy = pixel_grid(*stamp_shape, data.dtype)
    if opts.noise_mode == "model":
        weight = noise_weight(model_image(model, theta, xx, yy), valid, per_star[:, 0], per_star[:, 1], per_star[:, 2])
    else:
        weight = jnp.where(valid, 1.0 / variance, 0.0)
    chi2, values, errors, ok, _, detection = _results(model, free, opts, theta, data, weight, None, True, xx, yy)
    return dict(chi2=chi2, values=values, errors=errors, ok=ok, detection=detection)


# --------------------------------------------------------------------------------------
# argument checks (numpy, cheap: nothing per pixel)
# --------------------------------------------------------------------------------------
def _as_stamps(data):
    data = np.asarray(data)
    if data.ndim == 2:
        raise ValueError(f"data must be a stack of stamps of shape (N, ny, nx); got one image {data.shape}: use data[None]")
    if data.ndim != 3 or min(data.shape[1:]) < 3:
        raise ValueError(f"data must have shape (N, ny, nx) with ny, nx >= 3; got {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise ValueError(f"data must be numeric; got dtype {data.dtype}")
    if data.shape[0] == 0:
        raise ValueError("data holds no stamps (N = 0)")
    return data


def _per_star(name, value, n):
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},); got {arr.shape}")
    return arr


def _like_stamps(name, value, shape):
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.shape != shape:
        try:
            arr = np.broadcast_to(arr, shape)
        except ValueError:
            raise ValueError(f"{name} must have the shape of data {shape}; got {arr.shape}") from None
    return arr


def noise_mode(variance, gain, read_noise, sky, n):
    """Noise mode ('given', 'model' or 'border') and per-star (gain, read_noise, sky);
    checks the arguments and warns when no noise model is given."""
    per_star = np.ones((n, 3))
    per_star[:, 1:] = 0.0
    if variance is not None:
        if gain is not None or read_noise is not None:
            warnings.warn("variance given: gain and read_noise are ignored", stacklevel=3)
        return "given", per_star
    if gain is None:
        if read_noise is not None:
            raise ValueError("read_noise given without gain: pass gain [e-/ADU] too")
        warnings.warn(
            "no variance and no gain: using each stamp's border scatter as a constant variance; "
            "uncertainties of bright stars will be too small (pass gain/read_noise or variance)",
            stacklevel=3,
        )
        return "border", per_star
    g = _per_star("gain", gain, n)
    rn = _per_star("read_noise", 0.0 if read_noise is None else read_noise, n)
    s = _per_star("sky", sky, n)
    if np.any(~(g > 0)):
        raise ValueError(f"gain must be > 0 e-/ADU; got {g[~(g > 0)][0]}")
    if np.any(rn < 0) or np.any(s < 0):
        raise ValueError("read_noise and sky must be >= 0")
    per_star[:, 0], per_star[:, 1], per_star[:, 2] = g, rn, s
    return "model", per_star


#: Physical domain of the shape parameters (their internal transform is finite inside).
_DOMAIN = {
    "fwhm": (lambda v: v > 0, "> 0"),
    "sigma_x": (lambda v: v > 0, "> 0"),
    "sigma_y": (lambda v: v > 0, "> 0"),
    "alpha": (lambda v: v > 1, "> 1"),
    "rho": (lambda v: np.abs(v) < 1, "in (-1, 1)"),
}


def _check_fixed_value(name, values):
    """A held value must be finite and inside its parameter's domain (fwhm > 0, alpha > 1...)."""
    bad = ~np.isfinite(values)
    rule = "finite"
    if name in _DOMAIN:
        inside, rule = _DOMAIN[name]
        rule = f"finite and {rule}"
        with np.errstate(invalid="ignore"):
            bad |= ~inside(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = f" (star {i} of {values.size})" if values.size > 1 else ""
        raise ValueError(f"fixed[{name!r}] must be {rule}; got {values[i]}{where}")


def _fixed_params(model, fixed, n):
    """Validated {param index: physical values} of the parameters held fixed."""
    out = {}
    for name, value in (fixed or {}).items():
        if name not in model.param_names:
            raise ValueError(f"cannot fix {name!r}: {model.name} parameters are {model.param_names}")
        values = _per_star(f"fixed[{name!r}]", value, n)
        _check_fixed_value(name, values)
        out[model.param_names.index(name)] = values
    if model.name == "elliptical_moffat" and len({5, 6} & set(out)) == 1:
        raise ValueError("e1 and e2 must be fixed together")
    if 5 in out and 6 in out and model.name == "elliptical_moffat" and np.any(np.hypot(out[5], out[6]) >= 1):
        raise ValueError("fixed ellipticity must have |e| = hypot(e1, e2) < 1")
    if (1 in out) != (2 in out):
        raise ValueError("fix x and y together")
    return out


def check_variance(data, variance, mask=None, saturation=None):
    """Raise ValueError if ``variance`` is <= 0 on a pixel the fit would use.

    The one rule, checked before any work (:func:`fit_stamps`, the joint PSF fit): a pixel
    is used when its data and variance are finite, it is not masked and it is below
    ``saturation`` (scalar or per star); such a pixel needs a variance > 0 (mask it
    otherwise). ``data``, ``variance`` (and ``mask``) have shape (N, ny, nx).
    """
    if variance is None:
        return
    variance = np.asarray(variance)
    positive = variance > 0
    if positive.all():  # the usual case: one cheap pass
        return
    data = np.asarray(data)
    with np.errstate(invalid="ignore"):
        used = np.isfinite(data) & np.isfinite(variance) & ~positive
        if mask is not None:
            used &= ~np.asarray(mask, dtype=bool)
        if saturation is not None:
            sat = np.asarray(saturation, dtype=np.float64)
            used &= ~(data >= (sat[:, None, None] if sat.ndim == 1 else sat))
    if used.any():
        stars = np.flatnonzero(used.any(axis=(1, 2)))
        raise ValueError(
            f"variance must be > 0 on every pixel used: {int(used.sum())} pixels <= 0 "
            f"in {stars.size} stamps (first: {stars[0]}); mask those pixels instead"
        )


def _start_values(model, fixed_vals, x_init, y_init, origin, n):
    """Physical start values of fixed parameters and initial centres, in stamp coordinates."""
    xi, yi = _per_star("x_init", x_init, n), _per_star("y_init", y_init, n)
    if (xi is None) != (yi is None):
        raise ValueError("give both x_init and y_init, or neither")
    if xi is not None and 1 in fixed_vals:
        raise ValueError("fix x and y through fixed={'x': ..., 'y': ...} or x_init/y_init, not both")
    if 1 in fixed_vals:
        xi, yi = fixed_vals[1], fixed_vals[2]
    start = np.zeros((n, model.n_params))
    for k, v in fixed_vals.items():
        start[:, k] = v
    has_init = np.full(n, xi is not None)
    if xi is not None:
        ox, oy = (origin[:, 0], origin[:, 1]) if origin is not None else (0.0, 0.0)
        start[:, 1], start[:, 2] = xi - ox, yi - oy
    return start, has_init


# --------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------
def output_names(model):
    """Names of the reported values, in the order of the compiled outputs."""
    probe = model.derived(model.initial_shape(jnp.asarray(2.0)))
    return ("flux", "x", "y") + model.shape_names + ("background",) + tuple(probe)


def value_columns(model):
    """Names of the value columns of a result table, in table order (each has ``_err``)."""
    shape = [n for n in output_names(model) if n not in ("flux", "x", "y", "background", "fwhm")]
    return ["x", "y", "flux", "background", "fwhm"] + shape


def _flags(model, free, res, stamp_size, min_snr, max_shift, col, err):
    n_free = len(free)
    n_valid = res["n_valid"]
    flags = res["pix_flags"].astype(np.int64)
    finite = np.isfinite(res["values"]).all(axis=1) & np.isfinite(res["chi2"]) & np.isfinite(res["errors"]).all(axis=1)
    enough = n_valid > n_free
    flags[~enough] |= Flag.NO_DATA
    flags[enough & ~(res["ok"] & finite)] |= Flag.FIT_FAILED
    flags[enough & ~res["converged"]] |= Flag.NOT_CONVERGED
    shape_free = any(3 <= i < 3 + model.n_shape for i in free)
    if shape_free and 0 in free:
        flags[~(res["detection"] >= min_snr) & ((flags & (Flag.NO_DATA | Flag.FIT_FAILED)) == 0)] |= Flag.NO_SOURCE
    if shape_free:
        shape = tuple(jnp.asarray(col[s]) for s in model.shape_names)
        flags[~np.asarray(model.shape_ok(shape, float(stamp_size))) & finite] |= Flag.SHAPE_LIMIT
    shift = np.hypot(col["x"] - res["x0"], col["y"] - res["y0"])
    flags[shift > max_shift] |= Flag.CENTER_SHIFT
    return flags


def _build_table(model, free, method, opts, res, fixed, origin, stamp_shape, dtype, min_snr, max_shift, noise_desc):
    names = output_names(model)
    values, errors = np.array(res["values"], np.float64), np.array(res["errors"], np.float64)
    col = {name: values[:, i] for i, name in enumerate(names)}
    err = {name: errors[:, i] for i, name in enumerate(names)}
    for k, v in fixed.items():
        if k not in (1, 2):  # report held values exactly, not through the internal transform
            col[model.param_names[k]] = np.array(v, dtype=np.float64)
    flags = _flags(model, free, res, max(stamp_shape), min_snr, max_shift, col, err)
    bad = (flags & BAD) != 0
    for name in names:
        col[name][bad] = np.nan
        err[name][bad] = np.nan
    chi2 = np.where((flags & Flag.NO_DATA) != 0, np.nan, np.asarray(res["chi2"], np.float64))

    ox, oy = (origin[:, 0], origin[:, 1]) if origin is not None else (0.0, 0.0)
    t = Table()
    t["x_init"] = np.asarray(res["x0"], np.float64) + ox
    t["y_init"] = np.asarray(res["y0"], np.float64) + oy
    for name in value_columns(model):
        t[name] = col[name] + (ox if name == "x" else oy if name == "y" else 0.0)
        t[f"{name}_err"] = err[name]
    t["chi2"] = chi2
    t["dof"] = (np.asarray(res["n_valid"]) - len(free)).astype(np.int32)
    t["n_iter"] = np.asarray(res["n_iter"]).astype(np.int32)
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
    )
    return t


_NOISE_DESC = {
    "given": "variance given by the caller",
    "model": "model-based: (model + sky)/gain + (read_noise/gain)^2",
    "border": "constant per stamp: robust scatter of the border pixels (no gain given)",
}


# --------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------
@with_x64  # float64 fits are float64 even where the host left JAX's x64 off
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
        (read_noise/gain)**2`` with the model of the current fit (refitted once after the
        first pass with ``reweight``). With neither, each stamp's border scatter is used
        (a warning says so).
    model : {'moffat', 'gaussian', 'elliptical_moffat'} or a model instance
    mask : bool array (N, ny, nx), optional
        True where a pixel must not be used. NaN pixels and pixels at or above
        ``saturation`` (scalar or per star) are excluded too.
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
        ``{parameter: value or (N,) array}`` held fixed, physical units (e.g.
        ``{'fwhm': 2.1, 'alpha': 3.0}`` for PSF photometry with a known shape).
    origin : (N, 2) array, optional
        Image coordinates ``(x, y)`` of each stamp's pixel [0, 0]: the output positions
        are then image coordinates.
    tol : float
        Convergence: the chi2 decrease predicted for the next step is below ``tol``.
    min_snr : float
        With a free shape, a star whose detection significance (flux over its error with
        the shape held at the fit) is below this is flagged ``NO_SOURCE`` (values NaN).
    max_shift : float
        Flag ``CENTER_SHIFT`` if the centre moved more than this [px] from its start.
    return_history : bool
        Record every star's chi2 at the start and after every iteration (both passes when
        reweighting, one after the other): ``table.meta['loss_history']``, an array
        (N, n_iterations), NaN after a star's loop ended.
    backend : {'auto', 'cpu', 'gpu'}
    chunk_size : int, optional
        Stars per chunk of the compiled loop (default 128 on a CPU, 65536 on a GPU).

    Returns
    -------
    astropy.table.Table
        ``x_init, y_init, x, y, flux, background, fwhm`` and the model's other shape
        parameters, each with ``<name>_err``, then ``chi2, dof, n_iter, flags``
        (:mod:`ztfpsf.flags`). Errors are ``sqrt(diag((J^T W J)^-1))`` at the solution,
        not scaled by chi2/dof; fixed parameters have error 0. A star that cannot be
        measured is a NaN row with its flags set; nothing is raised for a bad star.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {dtype}")
    model = get_model(model, integration)
    data = _as_stamps(data)
    n, ny, nx = data.shape
    variance = _like_stamps("variance", variance, data.shape)
    mask = _like_stamps("mask", mask, data.shape)
    origin = None if origin is None else np.asarray(origin, dtype=np.float64)
    if origin is not None and origin.shape != (n, 2):
        raise ValueError(f"origin must have shape ({n}, 2); got {origin.shape}")
    mode, per_star = noise_mode(variance, gain, read_noise, sky, n)
    sat = _per_star("saturation", saturation, n)
    check_variance(data, variance, mask, sat)
    per_star = np.column_stack([per_star, np.full(n, np.inf) if sat is None else sat])
    fixed_vals = _fixed_params(model, fixed, n)
    free = tuple(i for i in range(model.n_params) if i not in fixed_vals)
    if not free:
        raise ValueError("every parameter is fixed: nothing to fit")
    start, has_init = _start_values(model, fixed_vals, x_init, y_init, origin, n)

    opts = Options(
        max_iter=int(max_iter or _MAX_ITER.get(method, 30)), tol=float(tol), history=bool(return_history),
        reweight=bool(reweight), adam_steps=int(adam_steps), adam_lr=float(adam_lr), noise_mode=mode,
        has_mask=mask is not None, has_variance=variance is not None, dtype=dtype.name,
    )
    devices = select_devices(backend)
    # stamps travel in their own dtype and are cast on the device (no host pass over them)
    data = data if data.dtype in (np.float32, np.float64) else data.astype(dtype)
    if variance is not None and variance.dtype not in (np.float32, np.float64):
        variance = variance.astype(dtype)
    placeholder = np.zeros((n, 1, 1), dtype)
    arrays = (
        data,
        mask.astype(bool, copy=False) if mask is not None else placeholder.astype(bool),
        variance if variance is not None else placeholder,
        per_star.astype(dtype),
        start.astype(dtype),
        has_init,
    )
    if method == "scipy":
        res = _fit_scipy(model, free, opts, arrays, devices, chunk_size, progress)
    else:
        res = run_chunked((_fit_chunk, method, model, free, opts), arrays, devices, chunk_size)
    desc = _NOISE_DESC[mode] + (", refit once" if mode == "model" and reweight else "")
    table = _build_table(model, free, method, opts, res, fixed_vals, origin, (ny, nx), dtype, min_snr, max_shift, desc)
    if return_history:
        table.meta["loss_history"] = _left_aligned(np.asarray(res["history"], dtype=np.float64))
    return table


def _left_aligned(history):
    """Each star's recorded values first, in order (the passes follow each other), NaN after."""
    order = np.argsort(np.isnan(history), axis=1, kind="stable")
    history = np.take_along_axis(history, order, axis=1)
    used = np.any(np.isfinite(history), axis=0)
    return history[:, : (np.nonzero(used)[0].max() + 1 if used.any() else 1)]


def _fit_scipy(model, free, opts, arrays, devices, chunk_size, progress):
    prep = run_chunked((_prepare_chunk, model, free, opts), arrays, devices, chunk_size)
    per_star = arrays[3]
    active = prep["n_valid"] > len(free)
    stamp_shape = arrays[0].shape[1:]
    theta, n_iter, conv, hist = bfgs_solve(
        model, free, opts, stamp_shape, (prep["data"], prep["valid"], prep["variance"], per_star, prep["theta"], active),
        progress=progress,
    )
    dtype = arrays[0].dtype
    fin = run_chunked(
        (_finish_chunk, model, free, opts, stamp_shape),
        (prep["data"], prep["valid"], prep["variance"], per_star, theta.astype(dtype)),
        devices,
        chunk_size,
    )
    res = dict(prep, **fin, n_iter=n_iter, converged=conv)
    if opts.history:
        res["history"] = hist
    return res
