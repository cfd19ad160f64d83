"""The pixel part of a hybrid PSF: a residual surface on a grid of cubic B-splines.

A real PSF is not a Moffat: ZTF stars leave chi2/dof ~ 4 and an asymmetric lobe under the
best analytic fit. As in Piff (``Sum`` of an analytic model and a ``PixelGrid``), PSFEx
and the SNLS/poloka PSF, the hybrid PSF is the analytic profile plus an empirical
residual::

    PSF(X, Y) = A(X, Y; u) + S(X, Y),    S(X, Y) = sum_kj r[k, j] B((Y - c_k)/h) B((X - c_j)/h)

with ``B`` the centred cubic B-spline, nodes ``c_j = j h`` for ``|j| <= radius/h`` around
the star's centre and ``h = 1/oversampling`` px. ``S`` is a continuous surface, so its
pixel integral is exact at any sub-pixel position: the pixel-integrated B-spline is a
difference of the B-spline's integral (a piecewise quartic), the same separable operator
when the grid is fitted and when a stamp is rendered; nothing is interpolated after the
fact. The B-splines sum to one, so a node value is the surface's height there (flux per
px^2 of a unit-flux star) and ``sum r h^2`` is its total flux.

A flux term (:attr:`~ztfpsf.psf.PSFModel.residual_flux`) adds ``log10(F / F_ref)`` times
one more surface for a star of flux ``F``: the rows of ``r`` are the spatial polynomial's
terms and then the flux term, all fitted in one linear system (:func:`solve_residual`).

Constraints (:meth:`ResidualGrid.constraints`): the surface does not overlap the
directions in which the analytic profile moves by itself (its amplitude, position and
shape derivatives), so flux, position and shape are those of the stars and cannot trade
with the grid; nodes beyond ``radius`` are held at zero so that the stamps' outer pixels
fix each star's background.

:class:`Hybrid` is the profile ``A + S`` as a model of :mod:`ztfpsf.fitting` (internal
shape = the analytic shape followed by the node values), so the per-star LM fits flux,
position and background with it unchanged. Pure JAX, no I/O.
"""

import functools
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..models import get_model

__all__ = ["ResidualGrid", "ResidualOptions", "Hybrid", "bspline", "bspline_integral", "solve_residual", "surface_constraints", "residual_nodes", "residual_prior"]


def bspline(t):
    """Centred cubic B-spline (support [-2, 2], integral 1)."""
    a = jnp.abs(t)
    inner = (4.0 - 6.0 * a * a + 3.0 * a * a * a) / 6.0
    outer = (2.0 - a) ** 3 / 6.0
    return jnp.where(a < 1.0, inner, jnp.where(a < 2.0, outer, 0.0))


def bspline_integral(t):
    """``int_{-inf}^t`` of :func:`bspline` (0 below -2, 1 above 2), a piecewise quartic."""
    s = jnp.clip(-jnp.abs(t), -2.0, 0.0)  # left half; the right half by symmetry
    far = (2.0 + s) ** 4 / 24.0
    near = 1.0 / 24.0 + (4.0 * s - 2.0 * s**3 - 0.75 * s**4 + 2.75) / 6.0
    left = jnp.where(s < -1.0, far, near)
    return jnp.where(t <= 0.0, left, 1.0 - left)


