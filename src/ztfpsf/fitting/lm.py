"""Batched Levenberg-Marquardt on a chunk of stamps (pure JAX).

Every star has its own damping, convergence test and iteration cap; the loop of a chunk
stops when all its stars are done. A star is converged when the chi2 decrease predicted
for the undamped Gauss-Newton step, ``g^T A^-1 g``, falls below ``tol`` (in chi2 units: the
remaining step is ~sqrt(tol) sigma; or below 8 ulps of the star's chi2 where its own
rounding is larger: float32 and chi2 >~ 1,000) -- the test of every other method, and one that the
damping cannot fake: the damped step's predicted decrease shrinks like 1/lambda, so after
a run of rejected steps it would call a star far from its minimum converged. The next
step is computed at the end of an iteration, so a chunk whose stars have all converged
stops without evaluating one more trial. A rejected step raises that star's
damping; a star whose damping runs away, or that reaches ``max_iter``, is stopped and
reported as not converged. Never raises: failures come back as status values.

Large chunks (an accelerator's) would otherwise run every star for as many iterations as
their slowest one needs: there, all stars get ``_BULK_ITER`` iterations, then the stars
still running are gathered into a sub-batch of 1/16 of the chunk and finished there,
round after round (static shapes, still one compiled program).

The parameter vector is one star's (:mod:`ztfpsf.fitting.objective`) unless ``model``
brings its own ``normal_equations(free, theta, data, weight, xx, yy)``: a group of
sources fitted together (:class:`ztfpsf.psf.groups.GroupModel`) runs through the same
loop, one group per row, its normal matrix a dict or, for many parameters, stacked
matrices (:mod:`ztfpsf.fitting.linalg`).
"""

import jax
import jax.numpy as jnp

from . import linalg
from .objective import normal_equations as _star_equations

__all__ = ["lm_solve"]

_LAMBDA0 = 1e-3
_LAMBDA_MIN = 1e-9
_LAMBDA_MAX = 1e10
_COMPACT_MIN = 4096  # chunks at least this large finish their stragglers in a sub-batch
_BULK_ITER = 6
_ROUNDING = 8.0  # chi2 ulps a decrement must exceed to be told from rounding


def normal_equations(model, free, theta, data, weight, xx, yy):
    """chi2, A, g of every row: the model's own equations when it has them, else one star's."""
    own = getattr(model, "normal_equations", None)
    if own is not None:
        return own(free, theta, data, weight, xx, yy)
    return _star_equations(model, free, theta, data, weight, xx, yy)


def _next_step(A, g, lam, n):
    """The damped step, whether it could be solved, and the Gauss-Newton decrement
    ``g^T A^-1 g`` (the undamped step's predicted chi2 decrease: the convergence test)."""
    step, ok = linalg.solve(A, g, n, damping=lam)
    newton, newton_ok = linalg.solve(A, g, n)
    decrement = jnp.where(newton_ok, sum(d * gi for d, gi in zip(newton, g)), jnp.inf)
    return step, decrement, ok


def _tolerance(tol, chi2):
    """``tol``, or what the chi2's own rounding can resolve when that is larger: in float32 a
    star with chi2 ~ 7,000 (a bright galaxy) has chi2 known to ~1e-3, and its decrement
    at that level is rounding, so a test at tol = 1e-3 passed or failed by chance."""
    return jnp.maximum(tol, _ROUNDING * jnp.finfo(chi2.dtype).eps * jnp.abs(chi2))


