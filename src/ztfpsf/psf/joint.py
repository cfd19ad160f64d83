"""Joint PSF fits: one PSF shape shared by all stars, or varying smoothly over the image.

Star ``i`` has its own ``flux, x, y, background`` (its *local* parameters) and the shape
``u_i = C T_i``: ``u`` the model's internal shape parameters (log fwhm, log(alpha - 1),
...), ``T_i`` the polynomial basis at the star's normalised image position and ``C`` the
``(n_shape, n_terms)`` global coefficients (``shared`` = degree 0: one term).

The normal matrix of the whole problem has arrow structure: a 4x4 block per star plus the
small dense block of the coefficients, coupled star by star. A Levenberg-Marquardt step
eliminates the per-star blocks (Schur complement)::

    S   = C + lam diag(C) - sum_i B_i^T (A_ll,i + lam diag(A_ll,i))^-1 B_i
    rhs = g_c - sum_i B_i^T (A_ll,i + lam diag)^-1 g_l,i
    S dc = rhs;   dl_i = (A_ll,i + lam diag)^-1 (g_l,i - B_i dc)

so a step costs one pass over the stars plus one dense ``n_coef x n_coef`` solve: linear in
the number of stars. ``S`` is summed per star as ``R_i (x) T_i T_i^T`` with
``R_i = A_uu - A_ul A_ll^-1 A_lu`` (the star's shape information once its own flux,
position and background are marginalised). One damping ``lam`` for the whole problem;
a step is accepted when the total chi2 of the training stars decreases. The global sums
are accumulated and solved in float64 whatever the stamps' dtype.

The solver is one compiled program per (model, stamp shape, number of terms, padded
number of stars, devices): stars are split over the devices (``shard_map``, sums with
``psum``) and, on each device, normal equations are computed chunk by chunk (``lax.map``,
cache-sized). Pure JAX, no I/O.

After the joint loop, the same program fits every active star that did not constrain the
PSF (reserve stars, outliers) with the PSF held fixed: flux, x, y, background by the
per-star LM of :mod:`ztfpsf.fitting.lm`. Stars are ordered so that each phase skips the
chunks it has nothing to do in.

:func:`fit_psf` is the user-facing entry: moment-based starting values, reserve stars,
rounds of outlier clipping (each round re-weights the pixels with the model of the
previous one), results as a table and a :class:`~ztfpsf.psf.model.PSFModel`.
"""

import functools
import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from astropy.table import Table
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .. import __version__
from .._jax import with_x64
from ..fitting import linalg
from ..fitting.api import _per_star, border_variance, check_variance, value_columns
from ..fitting.api import noise_mode as noise_mode_of
from ..fitting.batching import bucket, select_devices
from ..fitting.lm import lm_solve
from ..fitting.moments import initial_guess
from ..fitting.objective import flatten, model_image, noise_weight, normal_equations, pixel_grid
from ..flags import BAD, Flag
from ..models import get_model
from .basis import basis_terms, legendre_basis, normalise
from .brighter_fatter import log_flux
from .measure import usable_pixels
from .model import PSFModel
from .residual import Hybrid, ResidualGrid, ResidualOptions, residual_nodes, residual_prior, solve_residual, surface_constraints

__all__ = ["fit_psf", "MODES", "JointOptions", "joint_solve", "N_LOCAL"]

log = logging.getLogger(__name__)

#: Local parameters per star: flux, x, y, background.
N_LOCAL = 4
_LAMBDA0 = 1e-3
_LAMBDA_MIN = 1e-9
_LAMBDA_MAX = 1e10
_CHUNK = 128


# --------------------------------------------------------------------------------------
# the compiled solver
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JointOptions:
    """Static options of the joint solver (hashable: part of the compiled program's key).

    ``tol``: the joint fit has converged when the chi2 decrease predicted for the next
    step is below ``tol`` for the coefficients (after marginalising the stars) and below
    ``tol`` per star on average; then each star whose own step would still gain ``tol``
    or more, and each star left out of the joint fit, gets its own LM with the PSF fixed,
    to ``tol`` per star.
    """

    max_iter: int = 40
    tol: float = 1e-3
    noise: str = "model"  # 'model' (gain/read noise, weights from the starting model) or 'given'
    ny: int = 17
    nx: int = 17
    history: bool = False  # (read by fitting.lm.lm_solve)


def _split_A(A, g, n_par):
    """float64 blocks of one batch's normal equations: local (dict), local-shape, shape-shape.

    The Schur complement subtracts nearly equal numbers for bright stars: float32 blocks
    make it indefinite, so everything after the pixel sums is float64 (cheap: per star).
    """
    loc = (0, 1, 2, n_par - 1)
    shp = tuple(range(3, n_par - 1))
    get = lambda i, j: A[max(i, j), min(i, j)].astype(jnp.float64)
    A_ll = {(a, b): get(loc[a], loc[b]) for a in range(N_LOCAL) for b in range(a + 1)}
    A_lu = jnp.stack([jnp.stack([get(i, k) for k in shp], axis=-1) for i in loc], axis=-2)
    A_uu = jnp.stack([jnp.stack([get(k, m) for m in shp], axis=-1) for k in shp], axis=-2)
    g_l = jnp.stack([g[i] for i in loc], axis=-1).astype(jnp.float64)
    g_u = jnp.stack([g[k] for k in shp], axis=-1).astype(jnp.float64)
    return A_ll, A_lu, A_uu, g_l, g_u


def _theta(local, coef, T, nodes):
    """Per-star ``theta = [flux, x, y, *u, *nodes, background]`` with ``u = coef @ T_i``
    (``nodes``: a hybrid PSF's residual at each star, fixed; ``(N, 0)`` otherwise)."""
    u = T @ coef.T.astype(T.dtype)
    local = local.astype(T.dtype)
    return jnp.concatenate([local[:, :3], u, nodes.astype(T.dtype), local[:, 3:]], axis=1)


def _fitted_shape(model):
    """Number of shape parameters the joint fit adjusts: the analytic core's (a hybrid
    PSF's residual nodes are fitted by :func:`ztfpsf.psf.residual.solve_residual`)."""
    return getattr(model, "core", model).n_shape