@dataclass(frozen=True)
class ResidualGrid:
    """Node layout of the residual surface: spacing ``1/oversampling`` px, nodes out to
    ``radius`` px from the star's centre (``n = 2 radius oversampling + 1`` per axis)."""

    oversampling: int = 1
    radius: int = 8

    def __post_init__(self):
        if int(self.oversampling) < 1 or int(self.radius) < 1:
            raise ValueError(f"residual grid needs oversampling >= 1 and radius >= 1; got {self.oversampling}, {self.radius}")

    @property
    def step(self):
        return 1.0 / self.oversampling

    @property
    def n(self):
        return 2 * self.radius * self.oversampling + 1

    @property
    def size(self):
        return self.n * self.n

    def nodes(self):
        """Node offsets from the centre along one axis [px] (numpy)."""
        half = self.radius * self.oversampling
        return np.arange(-half, half + 1) * self.step

    def pixel_basis(self, offsets):
        """``(..., n_pix) -> (..., n_pix, n)``: each node's B-spline integrated over the pixels
        at ``offsets`` (pixel centre minus star centre), along one axis."""
        h = self.step
        d = offsets[..., None] - jnp.asarray(self.nodes(), offsets.dtype)
        return h * (bspline_integral((d + 0.5) / h) - bspline_integral((d - 0.5) / h))

    def point_basis(self, offsets):
        """``(..., m) -> (..., m, n)``: each node's B-spline at points (no pixel integral)."""
        return bspline((offsets[..., None] - jnp.asarray(self.nodes(), offsets.dtype)) / self.step)

    def pixels(self, cols, rows, r):
        """Pixel-integrated surface on a stamp: ``cols (N, nx)``, ``rows (N, ny)`` offsets of
        the pixel centres from the star, ``r (N, n, n)`` -> ``(N, ny, nx)``."""
        bx, by = self.pixel_basis(cols), self.pixel_basis(rows)
        return jnp.einsum("nyk,nkj,nxj->nyx", by, r.astype(bx.dtype), bx)

    def outside(self):
        """``(size,)`` True for nodes farther than ``radius`` from the centre: held at zero,
        so that the surface vanishes beyond ``radius`` (+2 node spacings) and the stamp's
        outer pixels fix each star's background. A free surface out to the stamp's edge
        could add a flat pedestal that trades with the background and moves the flux
        within a radius."""
        c = self.nodes()
        return (np.add.outer(c * c, c * c) > self.radius**2 + 1e-9).reshape(-1)

    def constraints(self, core, u, step=0.05):
        """``(3 + n_shape, size)``: the surface's overlap ``int B_g D`` with each direction
        ``D`` the analytic profile can move in by itself: the profile ``A`` (its flux),
        ``dA/dx``, ``dA/dy`` (its position) and ``dA/du_k`` (its shape), at the internal
        shape ``u`` (numpy; midpoint grid of ``step`` px).

        Held at zero, the surface holds only what the profile family cannot describe: it
        cannot trade with the flux, move the centre or widen the core, so flux, position
        and shape stay those of the stars, and the analytic part and the surface are not
        traded back and forth. Unlike a zero-flux surface it may carry flux of its own (a
        coma lobe has flux but hardly overlaps the core), so the analytic part need not
        take that flux and stretch its wings with it.
        """
        return np.asarray(_constraints_fn(core.name, self, float(step))(jnp.asarray(u, jnp.float64)))

    def smoothness(self):
        """``(m, size)``: second differences along x and y (the roughness penalty)."""
        n = self.n
        d2 = np.zeros((n - 2, n))
        for i in range(n - 2):
            d2[i, i: i + 3] = (1.0, -2.0, 1.0)
        eye = np.eye(n)
        return np.concatenate([np.kron(eye, d2), np.kron(d2, eye)])


@functools.lru_cache(maxsize=16)
def _constraints_fn(name, grid, step):
    """Compiled :meth:`ResidualGrid.constraints` for one profile, grid and step."""
    half = grid.radius + 2.0 * grid.step
    t = np.arange(-half + step / 2, half, step)
    X, Y = np.meshgrid(t, t)
    point = get_model(name, "center")
    b = np.asarray(grid.point_basis(jnp.asarray(t, jnp.float64)))  # (points, n)

    def prof(v):  # v = (x0, y0, *u)
        return point.profile(jnp.asarray(X) - v[0], jnp.asarray(Y) - v[1], tuple(v[2 + k] for k in range(point.n_shape)))

    def fn(u):
        v0 = jnp.concatenate([jnp.zeros(2, u.dtype), u])
        D = jnp.concatenate([prof(v0)[..., None], jax.jacfwd(prof)(v0)], axis=-1)  # (ny, nx, 3 + n_shape)
        along_x = jnp.einsum("abs,bj->asj", D, b)  # one axis at a time: two small products
        return jnp.einsum("ak,asj->skj", b, along_x).reshape(D.shape[-1], grid.size) * step * step

    return jax.jit(fn)


def _grid_offsets(X, Y):
    """Column and row offsets of a regular stamp from flattened ``(N, ny*nx)`` (square) or
    ``(N, ny, nx)`` pixel offsets."""
    if X.ndim == 2:
        side = int(round(np.sqrt(X.shape[-1])))
        if side * side != X.shape[-1]:
            raise ValueError(f"the hybrid PSF needs square stamps; got {X.shape[-1]} pixels")
        X = X.reshape(X.shape[0], side, side)
        Y = Y.reshape(Y.shape[0], side, side)
    return X[:, 0, :], Y[:, :, 0]


