"""PSF profiles, pixel-integrated, in pure JAX.

Every profile is a radial function ``g(Q)`` of a quadratic form
``Q = a X**2 + 2 b X Y + c Y**2`` of the offsets ``X = x_pixel - x``, ``Y = y_pixel - y``,
times a normalisation that makes its integral over the plane 1. A star's model image is
``flux * profile + background``, so ``flux`` is the star's total flux.

Functions here work elementwise on broadcastable arrays: they are written for one star
and applied to a batch by broadcasting (stars on the leading axis), never with I/O.

Pixel integration (``integration=``):

``"adaptive"`` (default for the Moffats)
    Exact to the fit's needs at any sampling: the 6th-order box expansion (``taylor6``)
    on every pixel and, where the call's narrowest star (minor-axis FWHM, with its alpha)
    is too small for it, the 3 x 3 pixels nearest each star averaged over 2 x 2, 3 x 3 or
    4 x 4 sub-pixels (each with the same expansion; from 3 x 3 on, the 16 pixels around
    them over 2 x 2). The split is chosen inside the compiled program (``lax.switch`` on
    the narrowest star). Noiseless fits of brute-force-integrated stars recover flux,
    fwhm and x, y within 5e-4 down to the limit ``adaptive_min_fwhm(alpha)`` (0.4-0.53 px
    for alpha 1.1-6, 0.55 px at 10), below which ``shape_ok`` fails (``SHAPE_LIMIT``).
``"taylor4"``, ``"taylor6"``
    The average of the profile over the pixel box, expanded in even derivatives of the
    profile up to 4th (6th) order: ``g + (dxx+dyy) g/24 + (dxxxx+dyyyy) g/1920 + dxxyy g/576
    + ...``. Derivatives of ``g(Q)`` reuse the same power ``(1+Q)**-alpha``, so it costs
    little more than evaluating the profile at the pixel centre. The series needs the
    pixel small against the profile: at alpha 2.5 ``taylor4`` is off by 0.23 % of the peak
    at FWHM 2 px, 1.3 % at 1.5 px, 15 % at 1 px (``taylor6``: 0.03 %, 0.3 %, 8 %).
``"taylor2"``
    The same expansion truncated after the Laplacian term.
``"glN"`` (e.g. ``"gl3"``)
    N x N Gauss-Legendre quadrature over the pixel (N**2 profile evaluations).
``"erf"`` (Gaussian only; its default)
    Exact along x with erf; along y exact for ``rho = 0`` and, for ``rho != 0``, exact
    for the marginal plus a Gauss-Legendre correction of order ``erf_order``.
``"center"``
    The profile at the pixel centre (biased by percents for ZTF's ~2 px FWHM; kept to
    measure that bias).

Shape parameters are fitted in an unconstrained internal form (log widths, log(alpha-1),
atanh(rho), a conformal ellipticity) so that they stay physical during the fit.
"""

import functools
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

__all__ = ["Gaussian", "Moffat", "EllipticalMoffat", "get_model", "MODELS", "FWHM_PER_SIGMA", "adaptive_min_fwhm"]

# Python floats, not numpy scalars: they must not promote float32 arrays to float64.
FWHM_PER_SIGMA = float(2.0 * np.sqrt(2.0 * np.log(2.0)))
_SQRT2 = float(np.sqrt(2.0))
_LN2 = float(np.log(2.0))
_SQRT_2PI = float(np.sqrt(2.0 * np.pi))


def _check_integration(integration, profile):
    if integration in ("center", "taylor2", "taylor4", "taylor6"):
        return
    if integration == "erf" and isinstance(profile, Gaussian):
        return
    if integration == "adaptive" and isinstance(profile, Moffat):
        return
    if integration.startswith("gl") and integration[2:].isdigit() and int(integration[2:]) >= 1:
        return
    allowed = "'center', 'taylor2', 'taylor4', 'taylor6', 'glN'" + (
        ", 'erf'" if isinstance(profile, Gaussian) else ", 'adaptive'"
    )
    raise ValueError(f"unknown pixel integration {integration!r} for the {profile.name}; use one of {allowed}")