def _chunked(fn, chunk, needed, *arrays):
    """``fn`` over the stars of ``arrays`` chunk by chunk (keeps each chunk in cache);
    a chunk without any ``needed`` star is skipped (zeros). :func:`joint_solve` orders
    the stars so that those a phase works on share chunks."""
    n = arrays[0].shape[0]
    chunk = min(chunk, n)
    xs = tuple(a.reshape((n // chunk, chunk) + a.shape[1:]) for a in arrays)
    shapes = jax.eval_shape(fn, *(x[0] for x in xs))
    skip = lambda *c: jax.tree.map(lambda sd: jnp.zeros(sd.shape, sd.dtype), shapes)
    nd = needed.reshape(n // chunk, chunk)
    out = jax.lax.map(lambda c: jax.lax.cond(jnp.any(c[0]), lambda: fn(*c[1:]), lambda: skip()), (nd,) + xs)
    return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:]), out)


def _schur(A_ll, A_lu, A_uu, g_l, g_u, lam):
    """Per star: damped ``A_ll^-1`` (dense), ``M = A_ll^-1 A_lu``, ``h = A_ll^-1 g_l``, the
    reduced shape matrix ``R`` and gradient ``r``, and whether ``A_ll`` was positive definite."""
    A_d = dict(A_ll)
    for a in range(N_LOCAL):
        A_d[a, a] = A_ll[a, a] * (1.0 + lam)
    inv, ok = linalg.inverse(A_d, N_LOCAL)
    inv = linalg.to_dense(inv, N_LOCAL)
    M = jnp.einsum("nab,nbk->nak", inv, A_lu)
    h = jnp.einsum("nab,nb->na", inv, g_l)
    R = A_uu - jnp.einsum("nak,nam->nkm", A_lu, M)
    r = g_u - jnp.einsum("nak,na->nk", A_lu, h)
    return inv, M, h, R, r, ok


def _program(model, opts, n_terms, multi):
    n_shape = _fitted_shape(model)
    n_par = model.n_params
    free = tuple(range(3 + n_shape)) + (n_par - 1,)  # flux, x, y, the fitted shape, background
    n_free = len(free)
    local_free = (0, 1, 2, n_par - 1)
    P = n_shape * n_terms
    f64 = jnp.float64
    allsum = (lambda v: jax.lax.psum(v, "stars")) if multi else (lambda v: v)

    def solve(data, valid, variance, noise, local0, T, nodes, use, active, coef0):
        dtype = data.dtype
        xx, yy = pixel_grid(opts.ny, opts.nx, dtype)
        coef0 = coef0.astype(f64)
        local0 = local0.astype(f64)
        if opts.noise == "given":
            weight = jnp.where(valid, 1.0 / variance, 0.0)
        else:
            img = model_image(model, _theta(local0, coef0, T, nodes), xx, yy)
            weight = noise_weight(img, valid, noise[:, 0], noise[:, 1], noise[:, 2])
        n_valid = jnp.sum(valid, axis=1)
        active = active & (n_valid > N_LOCAL)
        chunk = min(_CHUNK, data.shape[0])
        Tf = T.astype(f64)

        def terms(local, coef, use):
            def one(lo, Tc, nd, d, w):
                return normal_equations(model, free, _theta(lo, coef, Tc, nd), d, w, xx, yy)

            chi2, A, g = _chunked(one, chunk, use, local, T, nodes, data, weight)
            return (chi2.astype(f64),) + _split_A(A, g, n_free)

        def finite(t):
            ok = jnp.isfinite(t[0])
            for a in jax.tree.leaves(t[1:]):
                ok = ok & jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1)
            return ok

        def global_sums(w, R, r, A_uu):
            wf = w.astype(f64)
            S = allsum(jnp.einsum("n,nkm,nj,nl->kjml", wf, R, Tf, Tf)).reshape(P, P)
            rhs = allsum(jnp.einsum("n,nk,nj->kj", wf, r, Tf)).reshape(P)
            dC = allsum(jnp.einsum("n,nkk,nj->kj", wf, A_uu, Tf * Tf)).reshape(P)
            return S, rhs, dC

        def step(t, use, lam):
            """Damped LM step of the whole problem from the normal equations ``t``."""
            _, A_ll, A_lu, A_uu, g_l, g_u = t
            inv, M, h, R, r, ok = _schur(A_ll, A_lu, A_uu, g_l, g_u, lam)
            w = use & ok
            S, rhs, dC = global_sums(w, R, r, A_uu)
            S = S + jnp.diag(lam * dC)  # Marquardt damping of the coefficient block
            sc = jax.lax.rsqrt(jnp.maximum(jnp.diag(S), 1e-300))
            L = jnp.linalg.cholesky(S * sc[:, None] * sc[None, :])
            dc = sc * jax.scipy.linalg.cho_solve((L, True), rhs * sc)
            ok_g = jnp.all(jnp.isfinite(dc))
            dc = jnp.where(ok_g, dc, 0.0)
            du = Tf @ dc.reshape(n_shape, n_terms).T
            dl = jnp.where(w[:, None], h - jnp.einsum("nak,nk->na", M, du), 0.0)
            pred_g = jnp.dot(dc, rhs)
            pred_l = allsum(jnp.sum(jnp.where(w, jnp.sum(h * g_l, axis=1), 0.0)))
            n_w = allsum(jnp.sum(w))
            conv = ok_g & (pred_g < opts.tol) & (pred_l < opts.tol * jnp.maximum(n_w, 1))
            return dl, dc.reshape(n_shape, n_terms), ok_g, conv

        def placeholder():
            """Zero normal equations with the right shapes (replaced at the first iteration)."""
            n = data.shape[0]
            z = jnp.zeros(n, f64)
            A_ll = {(a, b): z for a in range(N_LOCAL) for b in range(a + 1)}
            return (z, A_ll, jnp.zeros((n, N_LOCAL, n_shape), f64), jnp.zeros((n, n_shape, n_shape), f64),
                    jnp.zeros((n, N_LOCAL), f64), jnp.zeros((n, n_shape), f64))

        # The first iteration evaluates the start (a zero step against chi2 = inf): the
        # normal equations appear once in the program, which halves its compile time.
        state = dict(
            it=jnp.asarray(0), local=local0, coef=coef0, t=placeholder(), total=jnp.asarray(jnp.inf, f64),
            lam=jnp.asarray(_LAMBDA0 / 0.3, f64), dl=jnp.zeros_like(local0), dc=jnp.zeros_like(coef0),
            ok=jnp.asarray(True), conv=jnp.asarray(False), done=jnp.asarray(False), use=use & active,
        )

        def body(s):
            trial_local = s["local"] + s["dl"]
            trial_coef = s["coef"] + s["dc"]
            t2 = terms(trial_local, trial_coef, s["use"])
            first = s["it"] == 0
            use = jnp.where(first, s["use"] & finite(t2), s["use"])  # stars unusable at the start
            tot2 = allsum(jnp.sum(jnp.where(use, t2[0], 0.0)))
            accept = s["ok"] & jnp.isfinite(tot2) & (tot2 <= s["total"])
            t = jax.tree.map(lambda a, b: jnp.where(accept, a, b), t2, s["t"])
            lam = jnp.where(accept, jnp.maximum(s["lam"] * 0.3, _LAMBDA_MIN), s["lam"] * 10.0)
            dl, dc, okg, conv = step(t, use, lam)
            conv = conv & ~first
            return dict(
                it=s["it"] + 1,
                local=jnp.where(accept, trial_local, s["local"]),
                coef=jnp.where(accept, trial_coef, s["coef"]),
                t=t, total=jnp.where(accept, tot2, s["total"]), lam=lam,
                dl=dl, dc=dc, ok=okg, conv=conv, done=conv | (lam > _LAMBDA_MAX), use=use,
            )

        def cond(s):
            return (s["it"] < opts.max_iter + 1) & ~s["done"]

        s = jax.lax.while_loop(cond, body, state)
        used = s["use"]
        local, coef = s["local"], s["coef"]

        # uncertainties at the solution (no damping): the coefficients' covariance is
        # S^-1; each star's local parameters are marginalised over the coefficients
        chi2, A_ll, A_lu, A_uu, g_l, g_u = s["t"]
        inv, M, h, R, r, ok = _schur(A_ll, A_lu, A_uu, g_l, g_u, 0.0)
        used = used & ok
        S, _, _ = global_sums(used, R, r, A_uu)
        sc = jax.lax.rsqrt(jnp.maximum(jnp.diag(S), 1e-300))
        cov_c = jnp.linalg.inv(S * sc[:, None] * sc[None, :]) * sc[:, None] * sc[None, :]
        Mf = jnp.einsum("nak,nj->nakj", M, Tf).reshape(M.shape[0], N_LOCAL, P)
        var_joint = jnp.diagonal(inv, axis1=1, axis2=2) + jnp.einsum("nap,pq,naq->na", Mf, cov_c, Mf)

        # a star of the joint fit has converged when its own Gauss-Newton step (PSF held,
        # undamped) predicts a chi2 decrease below tol: the sum over stars can pass while
        # single stars are still far from their minimum. Those, and every star not in the
        # joint fit, get their own LM on flux, x, y, background with the PSF fixed.
        at_minimum = used & (jnp.sum(h * g_l, axis=1) < opts.tol)
        other = active & ~at_minimum
        theta0 = _theta(local, coef, T, nodes)

        def polish(th, d, w, act):
            th, c2, A, g, n_it, conv, _ = lm_solve(model, local_free, opts, th, d, w, act, xx, yy)
            cov, ok = linalg.inverse(A, N_LOCAL)
            var = jnp.stack([cov[i, i] for i in range(N_LOCAL)], axis=1)
            return th, c2, var, n_it, conv, ok

        th_p, chi2_p, var_p, it_p, conv_p, ok_p = _chunked(polish, chunk, other, theta0, data, weight, other)
        local_p = th_p[:, jnp.asarray(local_free)].astype(f64)
        pick = lambda a, b, where=other: jnp.where(where.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
        # stars of the joint fit keep their variances marginalised over the coefficients
        return dict(
            local=pick(local_p, local), coef=coef, cov=cov_c, chi2=pick(chi2_p.astype(f64), chi2), n_valid=n_valid,
            var_local=pick(var_p.astype(f64), var_joint, other & ~used), ok=pick(ok_p, ok), used=used,
            conv_local=pick(conv_p, jnp.ones_like(conv_p)), n_iter_local=it_p,
            n_iter=s["it"] - 1, converged=s["conv"], total=s["total"], lam=s["lam"],
        )

    return solve


_GLOBAL_OUT = ("coef", "cov", "n_iter", "converged", "total", "lam")
_STAR_OUT = ("local", "chi2", "n_valid", "var_local", "ok", "used", "conv_local", "n_iter_local")


@functools.lru_cache(maxsize=32)
def _compiled(model, opts, n_terms, devices):
    multi = len(devices) > 1
    fn = _program(model, opts, n_terms, multi)
    if not multi:
        return jax.jit(fn), None
    mesh = Mesh(np.array(devices), ("stars",))
    star, rep = PartitionSpec("stars"), PartitionSpec()
    out_specs = {k: rep for k in _GLOBAL_OUT} | {k: star for k in _STAR_OUT}
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(star,) * 9 + (rep,), out_specs=out_specs, check_vma=False)
    return jax.jit(mapped), (NamedSharding(mesh, star), NamedSharding(mesh, rep))