@dataclass(frozen=True)
class Hybrid:
    """Analytic profile plus a residual surface (see the module docstring).

    Internal shape parameters: the core's (e.g. ln fwhm, ln(alpha - 1)) then the
    ``grid.size`` node values. Only the local parameters (flux, x, y, background) are
    fitted with it per star; the shape comes from the image's PSF model.
    """

    core: object
    grid: ResidualGrid = ResidualGrid()
    name: ClassVar[str] = "hybrid"

    def __post_init__(self):
        object.__setattr__(self, "core", get_model(self.core))

    @property
    def integration(self):
        return self.core.integration

    @property
    def n_shape(self):
        return self.core.n_shape + self.grid.size

    @property
    def n_params(self):
        return 4 + self.n_shape

    def unpack(self, block):
        """Internal shape block ``(N, n_shape)`` -> (core tuple of ``(N, 1)``, nodes ``(N, n, n)``)."""
        nc = self.core.n_shape
        core = tuple(block[:, k, None] for k in range(nc))
        return core, block[:, nc:].reshape(block.shape[0], self.grid.n, self.grid.n)

    def profile(self, X, Y, u):
        core_u, r = u
        cols, rows = _grid_offsets(X, Y)
        if X.ndim == 2:
            core_u = tuple(v.reshape(v.shape[0], 1) for v in core_u)
        else:
            core_u = tuple(v.reshape(v.shape[0], 1, 1) for v in core_u)
        res = self.grid.pixels(cols, rows, r).reshape(X.shape)
        return self.core.profile(X, Y, core_u) + res


# --------------------------------------------------------------------------------------
# fitting the grid: a linear least-squares problem once flux, position and background of
# every star are known
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResidualOptions:
    """Static options of the residual solve.

    ``ridge``: prior sd of a node value (flux per px^2 of a unit-flux star) shrinking
    nodes the stars do not constrain towards zero; ``smooth``: prior sd of its second
    differences. Both are weak next to what a few hundred stars measure; they keep the
    system positive definite (masked pixels, sparse corners of a spatial term).
    """

    grid: ResidualGrid = ResidualGrid()
    n_terms: int = 1
    noise: str = "model"
    ridge: float = 0.02
    smooth: float = 0.01
    chunk: int = 128


def surface_constraints(grid, core, u, n_terms, n_flux=0):
    """``(m, n_terms * size)``: the constraints of every row of the surface, block-diagonal.
    A spatial term's are :meth:`ResidualGrid.constraints` at the internal shape ``u``. A
    flux term (the last ``n_flux`` rows, times ``log10(F / F_ref)``) moves light, as the
    charge of a core that sharpens with flux does, and adds none: zero total flux (which
    defines a star's flux, its amplitude being free) and no overlap with the profile's
    position derivatives (which would shift stars with their flux); unlike a spatial term
    it may change the size, which no other parameter of a star does with its flux."""
    spatial = grid.constraints(core, u)
    flux = np.vstack([spatial[1:3], np.full((1, grid.size), grid.step**2)])
    blocks = [spatial] * (n_terms - n_flux) + [flux] * n_flux
    out = np.zeros((sum(len(b) for b in blocks), n_terms * grid.size))
    row = 0
    for t, b in enumerate(blocks):
        out[row: row + len(b), t * grid.size: (t + 1) * grid.size] = b
        row += len(b)
    return out


def residual_nodes(rho, T):
    """Node values at each star ``(N, size)`` from the coefficients ``rho (K, size)`` and
    the stars' spatial basis ``T (N, K)``."""
    return T @ rho


