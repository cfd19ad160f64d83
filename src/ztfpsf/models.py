"""PSF profiles, pixel-integrated, in pure JAX.

Every profile is a radial function ``g(Q)`` of a quadratic form
``Q = a X**2 + 2 b X Y + c Y**2`` of the offsets ``X = x_pixel - x``, ``Y = y_pixel - y``,
times a normalisation that makes its integral over the plane 1. A star's model image is
``flux * profile + background``, so ``flux`` is the star's total flux.

Functions here work elementwise on broadcastable arrays: they are written for one star
and applied to a batch by broadcasting (stars on the leading axis), never with I/O.

Pixel integration (``integration=``):

``"taylor4"`` (default for the Moffat)
    The average of the profile over the pixel box, expanded in even derivatives of the
    profile up to 4th order: ``g + (dxx+dyy) g/24 + (dxxxx+dyyyy) g/1920 + dxxyy g/576``.
    Derivatives of ``g(Q)`` reuse the same power ``(1+Q)**-alpha``, so it costs little
    more than evaluating the profile at the pixel centre.
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

from dataclasses import dataclass
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

__all__ = ["Gaussian", "Moffat", "EllipticalMoffat", "get_model", "MODELS", "FWHM_PER_SIGMA"]

# Python floats, not numpy scalars: they must not promote float32 arrays to float64.
FWHM_PER_SIGMA = float(2.0 * np.sqrt(2.0 * np.log(2.0)))
_SQRT2 = float(np.sqrt(2.0))
_LN2 = float(np.log(2.0))
_SQRT_2PI = float(np.sqrt(2.0 * np.pi))


def _check_integration(integration, allow_erf):
    if integration in ("center", "taylor2", "taylor4") or (allow_erf and integration == "erf"):
        return
    if integration.startswith("gl") and integration[2:].isdigit() and int(integration[2:]) >= 1:
        return
    allowed = "'center', 'taylor2', 'taylor4', 'glN'" + (", 'erf'" if allow_erf else "")
    raise ValueError(f"unknown pixel integration {integration!r}; use one of {allowed}")


def _gl_nodes(n):
    """Gauss-Legendre nodes and weights on [-1/2, 1/2] (weights sum to 1)."""
    u, w = np.polynomial.legendre.leggauss(n)
    return [float(v) / 2.0 for v in u], [float(v) / 2.0 for v in w]


def _box_taylor_circular(g, q, X, Y, order):
    """``_box_taylor`` for ``Q = q (X**2 + Y**2)``, the terms collected (far fewer operations)."""
    X2, Y2 = X * X, Y * Y
    Q = q * (X2 + Y2)
    out = g[0] + q * (g[1] + Q * g[2]) / 6.0
    if order >= 4:
        q2 = q * q
        out = out + q2 * (
            g[2] * (7.0 / 360.0)
            + Q * (g[3] * (7.0 / 180.0) + g[4] * (Q / 120.0))
            + g[4] * (q2 * X2 * Y2 / 90.0)
        )
    return out


def _box_taylor(g, a, b, c, X, Y, order):
    """Pixel-box average of g(Q) from its Q-derivatives ``g = [g0, g1, ...]``."""
    qx = 2.0 * (a * X + b * Y)
    qy = 2.0 * (b * X + c * Y)
    qxx, qyy, qxy = 2.0 * a, 2.0 * c, 2.0 * b
    qx2, qy2 = qx * qx, qy * qy
    dxx = g[1] * qxx + g[2] * qx2
    dyy = g[1] * qyy + g[2] * qy2
    out = g[0] + (dxx + dyy) / 24.0
    if order >= 4:
        dxxxx = g[4] * qx2 * qx2 + 6.0 * g[3] * qx2 * qxx + 3.0 * g[2] * qxx * qxx
        dyyyy = g[4] * qy2 * qy2 + 6.0 * g[3] * qy2 * qyy + 3.0 * g[2] * qyy * qyy
        dxxyy = (
            g[2] * (qxx * qyy + 2.0 * qxy * qxy)
            + g[3] * (qyy * qx2 + qxx * qy2 + 4.0 * qx * qy * qxy)
            + g[4] * qx2 * qy2
        )
        out = out + (dxxxx + dyyyy) / 1920.0 + dxxyy / 576.0
    return out


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
        _check_integration(self.integration, allow_erf=isinstance(self, Gaussian))

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
        a, b, c, norm = self.quad_form(u)
        integ = self.integration
        if integ == "center":
            return norm * self.radial(a * X * X + 2.0 * b * X * Y + c * Y * Y, u, 0)[0]
        if integ.startswith("taylor"):
            order = int(integ[6:])
            if self.circular:
                Q = a * (X * X + Y * Y)
                return norm * _box_taylor_circular(self.radial(Q, u, order), a, X, Y, order)
            Q = a * X * X + 2.0 * b * X * Y + c * Y * Y
            return norm * _box_taylor(self.radial(Q, u, order), a, b, c, X, Y, order)
        if integ == "erf":
            return self._erf_profile(X, Y, u)
        nodes, weights = _gl_nodes(int(integ[2:]))
        out = 0.0
        for ui, wi in zip(nodes, weights):
            Xi = X + ui
            for vj, wj in zip(nodes, weights):
                Yj = Y + vj
                Q = a * Xi * Xi + 2.0 * b * Xi * Yj + c * Yj * Yj
                out = out + (wi * wj) * self.radial(Q, u, 0)[0]
        return norm * out

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

    def radial(self, Q, u, order):  # pragma: no cover - abstract
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

    def radial(self, Q, u, order):
        g0 = jnp.exp(-0.5 * Q)
        return [g0 * (-0.5) ** k for k in range(order + 1)]

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


def _moffat_radial(Q, alpha, order):
    w = 1.0 + Q
    g = [jnp.exp(-alpha * jnp.log(w))]
    if order:
        t = 1.0 / w
        for k in range(1, order + 1):
            g.append(g[-1] * (-(alpha + (k - 1)) * t))
    return g


@dataclass(frozen=True)
class Moffat(_Profile):
    """Circular Moffat ``(alpha-1)/(pi gamma**2) (1 + r**2/gamma**2)**-alpha``: ``fwhm, alpha``.

    ``fwhm = 2 gamma sqrt(2**(1/alpha) - 1)`` is fitted directly (it is less correlated
    with ``alpha`` than ``gamma`` is).
    """

    name: ClassVar[str] = "moffat"
    shape_names: ClassVar[tuple] = ("fwhm", "alpha")
    circular: ClassVar[bool] = True

    def shape_to_internal(self, shape):
        fwhm, alpha = shape
        return (jnp.log(fwhm), jnp.log(alpha - 1.0))

    def shape_to_physical(self, u):
        return (jnp.exp(u[0]), 1.0 + jnp.exp(u[1]))

    def quad_form(self, u):
        ig2, alpha = _moffat_inv_gamma2(u)
        return ig2, 0.0 * ig2, ig2, (alpha - 1.0) * ig2 / np.pi

    def radial(self, Q, u, order):
        return _moffat_radial(Q, 1.0 + jnp.exp(u[1]), order)

    def fwhm(self, shape):
        return shape[0]

    def ellipticity(self, shape):
        z = jnp.zeros_like(shape[0])
        return z, z

    def initial_shape(self, fwhm):
        return (fwhm, jnp.full_like(fwhm, 3.0))

    def shape_ok(self, shape, stamp_size):
        return _Profile.shape_ok(self, shape, stamp_size) & (shape[1] > 1.1) & (shape[1] < 20.0)


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