def _gl_nodes(n):
    """Gauss-Legendre nodes and weights on [-1/2, 1/2] (weights sum to 1)."""
    u, w = np.polynomial.legendre.leggauss(n)
    return [float(v) / 2.0 for v in u], [float(v) / 2.0 for v in w]


def _box_taylor_circular(g, q, X, Y, order, h2=1.0):
    """``_box_taylor`` for ``Q = q (X**2 + Y**2)``, the terms collected (far fewer operations).
    Each ``g[k]`` meets ``q**k``: with derivatives already scaled by ``q**k``, pass ``q = 1``."""
    X2, Y2 = X * X, Y * Y
    Q = q * (X2 + Y2)
    qh = q * h2
    out = g[0] + qh * (g[1] + Q * g[2]) / 6.0
    if order >= 4:
        R = q * q * X2 * Y2
        qh2 = qh * qh
        out = out + qh2 * (
            g[2] * (7.0 / 360.0) + Q * (g[3] * (7.0 / 180.0) + g[4] * (Q / 120.0)) + g[4] * (R / 90.0)
        )
    if order >= 6:
        out = out + qh2 * qh * (
            g[3] / 560.0
            + Q * (g[4] * (3.0 / 560.0) + g[6] * (Q * Q / 5040.0 + R / 1260.0))
            + g[5] * (Q * Q * (11.0 / 5040.0) + R / 252.0)
        )
    return out


def _box_taylor(g, a, b, c, X, Y, order, h2=1.0):
    """Average of g(Q) over the box of side ``sqrt(h2)`` centred on (X, Y), expanded in the
    Q-derivatives ``g = [g0, g1, ...]`` up to ``order`` (2, 4 or 6) in the box size.

    The average of ``g(Q + d)``, ``d = qx u + qy v + a u**2 + 2 b u v + c v**2`` over the
    box's offsets (u, v): ``sum_n g_n E[d**n] / n!``, the moments of u and v being
    ``h**2/12``, ``h**4/80``, ``h**6/448``.
    """
    qx = 2.0 * (a * X + b * Y)
    qy = 2.0 * (b * X + c * Y)
    qx2, qy2 = qx * qx, qy * qy
    out = g[0] + h2 * (g[1] * ((a + c) / 12.0) + g[2] * ((qx2 + qy2) / 24.0))
    if order >= 4:
        qxy = qx * qy
        out = out + h2 * h2 * (
            g[2] * (a * a / 160.0 + a * c / 144.0 + b * b / 72.0 + c * c / 160.0)
            + g[3] * ((a / 160.0 + c / 288.0) * qx2 + (a / 288.0 + c / 160.0) * qy2 + b / 72.0 * qxy)
            + g[4] * ((qx2 * qx2 + qy2 * qy2) / 1920.0 + qx2 * qy2 / 576.0)
        )
    if order >= 6:
        a2, b2, c2, ac = a * a, b * b, c * c, a * c
        out = out + h2 * h2 * h2 * (
            g[3] * ((a2 * a + c2 * c) / 2688.0 + ac * (a + c) / 1920.0 + b2 * (a + c) / 480.0)
            + g[4] * (
                (a2 / 1792.0 + ac / 1920.0 + b2 / 960.0 + c2 / 3840.0) * qx2
                + (a2 / 3840.0 + ac / 1920.0 + b2 / 960.0 + c2 / 1792.0) * qy2
                + b * (a + c) / 480.0 * qxy
            )
            + g[5] * (
                (a / 10752.0 + c / 23040.0) * qx2 * qx2
                + (a / 23040.0 + c / 10752.0) * qy2 * qy2
                + (a + c) / 3840.0 * qx2 * qy2
                + b / 2880.0 * qxy * (qx2 + qy2)
            )
            + g[6] * ((qx2 * qx2 * qx2 + qy2 * qy2 * qy2) / 322560.0 + qx2 * qy2 * (qx2 + qy2) / 46080.0)
        )
    return out


def _sub_offsets(s):
    """Centres of the s sub-intervals of a pixel, relative to its centre."""
    return [(i + 0.5) / s - 0.5 for i in range(s)]