def _star_terms(grid, core, data, valid, variance, noise, local, u, r_prev, T, used, noise_mode, free):
    """One chunk of stars: their share of the Gauss-Newton system of the surface.

    Each star's model is ``f (A + S) + b``; its local parameters (flux, x, y, background)
    are eliminated (Schur complement), so the surface step accounts for how every star
    would move with it. Returns ``L, R`` whose product summed over stars and pixel rows
    is one spatial term's normal matrix (``sum_p w f^2 By[k] Bx[j] By[m] Bx[l]`` as
    ``L^T R`` with rows (star, pixel row): ``L = f^2 By[y, k] By[y, m]``, ``R = sum_x w
    Bx[x, j] Bx[x, l]``: one large matrix product, the per-star 4-index blocks never
    exist; the pair of terms ``(t, s)`` weighs the stars by ``T_t T_s``), ``E (c, 4,
    F)`` with ``sum_c T_t T_s E^T E`` the Schur term of the pair, the surface's gradient
    ``g (K, n, n)`` and its Schur correction ``h (K, F)`` and the pieces of each star's
    own step (for every star; ``used`` (c,) weighs the star's share of the surface's
    system). ``E``, ``h`` and ``B`` hold one term's ``free`` nodes (indices into
    ``size``): those beyond the radius stay zero and cost nothing; a term's ``B`` is that
    of the single term times ``T_t``.
    """
    c, ny, nx = data.shape
    f64 = jnp.float64
    flux, bg = local[:, 0], local[:, 3]
    K, n = T.shape[1], grid.n
    cols_of = lambda x: jnp.arange(nx, dtype=f64)[None, :] - x[:, None]
    rows_of = lambda y: jnp.arange(ny, dtype=f64)[None, :] - y[:, None]
    core_u = tuple(u[:, k, None, None] for k in range(core.n_shape))
    r_img = r_prev.reshape(c, n, n)

    def profile(xy):
        cols, rows = cols_of(xy[:, 0]), rows_of(xy[:, 1])
        X, Y = cols[:, None, :] + 0.0 * rows[:, :, None], rows[:, :, None] + 0.0 * cols[:, None, :]
        surface = jnp.einsum("nyk,nkj,nxj->nyx", grid.pixel_basis(rows), r_img, grid.pixel_basis(cols))
        return core.profile(X, Y, core_u) + surface

    xy = local[:, 1:3]
    P, dPx = jax.jvp(profile, (xy,), (jnp.stack([jnp.ones(c), jnp.zeros(c)], 1),))
    _, dPy = jax.jvp(profile, (xy,), (jnp.stack([jnp.zeros(c), jnp.ones(c)], 1),))
    bx, by = grid.pixel_basis(cols_of(xy[:, 0])), grid.pixel_basis(rows_of(xy[:, 1]))
    level = flux[:, None, None] * P + bg[:, None, None]
    if noise_mode == "given":
        w = jnp.where(valid, 1.0 / jnp.where(valid & (variance > 0), variance, 1.0), 0.0)
    else:
        g_ = noise[:, 0, None, None]
        var = (jnp.maximum(level, 0.0) + noise[:, 2, None, None]) / g_ + (noise[:, 1, None, None] / g_) ** 2
        w = jnp.where(valid, 1.0 / jnp.maximum(var, 1e-30), 0.0)
    resid = jnp.where(valid, data - level, 0.0)
    f = flux[:, None, None]
    J = jnp.stack([P, f * dPx, f * dPy, jnp.ones_like(P)], axis=1)  # (c, 4, ny, nx)
    A = jnp.einsum("clyx,cyx,cmyx->clm", J, w, J) + 1e-12 * jnp.eye(4)
    gl = jnp.einsum("clyx,cyx->cl", J, w * resid)
    # local-surface block B (c, 4, G) of one term: d model/d node = f By Bx (times T_t)
    B = jnp.einsum("c,clyx,cyx,cyk,cxj->clkj", flux, J, w, by, bx).reshape(c, 4, n * n)[..., free]
    chol = jnp.linalg.cholesky(A)
    E = jax.scipy.linalg.solve_triangular(chol, B, lower=True) * used[:, None, None]  # L^-1 B: B^T A^-1 B = E^T E
    q = jax.scipy.linalg.solve_triangular(chol, gl[..., None], lower=True)[..., 0]  # L^-1 g_l
    win = _row_windows(grid, ny)
    L = jnp.einsum("c,cyk,cym->cykm", used * flux * flux, _take_rows(by, win), _take_rows(by, win))
    R = jnp.einsum("cyx,cxj,cxl->cyjl", w, bx, bx)
    g = jnp.einsum("ct,c,cyx,cyk,cxj->tkj", T, used * flux, w * resid, by, bx)
    h = jnp.einsum("ct,clp,cl->tp", T, E, q)  # B^T A^-1 g_l
    return L, R, E, g, h, (A, gl, B, T)


