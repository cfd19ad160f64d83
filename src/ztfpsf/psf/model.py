"""The PSF of an image as an object and a file: write, read, evaluate anywhere.

A :class:`PSFModel` holds a profile (``moffat``, ``elliptical_moffat``, ``gaussian``, with
its pixel integration) whose internal shape parameters are Legendre polynomials in the
image position (degree 0: one shape for the whole image). Positions are image pixel
coordinates, 0-based with pixel centres at integers.

Region of validity: the rectangle ``bounds = (xmin, xmax, ymin, ymax)`` (by default the
image, pixel edges included: ``(-0.5, nx - 0.5, -0.5, ny - 0.5)``), over which the
polynomials were fitted and normalised to [-1, 1]. Outside it every evaluation returns
NaN (polynomials must not be extrapolated silently) unless ``extrapolate=True``.

File format (``<stem>.psf.fits``, format version :data:`FORMAT_VERSION`)
-------------------------------------------------------------------------
Primary header: ``PSFVERS`` (format version), ``MODEL``, ``INTEG`` (pixel integration),
``PSFMODE`` (``shared``/``varying``), ``DEGREE``, ``BASIS`` (``legendre``), ``NTERMS``,
``NSHAPE``, ``XMIN, XMAX, YMIN, YMAX`` (validity and normalisation), ``IMNX, IMNY``
(image size, if known), ``IMAGE`` (path of the image), ``ZPSFVER`` (ztfpsf version),
``DATE``, and the fit's statistics when known: ``NSTARS, NFIT, NRESERVE, NOUTLIER,
CHI2TRN, CHI2RES`` (chi2/dof of training and reserve stars).
HDU ``COEFFS`` (table): one row per term: ``term`` (e.g. ``P1(x)P0(y)``), ``px, py``, then
one column per internal shape parameter (e.g. ``ln_fwhm, ln_alpha_minus_1``): the
coefficient of that term. Internal parameters at a position are
``sum_j coef[j] * P_px[j](xn) * P_py[j](yn)`` with ``xn = 2 (x - XMIN)/(XMAX - XMIN) - 1``.
HDU ``COVAR`` (image): covariance of the coefficients, shape-parameter-major (index
``k * NTERMS + j`` for shape parameter ``k`` and term ``j``).
HDU ``META`` (table ``key, value``): the full provenance as JSON values; ``support``: the
vertices of the convex hull of the stars that fitted the PSF (outside it the polynomial is
extrapolated: flag ``EXTRAPOLATED``).

Format version 2 adds the flux scale and the hybrid PSF's pixel part (version 1 files are
still read: no residual, flux = the profile's total flux):

- ``FLUXRAD`` [px]: the radius of the circular aperture whose flux a PSF flux is
  (``0``: the profile's total flux). PSF stamps are normalised to unit flux within it, so
  ``flux`` of :func:`ztfpsf.photometry` and of the joint fit is the star's flux within
  ``FLUXRAD`` (7 px: ZTF's largest aperture, 14 px diameter, the one of ``APCOR6``), and
  never an extrapolation of the profile's wings.
- ``RESIDUAL`` = T for a hybrid PSF, with ``RESDEG`` (total degree of the residual's
  spatial polynomial: its terms are the first ``RESNTERM`` rows of ``COEFFS``), ``RESOVER``
  (nodes per pixel), ``RESRAD`` [px] and ``RESN`` (nodes per axis, ``2 RESRAD RESOVER + 1``),
  and HDU ``RESIDUAL`` (image ``(RESNTERM, RESN, RESN)``): the node values ``r[t, k, j]``
  of spatial term ``t`` at offset ``((j - (RESN-1)/2)/RESOVER, (k - (RESN-1)/2)/RESOVER)``
  [px] from the star's centre, in flux per px^2 of a unit-flux star; the residual surface
  is ``sum r B(dy RESOVER - k') B(dx RESOVER - j')`` with ``B`` the centred cubic B-spline
  (:mod:`ztfpsf.psf.residual`), added to the analytic profile before the pixel integral.
- ``APCORR``, ``APCORERR``, ``APCORN``: the measured median and error of PSF minus
  ``FLUXRAD``-aperture magnitude of the image's bright unflagged stars (a check of the
  flux scale: ~0 when the model describes the stars out to ``FLUXRAD``), and ``HDRAPCOR``,
  the image header's ``APCOR6`` when known.

Format version 3 is version 2 with a flux-dependent size (brighter-fatter,
:mod:`ztfpsf.psf.brighter_fatter`); it is written only when the slope is not 0, so a
reader that ignores the law refuses the file instead of misreading it. ``BFSLOPE`` (the
law's slope ``b``: fractional size change per decade of flux), ``BFSLERR`` (its error),
``BFREF`` (the reference flux ``F_ref`` [ADU, the ``FLUXRAD`` scale] at which ``COEFFS``
give the size), ``BFLGMIN, BFLGMAX`` (log10 flux range the law holds on, clamped
outside): the size parameters (log fwhm; the Gaussian's log widths) of a star of flux
``F`` are those of ``COEFFS`` plus ``ln(1 + b (log10 F - log10 F_ref))``. Files without
``BFSLOPE`` read as ``b = 0``. ``RESFLUX`` (hybrid PSFs; 0 when absent): the number of
flux terms of the residual surface, the last rows of HDU ``RESIDUAL`` after the
``RESNTERM - RESFLUX`` spatial ones: the surface of a star of flux ``F`` adds
``(log10 F - log10 F_ref) r[t]`` (``F`` clamped to ``BFLGMIN, BFLGMAX`` as for the size
law), so the pixel part may change with the flux (the core of ZTF stars does: see the
README). A file with ``RESFLUX > 0`` is version 3. Every file may carry the run's brighter-fatter diagnostic
(``BFSZSLP, BFSZERR``: the stars' size slope and error, same unit; ``BFAPSLP, BFAPERR``:
PSF - ``FLUXRAD`` aperture magnitude against magnitude [mag/mag]).
"""