#: ``"adaptive"``: the 6th-order box expansion on every pixel; where the FWHM is too small
#: for it, the 3 x 3 pixels nearest each star recomputed from split x split sub-pixels
#: (the same expansion on each) and, if ``ring``, the 16 pixels around them from ring x
#: ring: ``_ADAPTIVE_SPLITS`` = (split, ring) choices. ``_ADAPTIVE_MIN_FWHM[k]``: the
#: smallest minor-axis FWHM [px] at which choice k holds (0: no split, then each split),
#: at the alphas of ``_ADAPTIVE_ALPHA`` (linear in log(alpha - 1) between them, constant
#: outside); the last row is the scheme's limit. Measured one grid step (0.1, 0.05, 0.05,
#: 0.025 px) above the last failure of: the first-order bias of a noiseless fit,
#: -(J^T W J)^-1 J^T W (model - exact), exact being 64 x 64 Gauss-Legendre nodes a pixel,
#: over 8 sub-pixel phases, uniform and Poisson weights, within 5e-4 for flux and fwhm
#: (fractions) and x, y (px). The ring is needed from split 3: at alpha >~ 4 the one-box
#: expansion 1.5-2.5 px from the star leaves the fwhm biased by > 1e-3.
_ADAPTIVE_ORDER = 6
_ADAPTIVE_SPLITS = ((2, None), (3, 2), (4, 2))
_ADAPTIVE_ALPHA = (1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0, 20.0)
_ADAPTIVE_MIN_FWHM = (
    (3.5, 3.1, 2.5, 2.0, 1.9, 1.9, 1.8, 1.7, 1.6, 1.6),
    (1.35, 1.2, 1.0, 0.9, 0.9, 0.85, 0.9, 1.05, 1.1, 1.15),
    (0.75, 0.7, 0.6, 0.55, 0.55, 0.55, 0.55, 0.6, 0.6, 0.7),
    (0.525, 0.475, 0.45, 0.45, 0.45, 0.45, 0.425, 0.4, 0.55, 0.7),
)
_ADAPTIVE_LOG_AM1 = tuple(float(np.log(a - 1.0)) for a in _ADAPTIVE_ALPHA)


def _limit(limits, t):
    """A row of ``_ADAPTIVE_MIN_FWHM`` at t = log(alpha - 1): linear between the alphas,
    as a sum of hinges (cheaper than jnp.interp)."""
    slopes = np.diff(limits) / np.diff(_ADAPTIVE_LOG_AM1)
    out = limits[0] + slopes[0] * (t - _ADAPTIVE_LOG_AM1[0])
    for t_k, ds in zip(_ADAPTIVE_LOG_AM1[1:-1], np.diff(slopes)):
        out = out + float(ds) * jnp.maximum(t - t_k, 0.0)
    return out


def adaptive_min_fwhm(alpha):
    """The smallest minor-axis FWHM [px] at which the ``"adaptive"`` integration holds."""
    t = jnp.clip(jnp.log(alpha - 1.0), _ADAPTIVE_LOG_AM1[0], _ADAPTIVE_LOG_AM1[-1])
    return _limit(_ADAPTIVE_MIN_FWHM[-1], t)