#: Stars farther than this from their stamp's centre pixel [px] are left out of the
#: residual solve, whose row windows assume it (they are measured all the same).
MAX_OFFSET = 1.5


def _row_windows(grid, ny):
    """Static ``(ny, w)`` node indices that can touch each pixel row of a stamp whose star
    lies within :data:`MAX_OFFSET` of the centre pixel: a pixel-integrated B-spline spans
    ``4 h + 1`` px, so of the ``n`` nodes only ``w = 4 + 4 oversampling`` can."""
    os_, n, half = grid.oversampling, grid.n, grid.radius * grid.oversampling
    w = min(n, 4 + 4 * os_)
    centre = ny // 2
    start = np.floor(half + os_ * (np.arange(ny) - centre) - (4 + os_) / 2.0 - MAX_OFFSET * os_).astype(int) + 1
    start = np.clip(start, 0, n - w)
    return start[:, None] + np.arange(w)[None, :]


def _take_rows(b, win):
    """``(c, ny, n) -> (c, ny, w)``: each row's window of node values."""
    return jnp.take_along_axis(b, jnp.asarray(win)[None], axis=2)


def residual_prior(opts):
    """Prior precision of one spatial term's nodes ``(size, size)``: ridge and smoothness
    (numpy: passed to the compiled solve as data, not folded into it as a constant). The
    solve keeps only the nodes within the radius; the others are zero, which the
    smoothness term sees as its boundary."""
    return _prior(opts.grid, opts.ridge, opts.smooth)


@functools.lru_cache(maxsize=8)
def _prior(grid, ridge, smooth):
    D = grid.smoothness()
    prior = np.eye(grid.size) / ridge**2 + D.T @ D / smooth**2
    prior.flags.writeable = False  # shared between calls
    return prior