def _padded_size(n, ndev):
    """Stars per program: per device the batching rule's bucket (>= 8; a power of two or
    1.5x one), a whole number of chunks."""
    per = max(8, bucket(-(-n // ndev)))
    return (-(-per // _CHUNK) * _CHUNK if per > _CHUNK else per) * ndev


def _pad(a, total):
    a = np.asarray(a)
    if a.shape[0] == total:
        return a
    return np.concatenate([a, np.zeros((total - a.shape[0],) + a.shape[1:], a.dtype)])


def _place(arrays, replicated, devices, sharding):
    if sharding is None:
        return [jax.device_put(a, devices[0]) for a in arrays] + [jax.device_put(r, devices[0]) for r in replicated]
    return [jax.device_put(a, sharding[0]) for a in arrays] + [jax.device_put(r, sharding[1]) for r in replicated]


def _layout(n, use, active, ndev):
    """Order of the stars in the program: on each device the PSF stars, then the other
    active stars, then the rest, so that each phase skips whole chunks; round-robin over
    the devices keeps their work even. Returns ``(perm, total)``: ``perm[j]`` is the star
    at slot ``j`` (-1: padding)."""
    per = _padded_size(n, ndev) // ndev
    category = np.where(use & active, 0, np.where(active, 1, 2))
    order = np.argsort(category, kind="stable")
    perm = np.full(per * ndev, -1)
    for d in range(ndev):
        block = order[d::ndev]
        perm[d * per: d * per + block.size] = block
    return perm, per * ndev


def joint_solve(model, opts, data, valid, variance, noise, local0, T, use, coef0, devices, active=None, nodes=None):
    """Run the compiled joint LM. Numpy in (stars on axis 0), numpy out.

    data, valid, variance: ``(N, ny, nx)`` (variance may be ``(N, 1, 1)`` when unused);
    noise: ``(N, 3)`` gain, read noise, sky; local0: ``(N, 4)`` flux, x, y, background in
    stamp coordinates; T: ``(N, n_terms)`` basis values; use: ``(N,)`` bool, the stars that
    constrain the PSF; active: the stars to measure at all (default: all); coef0:
    ``(n_shape, n_terms)``; nodes: ``(N, grid.size)`` a hybrid model's residual nodes
    at each star (held fixed; the analytic shape is fitted under them). Active stars not
    used for the PSF are fitted with it fixed.

    Returns a dict: per star ``local, chi2, n_valid, var_local`` (variances of the local
    parameters: marginalised over the coefficients for the stars of the joint fit),
    ``ok`` (positive-definite normal matrix), ``used``, ``conv_local, n_iter_local`` (the
    fixed-PSF fits); global ``coef, cov`` (covariance of the flattened ``coef``,
    shape-major), ``n_iter, converged, total`` (chi2 of the used stars), ``lam``.
    """
    n = data.shape[0]
    dtype = data.dtype
    if variance.shape[1:] != data.shape[1:]:
        variance = np.broadcast_to(variance, data.shape)
    use = np.asarray(use, bool)
    active = np.ones(n, bool) if active is None else np.asarray(active, bool)
    perm, total = _layout(n, use, active, len(devices))
    slot = perm >= 0
    take = lambda a: np.where(slot.reshape((-1,) + (1,) * (np.ndim(a) - 1)), np.asarray(a)[np.maximum(perm, 0)], 0)
    noise = np.array(noise, dtype=dtype)
    noise[:, 0] = np.where(noise[:, 0] > 0, noise[:, 0], 1.0)
    arrays = [
        flatten(take(data)),
        flatten(take(valid)).astype(bool),
        flatten(take(np.where(np.asarray(valid), variance, 1.0).astype(dtype))),
        take(noise),
        take(local0.astype(np.float64)),
        take(T.astype(dtype)),
        take(np.zeros((n, 0), dtype) if nodes is None else nodes.astype(dtype)),
        take(use & active).astype(bool),
        take(active).astype(bool),
    ]
    arrays[3][~slot, 0] = 1.0  # padding: unit gain keeps its zero-weight arithmetic finite
    fn, sharding = _compiled(model, opts, int(T.shape[1]), tuple(devices))
    out = fn(*_place(arrays, [np.asarray(coef0, dtype=np.float64)], devices, sharding))
    res = {}
    for k, v in out.items():
        v = np.asarray(v)
        if k in _STAR_OUT:
            back = np.empty((n,) + v.shape[1:], v.dtype)
            back[perm[slot]] = v[slot]
            v = back
        res[k] = v
    return res


_initial_guess = jax.jit(initial_guess)


def starting_values(data, valid, x_init, y_init):
    """Per-star ``(flux, x, y, fwhm, background)`` from the pixels (stamp coordinates):
    :func:`ztfpsf.fitting.moments.initial_guess`, stars padded to a power of two."""
    n = data.shape[0]
    total = _padded_size(n, 1)
    has = np.full(total, x_init is not None)
    xi = np.zeros(total) if x_init is None else _pad(np.asarray(x_init, np.float64), total)
    yi = np.zeros(total) if y_init is None else _pad(np.asarray(y_init, np.float64), total)
    d = _pad(data, total)
    out = _initial_guess(d, _pad(valid, total), xi.astype(d.dtype), yi.astype(d.dtype), has)
    return [np.asarray(o, dtype=np.float64)[:n] for o in out]


# --------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------
MODES = ("shared", "varying")


def _initial_internal(model, fwhm):
    """Per-star internal shape from a width guess (alpha 3, round), ``(N, n_shape)``."""
    fwhm = np.clip(np.asarray(fwhm, dtype=np.float64), 0.5, None)
    z = np.zeros_like(fwhm)
    if model.name == "gaussian":
        sigma = fwhm / 2.3548200450309493
        shape = (sigma, sigma, z)
    elif model.name == "elliptical_moffat":
        shape = (fwhm, z + 3.0, z, z)
    else:
        shape = (fwhm, z + 3.0)
    u = model.shape_to_internal(tuple(jnp.asarray(v) for v in shape))
    return np.stack([np.asarray(v, dtype=np.float64) for v in u], axis=1)


def _initial_coefficients(u, T, sel, clip=4.0):
    """Robust least-squares polynomial of per-star starting shapes (two clipping passes)."""
    keep = sel & np.all(np.isfinite(u), axis=1)
    coef = np.zeros((u.shape[1], T.shape[1]))
    if keep.any():
        coef[:, 0] = np.median(u[keep], axis=0)
    if keep.sum() < 3 * T.shape[1]:
        return coef
    for _ in range(2):
        sol, *_ = np.linalg.lstsq(T[keep], u[keep], rcond=None)
        coef = sol.T
        res = u - T @ coef.T
        mad = 1.4826 * np.median(np.abs(res[keep]), axis=0)
        keep = keep & np.all(np.abs(res) <= clip * np.maximum(mad, 1e-6), axis=1)
    return coef


def _clip_levels(chi2_dof, dof, flux, used, clip):
    """Per-star chi2/dof above which a star is an outlier, and the robust sigma used.

    Real PSFs are never exactly the model: the chi2/dof of bright stars rises with flux.
    So the reference is taken among stars of similar flux: in flux-quantile bins (about
    100 used stars each, at most 8), ``median + clip * sigma`` with ``sigma`` the robust
    (1.4826 MAD) scatter, at least the statistical ``sqrt(2 / dof)`` of chi2/dof.
    """
    n = chi2_dof.size
    level, sigma = np.full(n, np.inf), np.full(n, np.inf)
    idx = np.flatnonzero(used & np.isfinite(chi2_dof) & np.isfinite(flux))
    if idx.size < 5:
        return level, sigma
    nb = int(np.clip(idx.size // 100, 1, 8))
    edges = np.quantile(flux[idx], np.linspace(0.0, 1.0, nb + 1))
    which = np.clip(np.searchsorted(edges, np.nan_to_num(flux, nan=np.inf), side="right") - 1, 0, nb - 1)
    floor = np.sqrt(2.0 / max(np.median(dof[idx]), 1.0))
    for b in range(nb):
        r = chi2_dof[idx[which[idx] == b]]
        med = np.median(r)
        sig = max(1.4826 * np.median(np.abs(r - med)), floor)
        level[which == b], sigma[which == b] = med + clip * sig, sig
    return level, sigma


def _new_outliers(chi2_dof, level, sigma, used, max_fraction):
    """Used stars beyond their level, at most ``max_fraction`` of the used stars (worst first)."""
    with np.errstate(invalid="ignore"):
        excess = np.where(used, (chi2_dof - level) / sigma, -np.inf)
        excess = np.where(used & ~np.isfinite(chi2_dof), np.inf, excess)
    beyond = np.flatnonzero(excess > 0)
    cap = max(1, int(max_fraction * used.sum()))
    if beyond.size > cap:
        beyond = beyond[np.argsort(excess[beyond])[::-1][:cap]]
    out = np.zeros(used.shape, bool)
    out[beyond] = True
    return out


def _bounds(image_shape, origin, stamp_shape):
    if image_shape is not None:
        ny, nx = image_shape
        return (-0.5, nx - 0.5, -0.5, ny - 0.5)
    sy, sx = stamp_shape
    return (
        float(np.nanmin(origin[:, 0])) - 0.5,
        float(np.nanmax(origin[:, 0])) + sx - 0.5,
        float(np.nanmin(origin[:, 1])) - 0.5,
        float(np.nanmax(origin[:, 1])) + sy - 0.5,
    )


@with_x64
def fit_psf(
    data,
    *,
    variance=None,
    mask=None,
    gain=None,
    read_noise=None,
    sky=0.0,
    saturation=None,
    x_init=None,
    y_init=None,
    origin=None,
    image_shape=None,
    model="moffat",
    integration=None,
    mode="varying",
    degree=2,
    reserve=0.1,
    clip=5.0,
    max_rounds=5,
    max_clip_fraction=0.05,
    seed=0,
    dtype="float32",
    max_iter=40,
    tol=1e-3,
    max_shift=3.0,
    backend="auto",
    image=None,
    hybrid=False,
    residual_degree=0,
    oversampling=2,
    residual_radius=8,
    hybrid_rounds=8,
    residual_flux=False,
):
    """Fit one PSF to all stars of an image: a shared shape, or a shape varying over it.

    Parameters
    ----------
    data, variance, mask, gain, read_noise, sky, saturation, x_init, y_init, origin, dtype
        As in :func:`ztfpsf.fit_stamps` (stamps ``(N, ny, nx)`` in ADU; ``origin`` the
        image coordinates of each stamp's pixel [0, 0]; ``x_init, y_init`` in image
        coordinates when ``origin`` is given, else from the pixels).
    image_shape : (ny, nx), optional
        Size of the image: the PSF's region of validity (and polynomial normalisation)
        is then the whole image. Default: the bounding box of the stamps.
    model : {'moffat', 'elliptical_moffat', 'gaussian'}
    mode : {'shared', 'varying'}
        ``shared``: one shape for all stars; ``varying``: every internal shape parameter
        (log fwhm, log(alpha - 1), ellipticity...) a Legendre polynomial of total degree
        ``degree`` in x, y over the image.
    reserve : float
        Fraction of the usable stars (random, ``seed``) left out of the PSF fit, then
        measured with the final PSF fixed and scored (flag ``RESERVED``).
    clip : float
        Stars whose chi2/dof exceeds the median of the fitted stars of similar flux by
        more than ``clip`` robust sigmas are removed (at most ``max_clip_fraction`` of
        them per round, the worst first) and the PSF refitted (flag ``OUTLIER``); at most
        ``max_rounds`` fits. Each round re-weights the pixels with the previous model.
        Reserve stars beyond the same level are flagged ``OUTLIER`` too and not scored.
    max_iter, tol
        Per round: iteration cap; converged when the predicted chi2 decrease is below
        ``tol`` for the coefficients and per star on average.
    max_shift : float
        Flag ``CENTER_SHIFT`` when a star moved more than this [px] from its start.
    image : str, optional
        Path of the image (provenance, written into the PSF file).
    hybrid : bool
        Add a pixel-level residual surface to the analytic PSF (:mod:`ztfpsf.psf.residual`):
        the analytic part is fitted first as above, then the residual (cubic B-splines
        every ``1/oversampling`` px out to ``residual_radius`` px, each node a Legendre
        polynomial of degree ``residual_degree`` in x, y) and every star's flux, position
        and background are fitted in turn, ``hybrid_rounds`` times, outliers re-judged
        with the whole PSF each round. Real PSFs are not Moffats: on the ZTF quadrant this
        takes the reserve stars' chi2/dof from ~3.5 to ~1.4.
    residual_flux : bool
        Give the residual surface a flux term: a star of flux ``F`` adds ``(log10 F -
        log10 F_ref)`` times one more surface (the same everywhere on the image; it moves
        light and adds none, :func:`~ztfpsf.psf.residual.surface_constraints`), with
        ``F_ref`` the fit's stars' flux-weighted mean log flux and ``F`` clamped to their
        1st-99th percentiles (:attr:`PSFModel.residual_flux`). ZTF's undersampled cores
        change with the flux, so a flux-independent PSF biases faint against bright
        stars' fluxes (the README's PSF - aperture slope).

    Returns
    -------
    psf : :class:`ztfpsf.psf.PSFModel`
    table : astropy.table.Table
        One row per stamp with the columns of :func:`ztfpsf.fit_stamps`; the shape
        columns are the PSF's shape at the star (errors from the coefficients'
        covariance). Stars of the fit: flux, position and background from the joint fit,
        their errors marginalised over the PSF coefficients. Every other star (reserve,
        outliers) is measured with the final PSF held fixed. Stars without usable pixels
        or without positive flux: NaN rows (``NO_DATA`` / ``NO_SOURCE``).
    stats : dict
        ``model, mode, degree, n_stars, n_fit, n_reserve, n_outlier, n_excluded,
        chi2_dof_train, chi2_dof_reserve, converged, n_iter, rounds, fwhm_median``,
        ``hybrid``, ``residual_flux`` and ``reserve_by_snr`` (chi2/dof and count of the scored reserve stars
        per S/N bin ``20-50, 50-100, 100-300, >300``).
    """
    if mode == "independent":
        raise ValueError("mode 'independent' is a per-star fit: use ztfpsf.fit_stamps")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    degree = 0 if mode == "shared" else int(degree)
    if not 0 <= degree <= 6:
        raise ValueError(f"degree must be in 0..6; got {degree}")
    if not 0.0 <= reserve < 1.0:
        raise ValueError(f"reserve must be a fraction in [0, 1); got {reserve}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0; got {clip}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {dtype}")
    m = get_model(model, integration)
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 3 or min(data.shape[1:]) < 5:
        raise ValueError(f"data must be a stack of stamps (N, ny, nx), ny, nx >= 5; got shape {data.shape}")
    n, sy, sx = data.shape
    origin = np.zeros((n, 2)) if origin is None else np.asarray(origin, dtype=np.float64)
    if origin.shape != (n, 2):
        raise ValueError(f"origin must have shape ({n}, 2); got {origin.shape}")
    if (x_init is None) != (y_init is None):
        raise ValueError("give both x_init and y_init, or neither")
    if variance is not None:
        variance = np.broadcast_to(np.asarray(variance, np.float64), data.shape)
    bounds = _bounds(image_shape, origin, (sy, sx))
    K = len(basis_terms(degree))
    devices = select_devices(backend)

    # pixels and noise
    check_variance(data, variance, mask, None if saturation is None else np.broadcast_to(np.asarray(saturation, np.float64), (n,)))
    valid, flags_px = usable_pixels(data, mask, saturation, variance)
    noise_mode, noise = noise_mode_of(variance, gain, read_noise, sky, n)
    if noise_mode == "border":
        variance, noise_mode = np.asarray(border_variance(data, valid)), "given"
    var_arr = variance if noise_mode == "given" else np.ones((n, 1, 1))
    data_c = np.where(valid, data, 0.0).astype(dtype)

    # starting values from the pixels; stars without usable pixels or flux are left out
    xi = None if x_init is None else _per_star("x_init", x_init, n) - origin[:, 0]
    yi = None if y_init is None else _per_star("y_init", y_init, n) - origin[:, 1]
    flux0, x0, y0, fwhm0, bg0 = starting_values(data_c, valid, xi, yi)
    n_valid = valid.sum(axis=(1, 2))
    no_data = n_valid <= N_LOCAL + m.n_shape
    inside = (x0 > -0.5) & (x0 < sx - 0.5) & (y0 > -0.5) & (y0 < sy - 0.5)
    no_source = ~no_data & ~(np.isfinite(flux0) & (flux0 > 0) & inside)
    cand = ~no_data & ~no_source & np.isfinite(bg0)
    n_cand = int(cand.sum())
    min_stars = max(3 * K * m.n_shape, 5)
    if n_cand < min_stars:
        raise ValueError(f"only {n_cand} usable stars for a {mode} PSF of degree {degree} ({m.name}); need >= {min_stars}")
    reserved = np.zeros(n, bool)
    n_res = min(int(round(reserve * n_cand)), n_cand - min_stars)
    if n_res > 0:
        reserved[np.random.default_rng(seed).choice(np.flatnonzero(cand), n_res, replace=False)] = True
    train = cand & ~reserved

    xs, ys = x0 + origin[:, 0], y0 + origin[:, 1]  # image positions of the basis (fixed)
    T = legendre_basis(*normalise(np.where(cand, xs, 0.0), np.where(cand, ys, 0.0), bounds), degree)
    local = np.stack([np.where(cand, flux0, 1.0), np.where(cand, x0, 0.0), np.where(cand, y0, 0.0), np.where(cand, bg0, 0.0)], 1)
    coef = _initial_coefficients(_initial_internal(m, fwhm0), T, train)
    opts = JointOptions(max_iter=int(max_iter), tol=float(tol), noise=noise_mode, ny=sy, nx=sx)

    outlier = np.zeros(n, bool)
    n_iter = 0
    max_rounds = min(max_rounds, 2) if hybrid else max_rounds  # the hybrid rounds clip with the whole PSF
    for rounds in range(1, max_rounds + 1):
        res = joint_solve(m, opts, data_c, valid, var_arr, noise, local, T, train & ~outlier, coef, devices, active=cand)
        n_iter += int(res["n_iter"])
        local, coef = np.where(np.isfinite(res["local"]), res["local"], local), res["coef"]
        dof = res["n_valid"] - N_LOCAL
        with np.errstate(invalid="ignore", divide="ignore"):
            chi2_dof = res["chi2"] / dof
        level, sigma = _clip_levels(chi2_dof, dof, res["local"][:, 0], res["used"], clip)
        new = _new_outliers(chi2_dof, level, sigma, res["used"], max_clip_fraction)
        log.debug("joint round %d: %d iterations, chi2 %.1f, %d new outliers", rounds, res["n_iter"], res["total"], new.sum())
        # stop when nothing was clipped, after at least one re-weighting (model noise); the
        # last round's outliers are excluded and the PSF refitted once more without them,
        # so the final state never holds a star it flags
        if not new.any() and (noise_mode != "model" or rounds >= 2):
            break
        outlier |= new
        if rounds == max_rounds:
            res = joint_solve(m, opts, data_c, valid, var_arr, noise, local, T, train & ~outlier, coef, devices, active=cand)
            n_iter += int(res["n_iter"])
            local, coef = np.where(np.isfinite(res["local"]), res["local"], local), res["coef"]
            with np.errstate(invalid="ignore", divide="ignore"):
                chi2_dof = res["chi2"] / (res["n_valid"] - N_LOCAL)
    used = res["used"]
    converged = bool(res["converged"])
    rho, flux_law = None, None
    if hybrid:
        Kr = len(basis_terms(min(int(residual_degree), degree)))
        n_flux = int(bool(residual_flux))
        ropts = ResidualOptions(grid=ResidualGrid(int(oversampling), int(residual_radius)), n_terms=Kr + n_flux, noise=noise_mode)
        rho, res, coef, local, outlier, n_h, flux_law = _fit_residual(
            m, ropts, opts, data_c, valid, var_arr, noise, local, coef, T, train, cand, outlier, clip,
            max(max_clip_fraction, 0.1), devices, int(hybrid_rounds), n_flux)
        used, converged = res["used"], bool(res["converged"])
        n_iter += n_h
        dof = res["n_valid"] - N_LOCAL
        with np.errstate(invalid="ignore", divide="ignore"):
            chi2_dof = res["chi2"] / dof
        level, sigma = _clip_levels(chi2_dof, dof, res["local"][:, 0], used, clip)
    if not converged:
        log.warning("joint PSF fit did not converge (%d rounds, %d iterations)", rounds, n_iter)
    dof = res["n_valid"] - N_LOCAL
    n_dof = float(dof[used].sum()) - coef.size
    chi2_train = float(res["chi2"][used].sum()) / n_dof if n_dof > 0 else np.nan

    meta = dict(image=str(image or ""), ztfpsf_version=__version__, model=m.name, integration=m.integration,
                mode=mode, degree=degree, noise=noise_mode, n_stars=n)
    cov = res["cov"]
    if cov is None or not np.all(np.isfinite(cov)):
        log.warning("joint PSF fit: the coefficients' covariance is singular (stars clustered, or too few for "
                    "degree %d); shape errors are NaN", degree)
        cov = None
    xu, yu = res["local"][used, 1] + origin[used, 0], res["local"][used, 2] + origin[used, 1]
    psf = PSFModel(m, coef, bounds, degree=degree, cov=cov, support=_hull(xu, yu), integration=m.integration,
                   image_shape=image_shape, meta=meta, residual=rho, grid=None if rho is None else ropts.grid,
                   **({} if flux_law is None else _flux_terms(m, coef, bounds, degree, rho, ropts.grid, flux_law, xu, yu)))
    start = dict(x=xs if x_init is None else _per_star("x_init", x_init, n),
                 y=ys if y_init is None else _per_star("y_init", y_init, n))
    flags = flags_px | np.where(no_data, int(Flag.NO_DATA), 0) | np.where(no_source, int(Flag.NO_SOURCE), 0)
    left_out = cand & ~used & ~reserved  # clipped, or unusable at the start of the joint fit
    # reserve stars beyond the same level (a cosmic ray, a binary) are flagged and not scored
    with np.errstate(invalid="ignore"):
        left_out |= reserved & ~(chi2_dof <= level)
    table = _result_table(m, psf, res, start, origin, flags, cand, used, reserved, left_out, converged, n_iter, max_shift)
    score = reserved & ~left_out & ((np.asarray(table["flags"]) & int(BAD)) == 0)
    chi2_res = float(np.sum(table["chi2"][score]) / np.sum(table["dof"][score])) if score.any() else np.nan
    stats = dict(
        hybrid=rho is not None, residual_flux=flux_law is not None, reserve_by_snr=reserve_by_snr(table, score),
        model=m.name, mode=mode, degree=degree, n_stars=n, n_fit=int(used.sum()), n_reserve=int(reserved.sum()),
        n_outlier=int(left_out.sum()), n_excluded=int(n - n_cand), chi2_dof_train=chi2_train,
        chi2_dof_reserve=chi2_res, converged=converged, n_iter=n_iter, rounds=rounds, covariance_ok=cov is not None,
        fwhm_median=float(np.median(table["fwhm"][used])) if used.any() else np.nan,
    )
    psf.meta.update({k: stats[k] for k in ("n_fit", "n_reserve", "n_outlier", "chi2_dof_train", "chi2_dof_reserve", "reserve_by_snr")})
    table.meta.update(stats)
    return psf, table, stats


#: S/N bins of the reserve-star statistics.
SNR_BINS = ((20.0, 50.0), (50.0, 100.0), (100.0, 300.0), (300.0, np.inf))


def reserve_by_snr(table, score):
    """chi2/dof (summed chi2 over summed dof) and count of the scored stars per S/N bin."""
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.asarray(table["flux"]) / np.asarray(table["flux_err"])
    out = {}
    for lo, hi in SNR_BINS:
        sel = score & (snr >= lo) & (snr < hi)
        dof = float(np.sum(table["dof"][sel]))
        key = f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">{lo:g}"
        out[key] = dict(n=int(sel.sum()), chi2_dof=float(np.sum(table["chi2"][sel]) / dof) if dof > 0 else None)
    return out


def _hull(x, y):
    """Vertices ``(M, 2)`` of the convex hull of the points, or None (fewer than 3, collinear)."""
    from scipy.spatial import ConvexHull, QhullError

    pts = np.column_stack([x, y])
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if len(pts) < 3:
        return None
    try:
        return pts[ConvexHull(pts).vertices]
    except QhullError:
        return None


@functools.lru_cache(maxsize=16)
def _residual_program(core, ropts):
    return jax.jit(functools.partial(solve_residual, core, ropts))


def _flux_terms(m, coef, bounds, degree, rho, grid, law, x, y):
    """:class:`PSFModel` arguments of a residual surface with flux terms fitted with ``law =
    (reference, range, n_flux)`` of the profile's amplitude: reference and range moved to
    the PSF's flux scale (flux within ``FLUXRAD``) by the median enclosed fraction at the
    fit's stars ``x, y``."""
    ref, (lo, hi), n_flux = law
    spatial = PSFModel(m, coef, bounds, degree=degree, residual=rho[:-n_flux], grid=grid)
    lg_scale = float(np.log10(np.median(spatial.enclosed(x, y))))
    return dict(bf_ref=ref * 10**lg_scale, bf_range=(lo + lg_scale, hi + lg_scale), residual_flux=n_flux)


def _flux_law(amplitude, use):
    """Reference and log10 range (1st-99th percentile) of the fit's stars' amplitudes. The
    reference is their flux-weighted mean log flux, about where the stars' shape
    information is centred: the flux term then hardly overlaps a change of the analytic
    shape, and the alternation with the joint fit does not trade the two for rounds."""
    amp = amplitude[use & np.isfinite(amplitude) & (amplitude > 0)]
    lg = np.log10(amp)
    return 10 ** float(np.sum(amp * lg) / np.sum(amp)), (float(np.percentile(lg, 1)), float(np.percentile(lg, 99)))


def _fit_residual(m, ropts, opts, data, valid, variance, noise, local, coef, T, train, cand, outlier, clip,
                  max_clip_fraction, devices, rounds, n_flux=0, tol_rounds=5e-3):
    """The hybrid PSF: the residual surface and the analytic part fitted in turn.

    Each round solves the residual surface (a linear problem: stars' flux, position and
    background and the analytic shape held) and then refits the analytic shape with every
    star's flux, position and background under the new surface (the joint LM, the nodes
    riding along fixed), so the analytic wings are fitted to the stars, not bent to absorb
    what the surface describes. Outliers are judged afresh with the whole PSF each round:
    stars the analytic model alone could not fit (the brightest) are those the surface
    needs. Returns the coefficients ``(K, size)``, the last joint result, the analytic
    coefficients, the stars' local parameters, the outliers, the iterations and the flux
    terms' ``(reference, range, n_flux)`` (amplitudes; None without flux terms).

    With ``n_flux`` (0 or 1) the surface's last row is multiplied by each star's
    ``log10(amplitude / reference)``, the amplitudes those at the start of each round.
    """
    n = data.shape[0]
    grid, K = ropts.grid, ropts.n_terms - n_flux
    law = _flux_law(local[:, 0], train & ~outlier) if n_flux else None

    def terms(local):  # the surface's basis at each star: spatial terms, then the flux term
        if not n_flux:
            return T[:, :K]
        return np.column_stack([T[:, :K], log_flux(local[:, 0], law[0], law[1])])

    hm = Hybrid(m, grid)
    prior = residual_prior(ropts)
    degree = int(round(np.sqrt(2 * T.shape[1] + 0.25) - 1.5))  # T has (degree + 1)(degree + 2)/2 terms
    u_centre = lambda c: (legendre_basis(0.0, 0.0, degree) @ c.T)  # the shape at the image centre
    full_var = np.broadcast_to(variance, data.shape) if ropts.noise == "given" else np.ones(data.shape)
    r = np.zeros((n, grid.size))
    rho = np.zeros((ropts.n_terms, grid.size))
    n_iter, previous = 0, np.inf
    for it in range(rounds):
        use = train & ~outlier
        # only the surface's stars go through its solve (the others' local parameters are
        # refitted by the joint step below): a third of its cost on the real quadrant
        idx = np.flatnonzero(use)
        total = _padded_size(idx.size, 1)
        program = _residual_program(m, ResidualOptions(**{**ropts.__dict__, "chunk": min(ropts.chunk, total)}))
        Ts = terms(local)
        args = [_pad(np.asarray(a)[idx], total) for a in (data, valid, full_var, noise, local, T @ coef.T, r, Ts, use)]
        rho, new_local = program(prior, surface_constraints(grid, m, u_centre(coef), ropts.n_terms, n_flux), *args[:7], rho, *args[7:])
        rho, new_local = np.asarray(rho), np.asarray(new_local)[: idx.size]
        local = local.copy()
        local[idx] = np.where(np.all(np.isfinite(new_local), axis=1, keepdims=True), new_local, local[idx])
        r = residual_nodes(rho, Ts)
        res = joint_solve(hm, opts, data, valid, variance, noise, local, T, use, coef, devices, active=cand, nodes=r)
        n_iter += int(res["n_iter"])
        local, coef = np.where(np.isfinite(res["local"]), res["local"], local), res["coef"]
        dof = res["n_valid"] - N_LOCAL
        with np.errstate(invalid="ignore", divide="ignore"):
            chi2_dof = res["chi2"] / dof
        judged = train & res["ok"]
        level, sigma = _clip_levels(chi2_dof, dof, res["local"][:, 0], judged, clip)
        new = _new_outliers(chi2_dof, level, sigma, judged, max_clip_fraction)
        n_changed = int(np.sum(new != outlier))
        changed = n_changed > 0
        outlier = new
        chi2_used = np.sum(res["chi2"][res["used"]]) / max(np.sum(dof[res["used"]]), 1)
        log.debug("hybrid round %d: %d iterations, chi2/dof %.4f, %d outliers", it + 1, res["n_iter"], chi2_used, new.sum())
        # alternating between the surface and the analytic shape converges linearly: stop
        # when a round gains less than ``tol_rounds`` in chi2/dof and changes the outliers of
        # at most 1 % of the stars (the final refit below leaves the new outliers out)
        if n_changed <= 0.01 * use.sum() and it and previous - chi2_used < tol_rounds * chi2_used:
            break
        previous = chi2_used
    if changed:  # the final state holds no star it flags
        res = joint_solve(hm, opts, data, valid, variance, noise, local, T, train & ~outlier, coef, devices,
                          active=cand, nodes=r)
        n_iter += int(res["n_iter"])
        local, coef = np.where(np.isfinite(res["local"]), res["local"], local), res["coef"]
    return rho, res, coef, local, outlier, n_iter, None if law is None else (*law, n_flux)


def _result_table(m, psf, res, start, origin, flags, cand, used, reserved, left_out, converged, n_iter, max_shift):
    """One row per star (see :func:`fit_psf`)."""
    n = len(flags)
    cols = value_columns(m)
    val = {c: np.full(n, np.nan) for c in cols}
    err = {c: np.full(n, np.nan) for c in cols}
    flags = flags.copy()
    loc, sd = res["local"], np.sqrt(np.maximum(res["var_local"], 0.0))
    for k, name in enumerate(("flux", "x", "y", "background")):
        off = origin[:, 0] if name == "x" else origin[:, 1] if name == "y" else 0.0
        val[name] = np.where(cand, loc[:, k] + off, np.nan)
        err[name] = np.where(cand, sd[:, k], np.nan)
    chi2 = np.where(cand, res["chi2"], np.nan)
    dof = np.where(cand, res["n_valid"] - N_LOCAL, 0)
    iters = np.where(used, n_iter, np.where(cand, res["n_iter_local"], 0))

    finite = np.all(np.isfinite(loc), axis=1) & np.isfinite(res["chi2"]) & np.all(np.isfinite(sd), axis=1)
    failed = cand & ~(res["ok"] & finite)
    flags[failed] |= int(Flag.FIT_FAILED)
    not_conv = cand & ~res["conv_local"]
    if not converged:  # the joint fit's stars share its convergence
        not_conv |= used
    flags[not_conv] |= int(Flag.NOT_CONVERGED)
    with np.errstate(invalid="ignore"):
        flags[np.hypot(val["x"] - start["x"], val["y"] - start["y"]) > max_shift] |= int(Flag.CENTER_SHIFT)
    flags[reserved] |= int(Flag.RESERVED)
    flags[left_out] |= int(Flag.OUTLIER)
    with np.errstate(invalid="ignore"):
        flags[cand & np.isfinite(val["x"]) & ~psf.supported(np.nan_to_num(val["x"]), np.nan_to_num(val["y"]))] |= int(Flag.EXTRAPOLATED)
    bad = (flags & int(BAD)) != 0
    for name in ("flux", "x", "y", "background"):
        val[name][bad] = err[name][bad] = np.nan
    chi2 = np.where(bad & ~cand, np.nan, chi2)

    # the PSF's shape at every measured star
    ok = ~bad & np.isfinite(val["x"]) & np.isfinite(val["y"])
    if ok.any():  # the flux scale: flux within the PSF's FLUXRAD, not the profile's total
        scale = psf.enclosed(val["x"][ok], val["y"][ok])
        if psf.flux_dependent:  # the star's own shape: its flux on the PSF's scale sets it
            scale = psf.enclosed(val["x"][ok], val["y"][ok], flux=val["flux"][ok] * scale)
        val["flux"][ok] *= scale
        err["flux"][ok] *= scale
    if ok.any():
        shape = psf.shape(val["x"][ok], val["y"][ok], extrapolate=True)
        shape["fwhm"] = psf.fwhm(val["x"][ok], val["y"][ok], extrapolate=True)
        serr = psf.shape_err(val["x"][ok], val["y"][ok], extrapolate=True)
        for name in cols[4:]:
            val[name][ok] = shape[name]
            err[name][ok] = serr[name]

    t = Table()
    t["x_init"] = np.asarray(start["x"], np.float64)
    t["y_init"] = np.asarray(start["y"], np.float64)
    for name in cols:
        t[name] = val[name]
        t[name + "_err"] = err[name]
    t["chi2"] = chi2
    t["dof"] = dof.astype(np.int32)
    t["n_iter"] = iters.astype(np.int32)
    t["flags"] = flags.astype(np.int32)
    for c in ("x_init", "y_init", "x", "y", "x_err", "y_err"):
        t[c].unit = "pix"
    t.meta.update(
        errors="stars of the joint fit: marginalised over the PSF coefficients; others: PSF fixed; "
        "shape columns: the PSF at the star, errors from the coefficients' covariance",
        coordinates="0-based pixel coordinates, pixel centres at integers",
    )
    return t