def _iterate(model, free, opts, data, weight, xx, yy, s):
    """One LM iteration for every live star of the state ``s``."""
    n = len(free)
    live = ~s["done"]
    trial = s["theta"].at[:, jnp.asarray(free)].add(jnp.stack(s["step"], axis=1))
    c2, A2, g2 = normal_equations(model, free, trial, data, weight, xx, yy)
    accept = live & s["ok"] & (c2 < s["chi2"])
    pick = lambda new, old: jnp.where(accept.reshape(accept.shape + (1,) * (new.ndim - 1)), new, old)
    A = jax.tree.map(pick, A2, s["A"])  # a dict of entries, or stacked matrices
    g = [pick(a, b) for a, b in zip(g2, s["g"])]
    lam = jnp.where(accept, jnp.maximum(s["lam"] * 0.3, _LAMBDA_MIN), jnp.where(live, s["lam"] * 10.0, s["lam"]))
    step, decrement, ok = _next_step(A, g, lam, n)
    n_iter = s["n_iter"] + live.astype(jnp.int32)
    chi2 = pick(c2, s["chi2"])
    now_converged = live & ok & (decrement < _tolerance(opts.tol, chi2))
    out = dict(
        theta=jnp.where(accept[:, None], trial, s["theta"]),
        chi2=chi2,
        A=A, g=g, lam=lam, step=step, decrement=decrement, ok=ok, n_iter=n_iter,
        converged=s["converged"] | now_converged,
        done=s["done"] | now_converged | (lam > _LAMBDA_MAX) | (n_iter >= opts.max_iter),
    )
    if opts.history:  # row n_iter of each live star: its chi2 after this iteration
        rows = jnp.where(live, n_iter, opts.max_iter + 1)  # out of range for the others: dropped
        out["hist"] = s["hist"].at[rows, jnp.arange(rows.shape[0])].set(out["chi2"], mode="drop")
    return out


def _loop(model, free, opts, data, weight, xx, yy, s, limit=None):
    """Iterate until every star is done (or ``limit`` iterations)."""

    def cond(c):
        it, s = c
        going = jnp.any(~s["done"])
        return going if limit is None else going & (it < limit)

    def body(c):
        it, s = c
        return it + 1, _iterate(model, free, opts, data, weight, xx, yy, s)

    return jax.lax.while_loop(cond, body, (jnp.asarray(0), s))[1]


def _take(s, idx):
    return {k: (jax.tree.map(lambda a: a[idx], v) if k != "hist" else v[:, idx]) for k, v in s.items()}


def _put(s, idx, sub):
    return {
        k: (jax.tree.map(lambda a, b: a.at[idx].set(b), v, sub[k]) if k != "hist" else v.at[:, idx].set(sub[k]))
        for k, v in s.items()
    }


def _compacted(model, free, opts, data, weight, xx, yy, s):
    s = _loop(model, free, opts, data, weight, xx, yy, s, limit=_BULK_ITER)
    m = data.shape[0] // 16

    def cond(s):
        return jnp.any(~s["done"])

    def body(s):
        idx = jnp.argsort(s["done"], stable=True)[:m]  # stars still running first
        sub = _loop(model, free, opts, data[idx], weight[idx], xx, yy, _take(s, idx))
        return _put(s, idx, sub)

    return jax.lax.while_loop(cond, body, s)


def lm_solve(model, free, opts, theta0, data, weight, active, xx, yy):
    """Fit one chunk. Returns ``theta, chi2, A, g, n_iter, converged, history``.

    ``A = J^T W J`` and ``g = J^T W r`` are those at the returned ``theta``; ``history``
    is ``(max_iter + 1, stars)``: chi2 at the start and after each iteration, NaN after a
    star stopped.
    """
    n = len(free)
    chi2, A, g = normal_equations(model, free, theta0, data, weight, xx, yy)
    lam = jnp.full_like(chi2, _LAMBDA0)
    step, decrement, ok = _next_step(A, g, lam, n)
    live0 = active & jnp.isfinite(chi2)
    converged = live0 & ok & (decrement < _tolerance(opts.tol, chi2))
    s = dict(
        theta=theta0, chi2=chi2, A=A, g=g, lam=lam, step=step, decrement=decrement, ok=ok,
        done=~live0 | converged | (opts.max_iter <= 0), converged=converged,
        n_iter=jnp.zeros(chi2.shape, jnp.int32),
    )  # fmt: skip
    if opts.history:
        s["hist"] = jnp.full((opts.max_iter + 1,) + chi2.shape, jnp.nan, chi2.dtype).at[0].set(chi2)
    if theta0.shape[0] >= _COMPACT_MIN:
        s = _compacted(model, free, opts, data, weight, xx, yy, s)
    else:
        s = _loop(model, free, opts, data, weight, xx, yy, s)
    return s["theta"], s["chi2"], s["A"], s["g"], s["n_iter"], s["converged"], s.get("hist")