def solve_residual(core, opts, prior, constraints, data, valid, variance, noise, local, u, r_prev, rho_prev, T, use):
    """One Gauss-Newton step of the residual surface with every star's flux, position and
    background (float64, pure JAX; the analytic shape ``u`` held).

    Minimises ``sum_i sum_p w (d - f (A + S_i) - b)^2`` plus the ridge and smoothness
    priors, the stars' local parameters eliminated per star (Schur complement), subject to
    the ``constraints (m, K * size)`` of :func:`surface_constraints` (Lagrange multipliers). ``prior`` from
    :func:`residual_prior`; ``rho_prev (K, size)`` the current surface and ``r_prev (N,
    size)`` its nodes at each star. Arrays: stars on axis 0, padded to a multiple of
    ``opts.chunk`` (padding rows with ``use`` False). Returns the new ``rho (K, size)``
    and the stars' updated ``local (N, 4)`` (flux, x, y, background).
    """
    grid, K = opts.grid, opts.n_terms
    G = grid.size
    f64 = jnp.float64
    n = data.shape[0]
    nc = n // opts.chunk
    split = lambda a: a.reshape((nc, opts.chunk) + a.shape[1:])
    centre = jnp.asarray([data.shape[2] // 2, data.shape[1] // 2], f64)
    centred = jnp.all(jnp.abs(local[:, 1:3] - centre) <= MAX_OFFSET, axis=1)
    wuse = (use & centred).astype(f64)
    xs = tuple(split(a) for a in (data.astype(f64), valid, variance.astype(f64), noise.astype(f64), local.astype(f64),
                                  u.astype(f64), r_prev.astype(f64), T.astype(f64), wuse))
    win = _row_windows(grid, data.shape[1])
    w, n1 = win.shape[1], grid.n

    free1 = np.flatnonzero(~grid.outside())  # one term's nodes within the radius
    free = np.concatenate([t * G + free1 for t in range(K)])
    F1, F = len(free1), len(free)

    # the normal matrix is assembled per pair of terms t <= s from one term's pieces, the
    # stars weighed by T_t T_s: K (K + 1) / 2 products of one term's size, not K^2
    pairs = [(t, u) for t in range(K) for u in range(t, K)]

    def body(acc, c):
        d, v, var, nz, lo, uu, rp, t, wu = c
        L, R, E, g, h, own = _star_terms(grid, core, d, v, var, nz, lo, uu, rp, t, wu, opts.noise, free1)
        L = L.reshape(L.shape[0], L.shape[1], w * w)
        # per pixel row y: rows (k, m) of its node window times columns (j, l)
        R = R.reshape(R.shape[0], R.shape[1], G)
        # the two large products in float32 (full precision on GPUs too), summed in float64:
        # 1.5-2x faster; on the ZTF quadrant the surface and fluxes agree with float64 to 4e-7
        f32, hi = jnp.float32, jax.lax.Precision.HIGHEST
        R32 = R.astype(f32)
        blocks = tuple(jnp.einsum("cya,cyb->yab", (L * (t[:, a] * t[:, b])[:, None, None]).astype(f32), R32,
                                  precision=hi).astype(f64) for a, b in pairs)
        E2 = E.reshape(-1, F1).astype(f32)
        schur = tuple(jnp.matmul((E * (t[:, a] * t[:, b])[:, None, None]).reshape(-1, F1).astype(f32).T, E2,
                                 precision=hi).astype(f64) for a, b in pairs)
        return (tuple(x + y for x, y in zip(acc[0], blocks)), tuple(x + y for x, y in zip(acc[1], schur)),
                acc[2] + g, acc[3] + h), own

    zero = (tuple(jnp.zeros((win.shape[0], w * w, G), f64) for _ in pairs), tuple(jnp.zeros((F1, F1), f64) for _ in pairs),
            jnp.zeros((K, n1, n1), f64), jnp.zeros((K, F1), f64))
    (blocks, schur_pairs, g, h), own = jax.lax.scan(body, zero, xs)
    h = h.reshape(F)
    schur = jnp.zeros((K, F1, K, F1), f64)
    for (a, b), S in zip(pairs, schur_pairs):
        schur = schur.at[a, :, b].set(S)
        if a != b:
            schur = schur.at[b, :, a].set(S.T)
    schur = schur.reshape(F, F)
    N = jnp.zeros((K, n1, n1, K, n1, n1), f64)  # rows (t, k, m) x columns (s, j, l)
    for (a, b), blk in zip(pairs, blocks):  # each pixel row's window into the full (k, m) rows: one scatter
        N = N.at[a, win[:, :, None], win[:, None, :], b].add(blk.reshape(win.shape[0], w, w, n1, n1))
    # -> the normal matrix over (t, k, j) x (s, m, l); the pairs t > s by symmetry
    N = N.transpose(0, 1, 4, 3, 2, 5).reshape(K * G, K * G)
    upper = np.kron(np.triu(np.ones((K, K)), 1), np.ones((G, G))) > 0
    N = N + jnp.where(upper, N, 0.0).T
    sub = lambda M: M[free][:, free]
    Pk = sub(jnp.kron(jnp.eye(K, dtype=f64), prior))
    rho_prev = rho_prev.reshape(K * G).astype(f64)
    H = sub(N) - schur + Pk
    rhs = g.reshape(K * G)[free] - h - Pk @ rho_prev[free]
    C = constraints[:, free]
    chol = jnp.linalg.cholesky(H)
    solve = lambda z: jax.scipy.linalg.cho_solve((chol, True), z)
    step0 = solve(rhs)
    Y = solve(C.T)
    lam = jnp.linalg.solve(C @ Y, C @ (rho_prev[free] + step0))  # the new surface meets the constraints
    step = step0 - Y @ lam
    local_new = _local_steps(own, step, local)
    return rho_prev.at[free].add(step).reshape(K, G), local_new


def _local_steps(own, step, local):
    """Each star's own Gauss-Newton step given the surface's: ``A^-1 (g_l - B step)``, from
    the pieces ``(A, g_l, B, T)`` each chunk kept (``B`` of one term; term ``t``'s is
    ``T_t B``)."""
    A, gl, B, T = (a.reshape((-1,) + a.shape[2:]) for a in own)
    Bs = jnp.einsum("clp,tp->clt", B, step.reshape(T.shape[1], B.shape[-1]))
    dl = jnp.linalg.solve(A, (gl - jnp.einsum("clt,ct->cl", Bs, T))[..., None])[..., 0]
    return local + jnp.where(jnp.all(jnp.isfinite(dl), axis=1, keepdims=True), dl, 0.0)
