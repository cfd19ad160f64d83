"""Per-star ``scipy.optimize.minimize(method='BFGS')``: the study's CPU reference.

Same model and chi2 as the batched methods; value and gradient come from a compiled
single-star JAX function. Parameters are whitened by ``sqrt(diag(J^T W J))`` at the
start so that ``gtol`` means the same for a faint and a bright star. Uncertainties are
NOT BFGS's inverse-Hessian estimate (a secant approximation built from the few steps
taken, which is what made the study's position errors larger than the values): the
caller computes them from ``J^T W J`` at the solution like every other method.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize
from tqdm.auto import tqdm

from .objective import chi2, model_image, noise_weight, normal_equations, pixel_grid

__all__ = ["bfgs_solve"]


@functools.lru_cache(maxsize=16)
def _single_star(model, free, noise_mode, ny, nx, dtype):
    idx = jnp.asarray(free)
    xx, yy = pixel_grid(ny, nx, dtype)

    def weight(theta, valid, variance, noise):
        if noise_mode == "given":
            return jnp.where(valid, 1.0 / variance, 0.0)
        return noise_weight(model_image(model, theta, xx, yy), valid, noise[:, 0], noise[:, 1], noise[:, 2])

    def scale(theta, data, w):
        _, A, _ = normal_equations(model, free, theta, data, w, xx, yy)
        return jnp.stack([jnp.sqrt(jnp.maximum(A[i, i], 1e-30)) for i in range(len(free))], axis=1)

    def loss(z, theta, s, data, w):
        th = theta.at[:, idx].set(theta[:, idx] + z[None] / s)
        return chi2(model, th, data, w, xx, yy)[0]

    return jax.jit(weight), jax.jit(scale), jax.jit(jax.value_and_grad(loss))


def bfgs_solve(model, free, opts, stamp_shape, arrays, progress=False):
    """Fit each active star in turn. Returns ``theta, n_iter, converged, history``.

    ``arrays``: flattened stamps ``(data, valid, variance, per_star, theta0, active)``;
    ``per_star`` columns are gain, read noise, sky.
    """
    data, valid, variance, noise, theta0, active = arrays
    n = data.shape[0]
    noise_mode = "model" if opts.noise_mode == "model" else "given"
    weight_fn, scale_fn, value_grad = _single_star(model, tuple(free), noise_mode, *stamp_shape, np.dtype(data.dtype).name)
    idx = list(free)
    theta = theta0.astype(np.float64).copy()
    n_iter = np.zeros(n, np.int32)
    converged = np.zeros(n, bool)
    histories = [[] for _ in range(n)]
    passes = 2 if (noise_mode == "model" and opts.reweight) else 1
    for i in tqdm(range(n), disable=not progress, desc="scipy BFGS", unit="star"):
        if not active[i]:
            continue
        sl = slice(i, i + 1)
        d, v, var = data[sl], valid[sl], variance[sl]
        nz = noise[sl]
        th = theta[sl].copy()
        for _ in range(passes):
            th_in = th.astype(data.dtype)
            w = weight_fn(th_in, v, var, nz)
            s = scale_fn(th_in, d, w)

            def fun(z, th_in=th_in, s=s, w=w):
                f, g = value_grad(jnp.asarray(z, data.dtype), th_in, s, d, w)
                return float(f), np.asarray(g, dtype=np.float64)

            record = (lambda r, h=histories[i]: h.append(float(r.fun))) if opts.history else None
            res = minimize(fun, np.zeros(len(idx)), jac=True, method="BFGS", callback=record,
                           options={"maxiter": opts.max_iter, "gtol": 1e-3})
            th[0, idx] += res.x / np.asarray(s, dtype=np.float64)[0]
            n_iter[i] += res.nit
            converged[i] = bool(res.success)
        theta[i] = th[0]
    hist = None
    if opts.history:
        k = max(1, max(len(h) for h in histories))
        hist = np.full((n, k), np.nan)
        for i, h in enumerate(histories):
            hist[i, : len(h)] = h
    return theta, n_iter, converged, hist