@dataclass(frozen=True)
class _Profile:
    """Common machinery; subclasses define the quadratic form and the radial function."""

    integration: str = "taylor4"
    erf_order: int = 3

    name: ClassVar[str] = ""
    shape_names: ClassVar[tuple] = ()
    circular: ClassVar[bool] = False  # Q = a (X**2 + Y**2): b = 0 and c = a
    default_integration: ClassVar[str] = "taylor4"

    def __post_init__(self):
        _check_integration(self.integration, self)

    # -- parameter layout -------------------------------------------------------------
    @property
    def param_names(self):
        """Physical parameter names in fitting order."""
        return ("flux", "x", "y") + self.shape_names + ("background",)

    @property
    def n_params(self):
        return 4 + len(self.shape_names)

    @property
    def n_shape(self):
        return len(self.shape_names)

    # -- the profile --------------------------------------------------------------------
    def profile(self, X, Y, u):
        """Normalised, pixel-integrated profile at offsets (X, Y); ``u`` internal shape tuple."""
        integ = self.integration
        if integ == "erf":
            return self._erf_profile(X, Y, u)
        a, b, c, norm = self.quad_form(u)
        if integ == "center":
            return norm * self.radial(a * X * X + 2.0 * b * X * Y + c * Y * Y, u, 0)[0]
        if integ.startswith("taylor"):
            return norm * self._box_average(X, Y, u, a, b, c, order=int(integ[6:]))
        if integ == "adaptive":
            return norm * self._adaptive_average(X, Y, u, a, b, c)
        nodes, weights = _gl_nodes(int(integ[2:]))
        out = 0.0
        for ui, wi in zip(nodes, weights):
            Xi = X + ui
            for vj, wj in zip(nodes, weights):
                Yj = Y + vj
                Q = a * Xi * Xi + 2.0 * b * Xi * Yj + c * Yj * Yj
                out = out + (wi * wj) * self.radial(Q, u, 0)[0]
        return norm * out

    def _box_average(self, X, Y, u, a, b, c, *, order, h2=1.0):
        """Unnormalised average over the box of side ``sqrt(h2)`` centred on each (X, Y).

        The k-th Q-derivative always meets k powers of (a, b, c): it is taken scaled by
        ``s**k`` (s = (a + c) / 2) and the form divided by s. Unscaled, a Moffat running to
        the Gaussian limit (alpha ~ 1e5 on plate stars) overflowed float32 in its 6th
        derivative (alpha**6) and the fit ended in NaN."""
        if self.circular:
            return _box_taylor_circular(self.radial(a * (X * X + Y * Y), u, order, a), 1.0, X, Y, order, h2)
        s = 0.5 * (a + c)
        g = self.radial(a * X * X + 2.0 * b * X * Y + c * Y * Y, u, order, s)
        return _box_taylor(g, a / s, b / s, c / s, X, Y, order, h2)

    def _adaptive_average(self, X, Y, u, a, b, c):
        """``"adaptive"``: the box expansion on every pixel then, where the call's narrowest
        star needs it (``_split_level``), the pixels nearest each star replaced by their
        average over sub-pixels (``_near_pixels``).

        A star's pixels are the trailing axes along which every shape parameter is
        broadcast, a row-major grid of unit steps (as every stamp is). The nearest pixels
        are found by index arithmetic and checked against their offsets: pixels that are
        not on such a grid keep the one-box expansion.
        """
        out = self._box_average(X, Y, u, a, b, c, order=_ADAPTIVE_ORDER)
        per_star = (a, b, c) + tuple(u)
        shape = jnp.broadcast_shapes(jnp.shape(X), jnp.shape(Y), *(jnp.shape(v) for v in per_star))
        n_pix = 0
        while n_pix < len(shape) and all(jnp.ndim(v) <= n_pix or jnp.shape(v)[-1 - n_pix] == 1 for v in per_star):
            n_pix += 1
        stars = shape[: len(shape) - n_pix]
        n, p = int(np.prod(stars)), int(np.prod(shape[len(stars) :]))
        if n * p == 0:
            return out
        flat = lambda v: jnp.broadcast_to(v, shape).reshape(n, p)
        per = lambda v: jnp.broadcast_to(v, stars + (1,) * n_pix).reshape(n)
        X, Y, out = flat(X), flat(Y), flat(out)
        # each star's nearest pixel (column, row) and its offset from it
        col0 = -jax.lax.stop_gradient(jnp.round(X[:, 0]))
        row0 = -jax.lax.stop_gradient(jnp.round(Y[:, 0]))
        fx, fy = X[:, 0] + col0, Y[:, 0] + row0
        u, a, b, c = tuple(map(per, u)), per(a), per(b), per(c)
        level = self._split_level(u, a, b, c)

        def refine(k):
            return lambda *ops: self._near_pixels(*ops, levels=k, dtype=out.dtype)

        # two branches, not one per level: every level's split in one (each star still
        # takes its own level's values); compiling a branch per level cost twice as long
        split = jnp.max(level) > 0
        near, filled = jax.lax.cond(split, refine(len(_ADAPTIVE_SPLITS)), refine(0), level, fx, fy, u, a, b, c)
        pix = self._near_index(jax.lax.stop_gradient(X), jax.lax.stop_gradient(Y), col0, row0, p)
        pix = jnp.where(filled, pix, p)
        return out.at[jnp.arange(n)[None, :], pix].set(near, mode="drop").reshape(shape)

    @staticmethod
    def _near_index(X, Y, col0, row0, p):
        """Flat indices (25, stars) of the 5 x 5 pixels nearest each star, the pixel at
        offset (i, j) from the nearest one in row 5 (i + 2) + (j + 2); ``p`` (dropped by
        the scatter) where a pixel is off the grid or not at its offset."""
        nx = jnp.maximum(jnp.argmax(Y[0] != Y[0, 0]), 1)  # pixels per row (row-major grid)
        nx = jnp.where(jnp.all(Y[0] == Y[0, 0]), p, nx)
        step = np.arange(-2.0, 3.0)
        di = np.repeat(step, 5)[:, None].astype(np.result_type(X.dtype, np.float32))
        dj = np.tile(step, 5)[:, None].astype(di.dtype)
        col, row = col0 + di, row0 + dj
        inside = (col >= 0) & (col < nx) & (row >= 0) & (row < p // nx)
        index = jnp.where(inside, row * nx + col, 0).astype(jnp.int32)
        gx = jnp.take_along_axis(X.T, index, axis=0)
        gy = jnp.take_along_axis(Y.T, index, axis=0)
        ok = inside & (jnp.abs(gx - (X[:, 0] + col)) < 1e-3) & (jnp.abs(gy - (Y[:, 0] + row)) < 1e-3)
        return jnp.where(ok, index, p)

    def _near_pixels(self, level, fx, fy, u, a, b, c, *, levels, dtype):
        """Pixel averages at offsets (fx + i, fy + j) from stars given as 1-d arrays, laid
        out as ``_near_index``'s 5 x 5 (shape (25, stars)), and where they are filled.

        A star at level l > 0 gets its 3 x 3 pixels |i|, |j| <= 1 from the split of
        ``_ADAPTIVE_SPLITS[l - 1]`` and, if that has a ring, the 16 around them from the
        ring's split; each star gets its own level's values, whatever the others need
        (``levels``: the highest level of the call, whose splits are computed), so that a
        star's model does not depend on the stars it is fitted with. The stars are the
        inner axis: XLA CPU vectorises that one, and there are many.
        """
        inner = [(i, j) for i in range(-1, 2) for j in range(-1, 2)]
        outer = [(i, j) for i in range(-2, 3) for j in range(-2, 3) if (i, j) not in inner]
        rows = lambda pixels: np.array([5 * (i + 2) + (j + 2) for i, j in pixels])
        near = jnp.zeros((25, fx.shape[0]), dtype)
        filled = jnp.zeros((25, fx.shape[0]), bool)
        wanted = [[(inner, split)] + ([(outer, ring)] if ring else []) for split, ring in _ADAPTIVE_SPLITS[:levels]]
        sets = list({(len(p), s): (p, s) for level_sets in wanted for p, s in level_sets}.values())
        if not sets:
            return near, filled
        done = dict(zip([(len(p), s) for p, s in sets], self._sub_pixel_averages(sets, fx, fy, u, a, b, c)))
        for k, level_sets in enumerate(wanted, start=1):
            mine = level == k
            for pixels, s in level_sets:
                r = rows(pixels)
                near = near.at[r].set(jnp.where(mine, done[len(pixels), s].astype(dtype), near[r]))
                filled = filled.at[r].set(filled[r] | mine)
        return near, filled

    def _sub_pixel_averages(self, sets, fx, fy, u, a, b, c):
        """For each ``(pixels, split)`` of ``sets``: the averages over split x split
        sub-pixels of the pixels at offsets (fx + i, fy + j), (i, j) in ``pixels``, shape
        (len(pixels), stars). All sub-pixels in one expansion (one copy of it in the
        compiled program, not one per set: that halved the compile time)."""
        dx, dy, h2 = [], [], []
        for pixels, split in sets:
            sub = np.array(_sub_offsets(split))
            ij = np.array(pixels, float)
            dx.append((ij[:, 0, None, None] + sub[None, :, None] + 0.0 * sub[None, None, :]).reshape(-1))
            dy.append((ij[:, 1, None, None] + 0.0 * sub[None, :, None] + sub[None, None, :]).reshape(-1))
            h2.append(np.full(dx[-1].size, 1.0 / (split * split)))
        dt = np.result_type(fx.dtype, np.float32)
        X = fx + np.concatenate(dx)[:, None].astype(dt)
        Y = fy + np.concatenate(dy)[:, None].astype(dt)
        vals = self._box_average(X, Y, u, a, b, c, order=_ADAPTIVE_ORDER, h2=np.concatenate(h2)[:, None].astype(dt))
        out, start = [], 0
        for pixels, split in sets:
            size = len(pixels) * split * split
            out.append(jnp.mean(vals[start : start + size].reshape((len(pixels), split * split, -1)), axis=1))
            start += size
        return out

    def _split_level(self, u, a, b, c):  # pragma: no cover - Moffat only
        raise NotImplementedError

    def image(self, flux, x, y, shape, background, ny, nx):
        """Model image(s) from physical parameters (arrays broadcast over stars)."""
        u = self.shape_to_internal(tuple(jnp.asarray(s) for s in shape))
        yy, xx = jnp.mgrid[0:ny, 0:nx]
        ex = lambda v: jnp.asarray(v)[..., None, None]
        prof = self.profile(xx - ex(x), yy - ex(y), tuple(ex(v) for v in u))
        return ex(flux) * prof + ex(background)

    # -- to be defined by subclasses -----------------------------------------------------
    def quad_form(self, u):  # pragma: no cover - abstract
        raise NotImplementedError

    def radial(self, Q, u, order, scale=1.0):  # pragma: no cover - abstract
        """The profile g(Q) and its first ``order`` Q-derivatives, the k-th times ``scale**k``."""
        raise NotImplementedError

    def shape_to_internal(self, shape):  # pragma: no cover - abstract
        raise NotImplementedError

    def shape_to_physical(self, u):  # pragma: no cover - abstract
        raise NotImplementedError

    def fwhm(self, shape):  # pragma: no cover - abstract
        raise NotImplementedError

    def ellipticity(self, shape):  # pragma: no cover - abstract
        raise NotImplementedError

    def initial_shape(self, fwhm):  # pragma: no cover - abstract
        raise NotImplementedError

    def shape_ok(self, shape, stamp_size):
        """True where the physical shape is inside the documented limits."""
        f = self.fwhm(shape)
        return (f > 0.5) & (f < stamp_size)

    def derived(self, shape):
        """Quantities reported besides the fitted ones: name -> value (jax arrays)."""
        return {}


@dataclass(frozen=True)
class Gaussian(_Profile):
    """Elliptical Gaussian: ``sigma_x, sigma_y, rho`` (correlation); reports ``fwhm``.

    ``fwhm = 2.3548 * (sigma_x sigma_y sqrt(1 - rho**2))**0.5``, the FWHM of the circle
    of the same area as the half-maximum ellipse.
    """

    integration: str = "erf"
    name: ClassVar[str] = "gaussian"
    shape_names: ClassVar[tuple] = ("sigma_x", "sigma_y", "rho")
    default_integration: ClassVar[str] = "erf"

    def shape_to_internal(self, shape):
        sx, sy, rho = shape
        return (jnp.log(sx), jnp.log(sy), jnp.arctanh(rho))

    def shape_to_physical(self, u):
        return (jnp.exp(u[0]), jnp.exp(u[1]), jnp.tanh(u[2]))

    def quad_form(self, u):
        isx2, isy2 = jnp.exp(-2.0 * u[0]), jnp.exp(-2.0 * u[1])
        ch2 = jnp.cosh(u[2]) ** 2  # 1 / (1 - rho**2)
        rho = jnp.tanh(u[2])
        a = isx2 * ch2
        c = isy2 * ch2
        b = -rho * jnp.exp(-u[0] - u[1]) * ch2
        norm = jnp.exp(-u[0] - u[1]) * jnp.cosh(u[2]) / (2.0 * np.pi)
        return a, b, c, norm

    def radial(self, Q, u, order, scale=1.0):
        g0 = jnp.exp(-0.5 * Q)
        return [g0 * (-0.5 * scale) ** k for k in range(order + 1)]

    def _erf_profile(self, X, Y, u):
        sx, sy, rho = self.shape_to_physical(u)
        s = sx / jnp.cosh(u[2])  # conditional sigma of x given y: sx sqrt(1 - rho**2)
        beta = rho * sx / sy  # conditional mean of x given y: beta * y

        def px(yv):
            return 0.5 * (erf((X + 0.5 - beta * yv) / (_SQRT2 * s)) - erf((X - 0.5 - beta * yv) / (_SQRT2 * s)))

        py = 0.5 * (erf((Y + 0.5) / (_SQRT2 * sy)) - erf((Y - 0.5) / (_SQRT2 * sy)))
        p_center = px(Y)
        out = p_center * py
        nodes, weights = _gl_nodes(self.erf_order)
        for v, w in zip(nodes, weights):
            yv = Y + v
            dens = jnp.exp(-0.5 * (yv / sy) ** 2) / (_SQRT_2PI * sy)
            out = out + w * dens * (px(yv) - p_center)
        return out

    def fwhm(self, shape):
        sx, sy, rho = shape
        return FWHM_PER_SIGMA * jnp.sqrt(sx * sy * jnp.sqrt(1.0 - rho * rho))

    def ellipticity(self, shape):
        sx, sy, rho = shape
        sxx, syy, sxy = sx * sx, sy * sy, rho * sx * sy
        return (sxx - syy) / (sxx + syy), 2.0 * sxy / (sxx + syy)

    def initial_shape(self, fwhm):
        sigma = fwhm / FWHM_PER_SIGMA
        return (sigma, sigma, jnp.zeros_like(sigma))

    def derived(self, shape):
        return {"fwhm": self.fwhm(shape)}


def _moffat_inv_gamma2(u):
    """1 / gamma**2 from internal (log fwhm, log(alpha - 1))."""
    alpha = 1.0 + jnp.exp(u[1])
    return 4.0 * jnp.expm1(_LN2 / alpha) * jnp.exp(-2.0 * u[0]), alpha


def _moffat_radial(Q, alpha, order, scale=1.0):
    w = 1.0 + Q
    g = [jnp.exp(-alpha * jnp.log(w))]
    if order:
        t = scale / w
        for k in range(1, order + 1):
            g.append(g[-1] * (-(alpha + (k - 1)) * t))
    return g


@dataclass(frozen=True)
class Moffat(_Profile):
    """Circular Moffat ``(alpha-1)/(pi gamma**2) (1 + r**2/gamma**2)**-alpha``: ``fwhm, alpha``.

    ``fwhm = 2 gamma sqrt(2**(1/alpha) - 1)`` is fitted directly (it is less correlated
    with ``alpha`` than ``gamma`` is).
    """

    integration: str = "adaptive"
    name: ClassVar[str] = "moffat"
    shape_names: ClassVar[tuple] = ("fwhm", "alpha")
    circular: ClassVar[bool] = True
    default_integration: ClassVar[str] = "adaptive"

    def shape_to_internal(self, shape):
        fwhm, alpha = shape
        return (jnp.log(fwhm), jnp.log(alpha - 1.0))

    def shape_to_physical(self, u):
        return (jnp.exp(u[0]), 1.0 + jnp.exp(u[1]))

    def quad_form(self, u):
        ig2, alpha = _moffat_inv_gamma2(u)
        return ig2, 0.0 * ig2, ig2, (alpha - 1.0) * ig2 / np.pi

    def radial(self, Q, u, order, scale=1.0):
        return _moffat_radial(Q, 1.0 + jnp.exp(u[1]), order, scale)

    def fwhm(self, shape):
        return shape[0]

    def ellipticity(self, shape):
        z = jnp.zeros_like(shape[0])
        return z, z

    def initial_shape(self, fwhm):
        return (fwhm, jnp.full_like(fwhm, 3.0))

    def minor_fwhm(self, shape):
        """FWHM along the profile's narrowest direction."""
        return self.fwhm(shape)

    def shape_ok(self, shape, stamp_size):
        """alpha inside [1.1, 20], fwhm below the stamp size and, along the minor axis, above
        the adaptive integration's limit (``adaptive_min_fwhm``: 0.43-0.58 px)."""
        alpha = shape[1]
        inside = (alpha > 1.1) & (alpha < 20.0) & (self.fwhm(shape) < stamp_size)
        return inside & (self.minor_fwhm(shape) > adaptive_min_fwhm(jnp.clip(alpha, 1.1, 20.0)))

    def _split_level(self, u, a, b, c):
        """Each star's level of the adaptive integration: 0 (no split) or 1 + the index in
        ``_ADAPTIVE_SPLITS`` of the split its minor-axis FWHM and alpha need."""
        curv = 0.5 * (a + c) + jnp.sqrt(0.25 * (a - c) ** 2 + b * b)  # 1/gamma**2 along the minor axis
        fwhm = 2.0 * jnp.sqrt(jnp.expm1(_LN2 / (1.0 + jnp.exp(u[1]))) / curv)
        t = jnp.clip(u[1], _ADAPTIVE_LOG_AM1[0], _ADAPTIVE_LOG_AM1[-1])
        fwhm, t = jax.lax.stop_gradient((fwhm, t))
        level = jnp.zeros(jnp.shape(fwhm), jnp.int32)
        for limits in _ADAPTIVE_MIN_FWHM[:-1]:
            level = level + (fwhm < _limit(limits, t)).astype(jnp.int32)
        return level


def _conformal(u2, u3):
    """cosh(r), sinh(r)/r for the conformal ellipticity (eta1, eta2); |e| = tanh(r)."""
    r = jnp.sqrt(u2 * u2 + u3 * u3 + 1e-30)
    return jnp.cosh(r), jnp.sinh(r) / r, r


@dataclass(frozen=True)
class EllipticalMoffat(Moffat):
    """Moffat sheared by an area-preserving ellipticity ``e1, e2`` (|e| < 1).

    ``e = (A**2 - B**2)/(A**2 + B**2)`` for semi-axes A >= B, position angle
    ``theta = atan2(e2, e1)/2`` from +x towards +y. ``fwhm`` is the geometric mean of the
    major- and minor-axis FWHM; the normalisation is that of the circular Moffat.
    """

    name: ClassVar[str] = "elliptical_moffat"
    shape_names: ClassVar[tuple] = ("fwhm", "alpha", "e1", "e2")
    circular: ClassVar[bool] = False

    def shape_to_internal(self, shape):
        fwhm, alpha, e1, e2 = shape
        e = jnp.sqrt(e1 * e1 + e2 * e2 + 1e-30)
        k = jnp.arctanh(e) / e
        return (jnp.log(fwhm), jnp.log(alpha - 1.0), e1 * k, e2 * k)

    def shape_to_physical(self, u):
        ch, shr, r = _conformal(u[2], u[3])
        k = jnp.tanh(r) / r
        return (jnp.exp(u[0]), 1.0 + jnp.exp(u[1]), u[2] * k, u[3] * k)

    def quad_form(self, u):
        ig2, alpha = _moffat_inv_gamma2(u)
        ch, shr, _ = _conformal(u[2], u[3])
        a = (ch - u[2] * shr) * ig2
        c = (ch + u[2] * shr) * ig2
        b = -u[3] * shr * ig2
        return a, b, c, (alpha - 1.0) * ig2 / np.pi

    def ellipticity(self, shape):
        return shape[2], shape[3]

    def minor_fwhm(self, shape):
        e = jnp.sqrt(shape[2] ** 2 + shape[3] ** 2)
        return shape[0] * jnp.sqrt(jnp.sqrt((1.0 - e) / (1.0 + e)))

    def initial_shape(self, fwhm):
        z = jnp.zeros_like(fwhm)
        return (fwhm, jnp.full_like(fwhm, 3.0), z, z)


MODELS = {m.name: m for m in (Gaussian, Moffat, EllipticalMoffat)}


def get_model(model="moffat", integration=None):
    """A model instance from a name (``gaussian``, ``moffat``, ``elliptical_moffat``) or instance."""
    if isinstance(model, _Profile):
        if integration is not None and integration != model.integration:
            return type(model)(integration=integration, erf_order=model.erf_order)
        return model
    try:
        cls = MODELS[str(model).lower()]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; use one of {sorted(MODELS)}") from None
    return cls(integration=integration or cls.default_integration)
