"""Batched truncated-Newton conjugate-gradient (the study's fastest GPU method), pure JAX.

Newton steps solved approximately by conjugate gradients on exact Hessian-vector
products of chi2 (forward-over-reverse autodiff), stopped at negative curvature, then a
backtracking Armijo line search; every star has its own CG state, step and stopping.
"""

import jax
import jax.numpy as jnp

from .objective import chi2

__all__ = ["tncg_solve"]


def _dot(a, b):
    return jnp.sum(a * b, axis=1)


def tncg_solve(model, free, opts, theta0, data, weight, active, xx, yy):
    """Fit one chunk. Returns ``theta, n_iter, converged, history``."""
    idx = jnp.asarray(free)

    def loss(p):
        return jnp.where(active, chi2(model, theta0.at[:, idx].set(p), data, weight, xx, yy), 0.0)

    grad = jax.grad(lambda p: jnp.sum(loss(p)))

    def hvp(p, v):
        return jax.jvp(grad, (p,), (v,))[1]

    def cg(p, g):
        """Approximately solve H d = -g; keeps the last iterate of positive curvature."""
        gnorm = jnp.sqrt(_dot(g, g))
        d = jnp.zeros_like(g)
        r = -g
        q = r
        rr = _dot(r, r)
        stop = gnorm == 0
        for _ in range(opts.cg_iter):
            Hq = hvp(p, q)
            qHq = _dot(q, Hq)
            neg = qHq <= 0
            stop = stop | neg
            a = jnp.where(stop, 0.0, rr / jnp.where(neg | (qHq == 0), 1.0, qHq))
            d = d + a[:, None] * q
            r = r - a[:, None] * Hq
            rr_new = _dot(r, r)
            q = r + (rr_new / jnp.where(rr > 0, rr, 1.0))[:, None] * q
            rr = rr_new
            stop = stop | (jnp.sqrt(rr) < 1e-3 * gnorm)
        # no usable curvature at all: fall back to a scaled steepest-descent step
        nothing = _dot(d, d) == 0
        return jnp.where(nothing[:, None], -g / jnp.maximum(gnorm, 1.0)[:, None], d)

    f0 = loss(theta0[:, idx])
    hist = None
    if opts.history:
        hist = jnp.full((opts.max_iter + 1,) + f0.shape, jnp.nan, f0.dtype).at[0].set(f0)
    done0 = ~active | ~jnp.isfinite(f0)
    state = dict(
        it=jnp.asarray(0), p=theta0[:, idx], f=f0, done=done0,
        converged=jnp.zeros_like(done0), n_iter=jnp.zeros(f0.shape, jnp.int32), hist=hist,
    )

    def body(s):
        p, f, live = s["p"], s["f"], ~s["done"]
        g = grad(p)
        d = cg(p, g)
        slope = _dot(g, d)
        decrement = -0.5 * slope  # predicted chi2 decrease of the Newton step
        t = jnp.ones_like(f)

        def ls_cond(c):
            k, t, fn, okay = c
            return (k < 12) & jnp.any(live & ~okay)

        def ls_body(c):
            k, t, fn, okay = c
            t = jnp.where(okay, t, 0.5 * t)
            fn_new = loss(p + t[:, None] * d)
            fn = jnp.where(okay, fn, fn_new)
            okay = okay | (fn <= f + 1e-4 * t * slope)
            return k + 1, t, fn, okay

        fn = loss(p + d)
        okay = fn <= f + 1e-4 * slope
        _, t, fn, okay = jax.lax.while_loop(ls_cond, ls_body, (0, t, fn, okay))
        accept = live & okay & (fn <= f)
        out = dict(
            it=s["it"] + 1,
            p=jnp.where(accept[:, None], p + t[:, None] * d, p),
            f=jnp.where(accept, fn, f),
            n_iter=s["n_iter"] + live.astype(jnp.int32),
            hist=s["hist"],
        )
        now = live & ((decrement < opts.tol) | (accept & (f - fn < 0.1 * opts.tol)))
        out["converged"] = s["converged"] | now
        out["done"] = s["done"] | now | (live & ~okay)
        if opts.history:
            out["hist"] = s["hist"].at[s["it"] + 1].set(out["f"])
        return out

    def cond(s):
        return (s["it"] < opts.max_iter) & ~jnp.all(s["done"])

    s = jax.lax.while_loop(cond, body, state)
    return theta0.at[:, idx].set(s["p"]), s["n_iter"], s["converged"], s["hist"]
