"""Batched Levenberg-Marquardt on a chunk of stamps (pure JAX).

Every star has its own damping and convergence test; the loop of a chunk stops when all
its stars are done. A star is converged when the chi2 decrease predicted for its next
step falls below ``tol`` (in chi2 units: the remaining step is ~sqrt(tol) sigma); the
next step is computed at the end of an iteration, so a chunk whose stars have all
converged stops without evaluating one more trial. A rejected step raises that star's
damping; a star whose damping runs away is stopped and reported as not converged.
Never raises: failures come back as status values.
"""

import jax
import jax.numpy as jnp

from . import linalg
from .objective import normal_equations

__all__ = ["lm_solve"]

_LAMBDA0 = 1e-3
_LAMBDA_MIN = 1e-9
_LAMBDA_MAX = 1e10


def _next_step(A, g, lam, n):
    step, ok = linalg.solve(A, g, n, damping=lam)
    pred = sum(d * gi for d, gi in zip(step, g))
    return step, pred, ok


def lm_solve(model, free, opts, theta0, data, weight, active, xx, yy):
    """Fit one chunk. Returns ``theta, chi2, A, g, n_iter, converged, history``.

    ``A = J^T W J`` and ``g = J^T W r`` are those at the returned ``theta``.
    """
    n = len(free)
    idx = jnp.asarray(free)
    chi2, A, g = normal_equations(model, free, theta0, data, weight, xx, yy)
    lam = jnp.full_like(chi2, _LAMBDA0)
    step, pred, ok = _next_step(A, g, lam, n)
    live0 = active & jnp.isfinite(chi2)
    converged = live0 & ok & (pred < opts.tol)
    hist = None
    if opts.history:
        hist = jnp.full((opts.max_iter + 1,) + chi2.shape, jnp.nan, chi2.dtype).at[0].set(chi2)
    state = dict(
        it=jnp.asarray(0), theta=theta0, chi2=chi2, A=A, g=g, lam=lam,
        step=step, pred=pred, ok=ok,
        done=~live0 | converged, converged=converged,
        n_iter=jnp.zeros(chi2.shape, jnp.int32), hist=hist,
    )

    def body(s):
        live = ~s["done"]
        trial = s["theta"].at[:, idx].add(jnp.stack(s["step"], axis=1))
        c2, A2, g2 = normal_equations(model, free, trial, data, weight, xx, yy)
        accept = live & s["ok"] & (c2 < s["chi2"])
        pick = lambda new, old: jnp.where(accept, new, old)
        A = {k: pick(A2[k], s["A"][k]) for k in s["A"]}
        g = [pick(a, b) for a, b in zip(g2, s["g"])]
        lam = jnp.where(accept, jnp.maximum(s["lam"] * 0.3, _LAMBDA_MIN), jnp.where(live, s["lam"] * 10.0, s["lam"]))
        step, pred, ok = _next_step(A, g, lam, n)
        now_converged = live & ok & (pred < opts.tol)
        out = dict(
            it=s["it"] + 1,
            theta=jnp.where(accept[:, None], trial, s["theta"]),
            chi2=pick(c2, s["chi2"]),
            A=A, g=g, lam=lam, step=step, pred=pred, ok=ok,
            converged=s["converged"] | now_converged,
            done=s["done"] | now_converged | (lam > _LAMBDA_MAX),
            n_iter=s["n_iter"] + live.astype(jnp.int32),
            hist=s["hist"],
        )
        if opts.history:
            out["hist"] = s["hist"].at[s["it"] + 1].set(out["chi2"])
        return out

    def cond(s):
        return (s["it"] < opts.max_iter) & ~jnp.all(s["done"])

    s = jax.lax.while_loop(cond, body, state)
    return s["theta"], s["chi2"], s["A"], s["g"], s["n_iter"], s["converged"], s["hist"]