import datetime
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from astropy.io import fits
from astropy.table import Table

from .. import __version__
from .._jax import with_x64
from ..io.results import atomic_write
from ..models import get_model
from .basis import basis_terms, legendre_basis, normalise
from .brighter_fatter import log_flux, size_shift
from .residual import Hybrid, ResidualGrid

log = logging.getLogger(__name__)

__all__ = ["PSFModel", "PSFFileError", "profile_enclosed", "FORMAT_VERSION", "READABLE_VERSIONS", "FLUX_RADIUS", "INTERNAL_NAMES"]

#: Version of the PSF file layout written by this module; read() refuses others.
FORMAT_VERSION = 2
#: Version written for a PSF with a flux-dependent size (``BFSLOPE != 0``).
BF_FORMAT_VERSION = 3
#: Versions read() accepts.
READABLE_VERSIONS = (1, 2, 3)
#: Default flux scale: the flux within this radius [px] (ZTF's 14 px diameter aperture).
FLUX_RADIUS = 7.0

#: Names of each model's internal (fitted, unconstrained) shape parameters.
INTERNAL_NAMES = {
    "moffat": ("ln_fwhm", "ln_alpha_minus_1"),
    "elliptical_moffat": ("ln_fwhm", "ln_alpha_minus_1", "eta1", "eta2"),
    "gaussian": ("ln_sigma_x", "ln_sigma_y", "atanh_rho"),
}
_INTERNAL_DOC = {
    "moffat": "ln(fwhm), ln(alpha - 1)",
    "elliptical_moffat": "ln(fwhm), ln(alpha - 1), conformal ellipticity eta = atanh(|e|) e/|e|",
    "gaussian": "ln(sigma_x), ln(sigma_y), atanh(rho)",
}
_HEADER_STATS = {
    "n_stars": ("NSTARS", "stars given to the fit"),
    "n_fit": ("NFIT", "stars that constrained the PSF"),
    "n_reserve": ("NRESERVE", "reserve stars (left out, scored)"),
    "n_outlier": ("NOUTLIER", "stars clipped as outliers"),
    "chi2_dof_train": ("CHI2TRN", "chi2/dof of the training stars"),
    "chi2_dof_reserve": ("CHI2RES", "chi2/dof of the reserve stars"),
    "apcorr": ("APCORR", "PSF - FLUXRAD aperture mag, bright stars"),
    "apcorr_err": ("APCORERR", "error of APCORR [mag]"),
    "apcorr_n": ("APCORN", "stars in APCORR"),
    "header_apcor": ("HDRAPCOR", "image header APCOR6 [mag]"),
    "bf_size_slope": ("BFSZSLP", "stars' size slope [frac. per decade of flux]"),
    "bf_size_slope_err": ("BFSZERR", "error of BFSZSLP"),
    "bf_apcorr_slope": ("BFAPSLP", "PSF - FLUXRAD aperture mag slope [mag/mag]"),
    "bf_apcorr_slope_err": ("BFAPERR", "error of BFAPSLP"),
}


class PSFFileError(ValueError):
    """A PSF file that cannot be used (not a PSF file, other format version, corrupt)."""


def _json_safe(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value


def _padded(fn, *arrays):
    """``fn`` on arrays padded (by repeating row 0) to a power-of-two length: few compiles."""
    n = arrays[0].shape[0]
    size = max(8, 1 << int(np.ceil(np.log2(max(n, 1)))))
    padded = [np.concatenate([a, np.repeat(a[:1], size - n, axis=0)]) if size > n else a for a in arrays]
    return np.asarray(fn(*padded), dtype=np.float64)[:n]


@functools.lru_cache(maxsize=16)
def _physical_fn(model):
    """Compiled internal ``(N, n_shape)`` -> ``(N, n_shape + 3)``: shape, fwhm, e1, e2."""

    def fn(u):
        shape = model.shape_to_physical(tuple(u[:, k] for k in range(model.n_shape)))
        e1, e2 = model.ellipticity(shape)
        z = jnp.zeros_like(u[:, 0])
        return jnp.stack(list(shape) + [model.fwhm(shape), e1 + z, e2 + z], axis=1)

    return jax.jit(fn)


@functools.lru_cache(maxsize=16)
def _jacobian_fn(model):
    """Compiled d(shape, fwhm)/d(internal) per position: ``(N, n_shape + 1, n_shape)``."""

    def one(u):
        shape = model.shape_to_physical(tuple(u[k] for k in range(model.n_shape)))
        return jnp.stack(list(shape) + [model.fwhm(shape)])

    return jax.jit(jax.vmap(jax.jacfwd(one)))


@functools.lru_cache(maxsize=16)
def _stamp_fn(model, ny, nx):
    """Compiled unit-flux pixel-integrated stamps from offsets ``(N,)`` and internal shapes
    ``(N, n_shape)`` (for a hybrid PSF the residual nodes follow the analytic shape)."""
    yy, xx = np.mgrid[0:ny, 0:nx]

    def fn(dx, dy, u):
        X = xx[None] - dx[:, None, None]
        Y = yy[None] - dy[:, None, None]
        unpack = getattr(model, "unpack", None)
        shape = unpack(u) if unpack else tuple(u[:, k, None, None] for k in range(model.n_shape))
        return model.profile(X, Y, shape)

    return jax.jit(fn)


@functools.lru_cache(maxsize=16)
def _enclosed_fn(name, grid, radius, n_r=96, n_t=64):
    """Compiled disc integral of the continuous PSF (no pixel integral): Gauss-Legendre in
    ``r`` (resolves a core far narrower than a pixel), uniform in angle."""
    core = get_model(name, "center")
    t, w = np.polynomial.legendre.leggauss(n_r)
    r = 0.5 * radius * (t + 1.0)
    wr = 0.5 * radius * w * r * (2.0 * np.pi / n_t)
    phi = 2.0 * np.pi * (np.arange(n_t) + 0.5) / n_t
    X = (r[:, None] * np.cos(phi)[None]).reshape(-1)
    Y = (r[:, None] * np.sin(phi)[None]).reshape(-1)
    weight = np.repeat(wr, n_t)

    if grid is not None:  # the surface's integral is linear in its nodes: one weight per node
        bx, by = (np.asarray(grid.point_basis(jnp.asarray(v))) for v in (X, Y))
        node_weight = np.einsum("p,pk,pj->kj", weight, by, bx).reshape(-1)

    def fn(block):
        nc = core.n_shape
        u = tuple(block[:, k, None] for k in range(nc))
        total = core.profile(jnp.asarray(X)[None], jnp.asarray(Y)[None], u) @ jnp.asarray(weight)
        if grid is not None:
            total = total + block[:, nc:] @ jnp.asarray(node_weight)
        return total

    return jax.jit(fn)


@with_x64
def profile_enclosed(model, shape, radius=FLUX_RADIUS):
    """Fraction of an analytic profile's total flux within ``radius`` [px] of its centre,
    for physical shapes ``{'fwhm': array, 'alpha': array, ...}`` (e.g. a simulation's truth)."""
    m = get_model(model)
    u = m.shape_to_internal(tuple(jnp.asarray(np.atleast_1d(shape[k]), jnp.float64) for k in m.shape_names))
    block = np.stack([np.asarray(v, dtype=np.float64) for v in np.broadcast_arrays(*u)], axis=1)
    return _padded(_enclosed_fn(m.name, None, float(radius)), block)


class PSFModel:
    """A PSF valid over an image region, its shape a polynomial in the position.

    Parameters
    ----------
    model : str or model instance
        ``'moffat'``, ``'elliptical_moffat'`` or ``'gaussian'``.
    coef : array (n_shape, n_terms)
        Coefficients of the internal shape parameters (see :data:`INTERNAL_NAMES`) on the
        Legendre terms of :func:`ztfpsf.psf.basis.basis_terms` for ``degree``.
    bounds : (xmin, xmax, ymin, ymax)
        Region of validity and normalisation, image pixel coordinates.
    degree : int
        Total polynomial degree (0: one shape everywhere).
    cov : array (n_shape * n_terms, n_shape * n_terms), optional
        Covariance of the flattened ``coef``.
    integration : str, optional
        Pixel integration of the model (its default otherwise).
    image_shape : (ny, nx), optional
    meta : dict, optional
        Provenance and fit statistics (written to the file).
    """

    def __init__(self, model, coef, bounds, *, degree=0, cov=None, integration=None, image_shape=None, meta=None,
                 residual=None, grid=None, flux_radius=FLUX_RADIUS, support=None, bf_slope=0.0, bf_ref=None,
                 bf_range=None, bf_slope_err=None, residual_flux=0):
        self.model = get_model(model, integration)
        # brighter-fatter law (ztfpsf.psf.brighter_fatter): size x (1 + bf_slope log10(F / bf_ref))
        self.bf_slope = float(bf_slope or 0.0)
        self.bf_ref = None if bf_ref is None else float(bf_ref)
        self.bf_range = None if bf_range is None else tuple(float(v) for v in bf_range)
        self.bf_slope_err = None if bf_slope_err is None else float(bf_slope_err)
        self.residual_flux = int(residual_flux or 0)
        if (self.bf_slope != 0 or self.residual_flux) and not (self.bf_ref and self.bf_ref > 0):
            raise ValueError(f"a flux-dependent PSF needs a positive reference flux bf_ref; got {bf_ref}")
        self.support = None if support is None else np.asarray(support, dtype=np.float64).reshape(-1, 2)
        self.flux_radius = float(flux_radius or 0.0)
        self.degree = int(degree)
        self.terms = basis_terms(self.degree)
        coef = np.asarray(coef, dtype=np.float64)
        expect = (self.model.n_shape, len(self.terms))
        if coef.shape != expect:
            raise ValueError(f"coef must have shape {expect} for {self.model.name} degree {self.degree}; got {coef.shape}")
        self.coef = coef
        self.bounds = tuple(float(b) for b in bounds)
        if not (self.bounds[1] > self.bounds[0] and self.bounds[3] > self.bounds[2]):
            raise ValueError(f"bounds must be (xmin, xmax, ymin, ymax) with xmax > xmin, ymax > ymin; got {bounds}")
        P = coef.size
        self.cov = None if cov is None else np.asarray(cov, dtype=np.float64).reshape(P, P)
        self.image_shape = None if image_shape is None else tuple(int(v) for v in image_shape)
        self.meta = dict(meta or {})
        self.residual, self.grid, self.hybrid = None, None, None
        if residual is not None:
            self.grid = grid or ResidualGrid()
            self.residual = np.asarray(residual, dtype=np.float64)
            n_terms = self.residual.shape[0] - self.residual_flux
            if self.residual.ndim != 2 or self.residual.shape[1] != self.grid.size or n_terms > len(self.terms) \
                    or n_terms not in [len(basis_terms(d)) for d in range(self.degree + 1)]:
                raise ValueError(f"residual must have shape (n_terms + {self.residual_flux}, {self.grid.size}) with the "
                                 f"terms of a degree <= {self.degree}; got {self.residual.shape}")
            self.hybrid = Hybrid(self.model, self.grid)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    @with_x64
    def constant(cls, model, shape, bounds, *, integration=None, **kwargs):
        """A PSF with one physical shape everywhere, e.g. ``{'fwhm': 2.1, 'alpha': 3.0}``."""
        m = get_model(model, integration)
        missing = [k for k in m.shape_names if k not in shape]
        if missing:
            raise ValueError(f"shape lacks {missing} for the {m.name} model")
        u = m.shape_to_internal(tuple(jnp.asarray(float(shape[k]), jnp.float64) for k in m.shape_names))
        coef = np.array([[float(v)] for v in u])
        return cls(m, coef, bounds, degree=0, integration=m.integration, **kwargs)

    @property
    def mode(self):
        return "shared" if self.degree == 0 else "varying"

    @property
    def internal_names(self):
        return INTERNAL_NAMES[self.model.name]

    def __repr__(self):
        xmin, xmax, ymin, ymax = self.bounds
        return (
            f"PSFModel({self.model.name!r}, integration={self.model.integration!r}, mode={self.mode!r}, "
            f"degree={self.degree}, bounds=({xmin:g}, {xmax:g}, {ymin:g}, {ymax:g}))"
        )

    # -- evaluation ---------------------------------------------------------------------------
    def contains(self, x, y):
        """True where ``(x, y)`` is inside the region of validity (bounds included)."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        xmin, xmax, ymin, ymax = self.bounds
        return (x >= xmin) & (x <= xmax) & (y >= ymin) & (y <= ymax)

    def supported(self, x, y):
        """True where ``(x, y)`` lies inside (or within 1 px of) the convex hull of the stars
        that fitted the PSF (:attr:`support`, its vertices); everywhere when none is known."""
        x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        if self.support is None or len(self.support) < 3:
            return np.ones(x.shape, bool)
        from matplotlib.path import Path

        path, pts = Path(self.support), np.column_stack([x.ravel(), y.ravel()])
        # within 1 px of the hull counts (the sign of the radius that widens it follows the
        # vertices' orientation: take both)
        inside = path.contains_points(pts, radius=1.0) | path.contains_points(pts, radius=-1.0)
        return inside.reshape(x.shape)

    def basis(self, x, y):
        """Legendre basis ``(..., n_terms)`` at image positions."""
        xn, yn = normalise(x, y, self.bounds)
        return legendre_basis(xn, yn, self.degree)

    @property
    def flux_dependent(self):
        """True when the shape depends on the star's flux (a brighter-fatter slope, or flux
        terms in the residual surface)."""
        return self.bf_slope != 0 or self.residual_flux > 0

    def internal(self, x, y, extrapolate=False, flux=None):
        """Internal shape parameters ``(..., n_shape)``; NaN outside the validity region.
        ``flux``: the stars' flux for a flux-dependent PSF (None: the size at ``bf_ref``)."""
        law = self.bf_slope != 0 and flux is not None
        x, y, *f = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64),
                                       *([np.asarray(flux, np.float64)] if law else []))
        u = self.basis(x, y) @ self.coef.T
        if law:
            u = size_shift(self.model.name, u, f[0], self.bf_slope, self.bf_ref, self.bf_range)
        if not extrapolate:
            u = np.where(self.contains(x, y)[..., None], u, np.nan)
        return u

    @property
    def profile_model(self):
        """The profile that renders this PSF: the analytic model, or the hybrid."""
        return self.hybrid or self.model

    @property
    def residual_degree(self):
        return None if self.residual is None else max(px + py for px, py in self.terms[: self.residual_terms])

    @property
    def residual_terms(self):
        """Spatial terms of the residual surface (its first rows; the flux terms follow)."""
        return None if self.residual is None else self.residual.shape[0] - self.residual_flux

    def residual_nodes(self, x, y, flux=None):
        """Residual surface's node values ``(N, grid.size)`` at image positions (hybrid only),
        of stars of ``flux`` when the surface has a flux term (None: the reference flux)."""
        K = self.residual_terms
        T = self.basis(np.ravel(x), np.ravel(y))
        nodes = T[:, :K] @ self.residual[:K]
        if self.residual_flux and flux is not None:
            lg = log_flux(np.broadcast_to(np.ravel(flux), (T.shape[0],)), self.bf_ref, self.bf_range)
            nodes = nodes + lg[:, None] * self.residual[K]
        return nodes

    def shape_block(self, x, y, u=None, flux=None):
        """Internal shape of :attr:`profile_model` per position ``(N, n_shape)``: the analytic
        shape ``u`` (computed if not given, at ``flux`` for a flux-dependent PSF), followed
        by the residual nodes for a hybrid."""
        x, y = np.ravel(x), np.ravel(y)
        u = self.internal(x, y, extrapolate=True, flux=None if flux is None else np.ravel(flux)) if u is None else u
        if self.residual is None:
            return u
        return np.concatenate([u, self.residual_nodes(x, y, None if flux is None else np.ravel(flux))], axis=1)

    @with_x64
    def enclosed(self, x, y, radius=None, flux=None):
        """Fraction of the unnormalised profile (analytic + residual, total 1) within a
        circle of ``radius`` [px] (default :attr:`flux_radius`) around a star at (x, y)
        (of ``flux``, for a flux-dependent PSF); 1 when the radius is 0 (total flux).
        Arrays in, arrays out."""
        radius = self.flux_radius if radius is None else float(radius)
        x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        if radius <= 0:
            return np.ones(x.shape)
        block = self.shape_block(x, y, flux=None if flux is None else np.broadcast_to(flux, x.shape))
        out = _padded(_enclosed_fn(self.model.name, self.grid, radius), block)
        return out.reshape(x.shape)

    @with_x64
    def _physical(self, x, y, extrapolate, flux=None):
        """``(..., n_shape + 3)``: physical shape, fwhm, e1, e2 at the positions."""
        u = self.internal(x, y, extrapolate, flux=flux)
        flat = u.reshape(-1, self.model.n_shape)
        if flat.shape[0] == 0:
            return np.zeros(u.shape[:-1] + (self.model.n_shape + 3,))
        out = _padded(_physical_fn(self.model), flat)
        return out.reshape(u.shape[:-1] + (out.shape[-1],))

    def shape(self, x, y, extrapolate=False, flux=None):
        """Physical shape parameters at ``(x, y)`` (of stars of ``flux`` for a flux-dependent
        PSF): dict name -> array (NaN outside bounds)."""
        p = self._physical(x, y, extrapolate, flux)
        return {name: p[..., k] for k, name in enumerate(self.model.shape_names)}

    @with_x64
    def shape_err(self, x, y, extrapolate=False):
        """1-sigma errors of the physical shape parameters (and ``fwhm``) at ``(x, y)``,
        propagated from the coefficients' covariance (NaN without one)."""
        x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        m = self.model
        names = tuple(m.shape_names) + (() if "fwhm" in m.shape_names else ("fwhm",))
        if self.cov is None or x.size == 0:
            return {k: np.full(x.shape, np.nan) for k in names}
        ns, K = m.n_shape, len(self.terms)
        T = self.basis(x, y).reshape(-1, K)
        J = _padded(_jacobian_fn(m), T @ self.coef.T)[:, : len(names)]  # (N, n_out, ns)
        G = np.einsum("nik,nj->nikj", J, T).reshape(T.shape[0], len(names), ns * K)
        var = np.einsum("nip,pq,niq->ni", G, self.cov, G)
        out = np.sqrt(np.maximum(var, 0.0))
        if not extrapolate:
            out = np.where(self.contains(x, y).reshape(-1)[:, None], out, np.nan)
        return {k: out[:, i].reshape(x.shape) for i, k in enumerate(names)}

    def fwhm(self, x, y, extrapolate=False, flux=None):
        """FWHM [px] at ``(x, y)`` (the model's definition: for the elliptical Moffat the
        geometric mean of the axes; for the Gaussian that of the equal-area circle), of a
        star of ``flux`` for a flux-dependent PSF (None: at its reference flux)."""
        return self._physical(x, y, extrapolate, flux)[..., self.model.n_shape]

    def alpha(self, x, y, extrapolate=False):
        """Moffat power-law index at ``(x, y)``."""
        if "alpha" not in self.model.shape_names:
            raise ValueError(f"the {self.model.name} model has no alpha")
        return self.shape(x, y, extrapolate)["alpha"]

    def ellipticity(self, x, y, components=False, extrapolate=False):
        """Ellipticity ``|e|`` at ``(x, y)``, or ``(e1, e2)`` with ``components=True``
        (``e = (A^2 - B^2)/(A^2 + B^2)``, angle from +x towards +y; 0 for circular models)."""
        p = self._physical(x, y, extrapolate)
        e1, e2 = p[..., self.model.n_shape + 1], p[..., self.model.n_shape + 2]
        return (e1, e2) if components else np.hypot(e1, e2)

    def stamp_origin(self, x, y, shape=(17, 17)):
        """Image coordinates ``(x0, y0)`` of pixel [0, 0] of the stamp :meth:`stamp` returns:
        ``(round(x) - nx // 2, round(y) - ny // 2)`` (halves round up)."""
        from ..stamps import stamp_origin

        ny, nx = shape
        return stamp_origin(x, 0.0, nx)[0], stamp_origin(0.0, y, ny)[1]

    @with_x64
    def render(self, x, y, origin, shape=(17, 17), flux=None):
        """Unit-flux, pixel-integrated stamps ``(N, ny, nx)`` of stars at image positions
        ``x, y`` (N,) on stamps whose pixel [0, 0] is at image ``origin (N, 2)`` (any
        origin: a figure's stamp, a cutout). Extrapolates outside the region. ``flux``
        (N,): the stars' flux, which sets the shape of a flux-dependent PSF."""
        ny, nx = (int(shape), int(shape)) if np.ndim(shape) == 0 else (int(shape[0]), int(shape[1]))
        xf, yf = np.ravel(np.asarray(x, np.float64)), np.ravel(np.asarray(y, np.float64))
        ff = None if flux is None else np.ravel(np.broadcast_to(np.asarray(flux, np.float64), np.shape(x)))
        origin = np.asarray(origin, np.float64).reshape(-1, 2)
        img = _padded(_stamp_fn(self.profile_model, ny, nx), xf - origin[:, 0], yf - origin[:, 1], self.shape_block(xf, yf, flux=ff))
        return img / self.enclosed(xf, yf, flux=ff)[:, None, None]

    @with_x64
    def stamp(self, x, y, shape=(17, 17), return_origin=False, extrapolate=False, flux=None):
        """Normalised, pixel-integrated PSF image of a star at ``(x, y)`` (sub-pixel).

        The stamp's central pixel ``[ny // 2, nx // 2]`` is the image pixel nearest to
        ``(x, y)`` (see :meth:`stamp_origin`); the star sits at ``(x - x0, y - y0)`` in
        stamp coordinates. Values are the fraction of a unit flux falling in each pixel,
        the flux being that within :attr:`flux_radius` (the file's ``FLUXRAD``; the total
        for 0): a 17x17 stamp sums to about 1. Scalars in: ``(ny, nx)``; arrays of N positions: ``(N, ny, nx)``. NaN
        outside the region of validity (unless ``extrapolate``). With
        ``return_origin=True`` also returns ``(x0, y0)``. ``flux``: the star's flux (sets
        the shape of a flux-dependent PSF; default its reference flux).
        """
        ny, nx = (int(shape), int(shape)) if np.ndim(shape) == 0 else (int(shape[0]), int(shape[1]))
        x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        scalar = x.ndim == 0
        xf, yf = x.reshape(-1), y.reshape(-1)
        x0, y0 = self.stamp_origin(xf, yf, (ny, nx))
        ff = None if flux is None else np.broadcast_to(np.asarray(flux, np.float64), x.shape).reshape(-1)
        img = self.render(xf, yf, np.column_stack([x0, y0]), (ny, nx), flux=ff)
        if not extrapolate:
            img = np.where(self.contains(xf, yf)[:, None, None], img, np.nan)
        if scalar:
            img, x0, y0 = img[0], x0[0], y0[0]
        return (img, (x0, y0)) if return_origin else img

    # -- file ---------------------------------------------------------------------------------
    def write(self, path, overwrite=False):
        """Write the PSF file (see the module docstring for the layout)."""
        path = os.fspath(path)
        hdr = fits.Header()
        hdr["PSFVERS"] = (BF_FORMAT_VERSION if self.flux_dependent else FORMAT_VERSION, "ztfpsf PSF file format version")
        hdr["MODEL"] = (self.model.name, "PSF profile")
        hdr["INTEG"] = (self.model.integration, "pixel integration of the profile")
        hdr["PSFMODE"] = (self.mode, "shared: one shape; varying: polynomial in x, y")
        hdr["DEGREE"] = (self.degree, "total degree of the shape polynomials")
        hdr["BASIS"] = ("legendre", "P_px(xn) P_py(yn), xn = 2(x-XMIN)/(XMAX-XMIN)-1")
        hdr["NTERMS"] = (len(self.terms), "polynomial terms")
        hdr["NSHAPE"] = (self.model.n_shape, "internal shape parameters")
        hdr["INTERNAL"] = _INTERNAL_DOC[self.model.name]
        for key, v in zip(("XMIN", "XMAX", "YMIN", "YMAX"), self.bounds):
            hdr[key] = (v, "validity region [px, 0-based]")
        if self.image_shape is not None:
            hdr["IMNY"], hdr["IMNX"] = self.image_shape
        hdr["IMAGE"] = str(self.meta.get("image", ""))  # no comment: long paths continue over cards
        hdr["ZPSFVER"] = (str(self.meta.get("ztfpsf_version", __version__)), "ztfpsf version")
        hdr["DATE"] = (str(self.meta.get("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))), "UTC")
        hdr["FLUXRAD"] = (self.flux_radius, "flux = flux within this radius [px]; 0: total")
        hdr["RESIDUAL"] = (self.residual is not None, "hybrid: analytic + residual surface")
        if self.residual is not None:
            hdr["RESDEG"] = (self.residual_degree, "degree of the residual polynomial")
            hdr["RESNTERM"] = (self.residual.shape[0], "residual rows: terms of COEFFS, then RESFLUX")
            if self.residual_flux:
                hdr["RESFLUX"] = (self.residual_flux, "last rows x log10(F/BFREF)")
            hdr["RESOVER"] = (self.grid.oversampling, "residual nodes per pixel")
            hdr["RESRAD"] = (self.grid.radius, "residual nodes out to this radius [px]")
            hdr["RESN"] = (self.grid.n, "residual nodes per axis")
            hdr["RESBASIS"] = ("cubic B-spline", "residual surface basis")
        if self.flux_dependent:
            hdr["BFSLOPE"] = (self.bf_slope, "size x (1 + BFSLOPE log10(F/BFREF))")
            if self.bf_slope_err is not None and np.isfinite(self.bf_slope_err):
                hdr["BFSLERR"] = (self.bf_slope_err, "error of BFSLOPE")
            hdr["BFREF"] = (self.bf_ref, "reference flux of the flux terms [ADU, FLUXRAD]")
            if self.bf_range is not None:
                hdr["BFLGMIN"], hdr["BFLGMAX"] = (self.bf_range[0], "law held below: log10 flux"), (self.bf_range[1], "law held above: log10 flux")
        for key, (card, comment) in _HEADER_STATS.items():
            value = self.meta.get(key)
            if value is not None and np.isfinite(value):
                hdr[card] = (value.item() if hasattr(value, "item") else value, comment)
        coeffs = Table()
        coeffs["term"] = [f"P{i}(x)P{j}(y)" for i, j in self.terms]
        coeffs["px"] = np.array([i for i, _ in self.terms], dtype=np.int16)
        coeffs["py"] = np.array([j for _, j in self.terms], dtype=np.int16)
        for k, name in enumerate(self.internal_names):
            coeffs[name] = self.coef[k]
        hdus = [fits.PrimaryHDU(header=hdr), fits.table_to_hdu(coeffs)]
        hdus[1].name = "COEFFS"
        cov = self.cov if self.cov is not None else np.full((self.coef.size,) * 2, np.nan)
        covh = fits.ImageHDU(cov, name="COVAR")
        covh.header["ORDER"] = ("shape-major", "index = k * NTERMS + j")
        hdus.append(covh)
        if self.residual is not None:
            rh = fits.ImageHDU(self.residual.reshape(-1, self.grid.n, self.grid.n), name="RESIDUAL")
            rh.header["BUNIT"] = ("1/px2", "flux per px^2 of a unit-flux star")
            hdus.append(rh)
        meta = dict(self.meta)
        if self.support is not None:
            meta["support"] = self.support
        meta = {k: json.dumps(_json_safe(v)) for k, v in meta.items()}
        mt = Table({"key": list(meta) or [""], "value": list(meta.values()) or ["null"]})
        hdus.append(fits.table_to_hdu(mt))
        hdus[-1].name = "META"
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists (pass overwrite=True)")
        atomic_write(path, lambda tmp: fits.HDUList(hdus).writeto(tmp))  # a reader never sees half a file
        return path

    @classmethod
    def read(cls, path):
        """Read a PSF file; :class:`PSFFileError` names the file and the problem."""
        path = os.fspath(path)
        try:
            with fits.open(path) as hdul:
                hdr = hdul[0].header
                if "PSFVERS" not in hdr:
                    raise PSFFileError(f"{path}: not a ztfpsf PSF file (no PSFVERS keyword)")
                version = hdr["PSFVERS"]
                if version not in READABLE_VERSIONS:
                    raise PSFFileError(
                        f"{path}: PSF file format version {version}, but ztfpsf {__version__} reads "
                        f"versions {READABLE_VERSIONS}; refit the PSF or read it with the ztfpsf that wrote it "
                        f"({hdr.get('ZPSFVER', 'unknown')})"
                    )
                names = [h.name for h in hdul]
                for need in ("COEFFS", "COVAR"):
                    if need not in names:
                        raise PSFFileError(f"{path}: PSF file lacks its {need} extension")
                model = get_model(hdr["MODEL"], hdr["INTEG"])
                degree = int(hdr["DEGREE"])
                coeffs = Table(hdul["COEFFS"].data)
                cov = np.array(hdul["COVAR"].data, dtype=np.float64)
                meta = {}
                if "META" in names:
                    for k, v in zip(hdul["META"].data["key"], hdul["META"].data["value"]):
                        if k:
                            meta[str(k)] = json.loads(v)
                bounds = tuple(float(hdr[k]) for k in ("XMIN", "XMAX", "YMIN", "YMAX"))
                image_shape = (int(hdr["IMNY"]), int(hdr["IMNX"])) if "IMNX" in hdr else None
                flux_radius = float(hdr.get("FLUXRAD", 0.0))  # version 1: total flux
                law = dict(bf_slope=float(hdr.get("BFSLOPE", 0.0)), bf_ref=hdr.get("BFREF"), bf_slope_err=hdr.get("BFSLERR"),
                           bf_range=(hdr["BFLGMIN"], hdr["BFLGMAX"]) if "BFLGMIN" in hdr and "BFLGMAX" in hdr else None)
                residual, grid = None, None
                if hdr.get("RESIDUAL", False):
                    if "RESIDUAL" not in names:
                        raise PSFFileError(f"{path}: hybrid PSF file lacks its RESIDUAL extension")
                    grid = ResidualGrid(int(hdr["RESOVER"]), int(hdr["RESRAD"]))
                    cube = np.array(hdul["RESIDUAL"].data, dtype=np.float64)
                    if cube.ndim != 3 or cube.shape[1:] != (grid.n, grid.n):
                        raise PSFFileError(f"{path}: RESIDUAL has shape {cube.shape}, expected (n_terms, {grid.n}, {grid.n})")
                    residual = cube.reshape(cube.shape[0], -1)
                    law["residual_flux"] = int(hdr.get("RESFLUX", 0))
        except PSFFileError:
            raise
        except FileNotFoundError:
            raise PSFFileError(f"{path}: no such PSF file") from None
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise PSFFileError(f"{path}: unreadable PSF file ({err})") from None
        internal = INTERNAL_NAMES[model.name]
        missing = [n for n in ("px", "py", *internal) if n not in coeffs.colnames]
        if missing:
            raise PSFFileError(f"{path}: COEFFS table lacks columns {missing} of the {model.name} model")
        terms = list(zip(coeffs["px"].tolist(), coeffs["py"].tolist()))
        if terms != basis_terms(degree):
            raise PSFFileError(f"{path}: COEFFS terms {terms} do not match DEGREE = {degree}")
        coef = np.array([np.asarray(coeffs[n], dtype=np.float64) for n in internal])
        if np.all(np.isnan(cov)):
            cov = None
        meta.setdefault("image", hdr.get("IMAGE", ""))
        try:
            support = meta.pop("support", None)
            return cls(model, coef, bounds, degree=degree, cov=cov, integration=model.integration, image_shape=image_shape,
                       meta=meta, residual=residual, grid=grid, flux_radius=flux_radius, support=support, **law)
        except ValueError as err:
            raise PSFFileError(f"{path}: inconsistent PSF file ({err})") from None
