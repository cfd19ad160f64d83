"""Simulated stars and ZTF-like science quadrants with known truth.

Two levels:

:func:`simulate_stamps`
    ``n`` isolated noisy star stamps (for unit tests and fitting benchmarks).
:func:`simulate_quadrant` / :func:`make_quadrant`
    A whole ZTF-like science quadrant (3080 x 3072 px by default) written as a ZTF-named
    ``sciimg`` + ``mskimg`` pair, a Gaia-like catalogue and a truth table; the PSF varies
    smoothly over the field (:class:`VaryingPSF`).

Stars are rendered with a Gauss-Legendre pixel integral (independent of the fitter's
Taylor expansion), then given Poisson noise in electrons and Gaussian read noise, and
converted back to ADU. ZTF-like defaults: gain 6.2 e-/ADU, read noise 8 e-, zero point
26.2, sky 150 ADU, 1.012"/px, FWHM ~2 px.

Brighter-fatter (off by default): ``brighter_fatter=b`` scales each star's size (fwhm; the
Gaussian's widths) by ``1 + b (log10 F - log10 F_ref)`` with ``F`` its total flux and
``F_ref`` the flux of magnitude ``bf_ref_mag`` (:func:`ztfpsf.psf.brighter_fatter.size_factor`;
the law the PSF model fits). On the real ZTF quadrant ``b`` = :data:`ZTF_BF_SLOPE`.
"""

import functools
import json
import logging
import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from astropy.table import Table

from ._jax import with_x64
from .io.results import atomic_write
from .models import EllipticalMoffat, get_model

__all__ = [
    "simulate_stamps",
    "simulate_quadrant",
    "make_quadrant",
    "SimulatedQuadrant",
    "VaryingPSF",
    "quadrant_filename",
    "nominal_center",
    "render_stars",
    "mag_to_flux",
    "ZTF_GAIN",
    "ZTF_READ_NOISE",
    "ZTF_ZEROPOINT",
    "ZTF_PIXEL_SCALE",
    "ZTF_QUADRANT_SHAPE",
    "ZTF_SATURATION",
    "ZTF_BF_SLOPE",
]

log = logging.getLogger(__name__)

ZTF_GAIN = 6.2
ZTF_READ_NOISE = 8.0
ZTF_ZEROPOINT = 26.2
ZTF_PIXEL_SCALE = 1.012  # arcsec / px
ZTF_QUADRANT_SHAPE = (3080, 3072)  # (ny, nx) = (NAXIS2, NAXIS1)
ZTF_SATURATION = 50000.0  # ADU; a typical SATURATE of a ZTF sciimg
ZTF_EXPTIME = 30.0
#: Brighter-fatter slope measured on the study's real ZTF quadrant (fractional fwhm change
#: per decade of flux; README "Brighter-fatter"): the amplitude the tests inject.
ZTF_BF_SLOPE = 0.004
_FILTER_ID = {"zg": 1, "zr": 2, "zi": 3}


def mag_to_flux(mag, zeropoint=ZTF_ZEROPOINT):
    """Total flux [ADU] of a star of magnitude ``mag``."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - zeropoint))


# ======================================================================================
# stamps
# ======================================================================================
def _bf_factor(flux, brighter_fatter, bf_ref_mag, zeropoint):
    """Per-star size factor of the injected brighter-fatter law (1 when off)."""
    if not brighter_fatter:
        return np.ones(np.shape(flux))
    from .psf.brighter_fatter import size_factor

    return size_factor(flux, brighter_fatter, mag_to_flux(bf_ref_mag, zeropoint))


def _shape_draws(model, n, rng, fwhm_range, alpha_range, ellipticity):
    fwhm = rng.uniform(*fwhm_range, n)
    if model.name == "gaussian":
        sigma = fwhm / 2.3548200450309493
        ratio = np.sqrt(1.0 + rng.uniform(-ellipticity, ellipticity, n))
        rho = rng.uniform(-ellipticity, ellipticity, n)
        return {"sigma_x": sigma * ratio, "sigma_y": sigma / ratio, "rho": rho}
    shape = {"fwhm": fwhm, "alpha": rng.uniform(*alpha_range, n)}
    if model.name == "elliptical_moffat":
        shape["e1"] = rng.uniform(-ellipticity, ellipticity, n)
        shape["e2"] = rng.uniform(-ellipticity, ellipticity, n)
    return shape


@with_x64
def simulate_stamps(
    n,
    *,
    model="moffat",
    size=17,
    mag_range=(14.0, 18.0),
    fwhm_range=(1.8, 2.6),
    alpha_range=(2.5, 4.0),
    ellipticity=0.1,
    shape=None,
    sky=150.0,
    gain=ZTF_GAIN,
    read_noise=ZTF_READ_NOISE,
    zeropoint=ZTF_ZEROPOINT,
    max_offset=0.5,
    seed=0,
    brighter_fatter=0.0,
    bf_ref_mag=17.0,
):
    """Simulate ``n`` noisy star stamps of ``size x size`` pixels with known truth.

    Returns ``(data, variance, truth)``: data in ADU (sky not subtracted), the true
    per-pixel variance, and a table with ``mag, flux, x, y, background`` and the shape
    parameters. ``shape`` (dict of scalars or arrays) overrides the drawn shape.
    ``brighter_fatter``: slope of the injected size-flux law (module docstring; the
    truth's shape columns include it), reference magnitude ``bf_ref_mag``.
    """
    rng = np.random.default_rng(seed)
    m = get_model(model, "gl8")
    mag = rng.uniform(*mag_range, n)
    flux = mag_to_flux(mag, zeropoint)
    c = (size - 1) / 2.0
    x = c + rng.uniform(-max_offset, max_offset, n)
    y = c + rng.uniform(-max_offset, max_offset, n)
    params = _shape_draws(m, n, rng, fwhm_range, alpha_range, ellipticity)
    for k, v in (shape or {}).items():
        params[k] = np.broadcast_to(np.asarray(v, dtype=float), (n,)).copy()
    factor = _bf_factor(flux, brighter_fatter, bf_ref_mag, zeropoint)
    for k in ("fwhm", "sigma_x", "sigma_y"):
        if k in params:
            params[k] = params[k] * factor
    background = np.full(n, float(sky))
    shape_t = tuple(jnp.asarray(params[k]) for k in m.shape_names)
    image = np.asarray(m.image(jnp.asarray(flux), jnp.asarray(x), jnp.asarray(y), shape_t, jnp.asarray(background), size, size))
    electrons = rng.poisson(np.clip(image, 0, None) * gain).astype(float)
    data = (electrons + rng.normal(0.0, read_noise, image.shape)) / gain
    variance = image / gain + (read_noise / gain) ** 2
    truth = Table({"mag": mag, "flux": flux, "x": x, "y": y, "background": background})
    for k in m.shape_names:
        truth[k] = params[k]
    truth["fwhm"] = np.asarray(m.fwhm(shape_t))
    truth.meta.update(model=m.name, gain=gain, read_noise=read_noise, zeropoint=zeropoint, sky=sky, seed=seed)
    return data, variance, truth


# ======================================================================================
# the spatially varying truth PSF
# ======================================================================================
_PSF_PARAMS = ("fwhm", "alpha", "e1", "e2")
_PSF_KEY = {"fwhm": "PSFFW", "alpha": "PSFAL", "e1": "PSFE1", "e2": "PSFE2"}  # + "ij" -> 7 chars


class VaryingPSF:
    """Elliptical Moffat PSF whose ``fwhm, alpha, e1, e2`` are polynomials over the image.

    Each parameter is ``sum_ij c[i, j] u**i v**j`` with the normalised coordinates
    ``u = 2 x / (nx - 1) - 1`` and ``v = 2 y / (ny - 1) - 1`` (both in [-1, 1] over the
    ``size = (ny, nx)`` domain; 0-based pixel coordinates, centres at integers). The shape
    is that of :class:`ztfpsf.models.EllipticalMoffat` (``fwhm`` px, ``alpha``,
    ellipticity ``e1, e2``). Outside its domain it extrapolates the polynomials.

    Stored as 7-character FITS keywords (``PSFFWij, PSFALij, PSFE1ij, PSFE2ij`` plus
    ``PSFNX, PSFNY``; :meth:`to_header` / :meth:`from_header`) and as a JSON-able dict
    (:meth:`to_dict` / :meth:`from_dict`, kept in the truth table's meta).
    """

    model = EllipticalMoffat(integration="gl4")

    def __init__(self, fwhm, alpha, e1=0.0, e2=0.0, *, size=ZTF_QUADRANT_SHAPE):
        self.size = (int(size[0]), int(size[1]))
        if min(self.size) < 2:
            raise ValueError(f"VaryingPSF size must be at least 2x2 pixels, got {self.size}")
        self.coeffs = {}
        for name, c in zip(_PSF_PARAMS, (fwhm, alpha, e1, e2)):
            c = np.atleast_2d(np.asarray(c, dtype=float))
            if c.ndim != 2 or c.shape[0] > 10 or c.shape[1] > 10:
                raise ValueError(f"VaryingPSF {name} coefficients must be a scalar or a 2-d array up to 10x10, got shape {c.shape}")
            self.coeffs[name] = c
        f, a, e1v, e2v = self.shape(*self._grid(9))
        if np.any(f <= 0.3) or np.any(a <= 1.05) or np.any(np.hypot(e1v, e2v) >= 0.9):
            raise ValueError("VaryingPSF gives an unphysical shape inside its domain (fwhm <= 0.3, alpha <= 1.05 or |e| >= 0.9)")

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def constant(cls, fwhm=2.2, alpha=3.0, e1=0.0, e2=0.0, *, size=ZTF_QUADRANT_SHAPE):
        """The same PSF everywhere (for the shared-model tests)."""
        return cls(fwhm, alpha, e1, e2, size=size)

    @classmethod
    def default(cls, size=ZTF_QUADRANT_SHAPE):
        """The default ZTF-like field: fwhm 1.94-2.40 px (median 2.14), alpha 2.5-3.5, |e| < 0.072.

        Quadratic in (u, v): the seeing worsens towards one corner, the wings steepen
        along x, and the ellipticity rotates across the field, like an out-of-focus
        tilted focal plane.
        """
        return cls(
            fwhm=[[2.10, -0.09, 0.06], [0.14, 0.04, 0.0], [0.05, 0.0, 0.0]],
            alpha=[[3.1, 0.15, 0.0], [0.35, 0.0, 0.0], [-0.1, 0.0, 0.0]],
            e1=[[0.015, 0.0, -0.02], [0.035, 0.0, 0.0], [0.0, 0.0, 0.0]],
            e2=[[-0.01, 0.03, 0.0], [0.0, 0.025, 0.0], [0.0, 0.0, 0.0]],
            size=size,
        )

    # -- evaluation --------------------------------------------------------------------
    def _uv(self, x, y):
        ny, nx = self.size
        return 2.0 * np.asarray(x, dtype=float) / (nx - 1) - 1.0, 2.0 * np.asarray(y, dtype=float) / (ny - 1) - 1.0

    def _grid(self, n):
        ny, nx = self.size
        return np.meshgrid(np.linspace(0, nx - 1, n), np.linspace(0, ny - 1, n))

    def _eval(self, name, x, y):
        u, v = self._uv(x, y)
        return np.polynomial.polynomial.polyval2d(u, v, self.coeffs[name]) + np.zeros(np.broadcast(u, v).shape)

    def fwhm(self, x, y):
        """FWHM [px] at image position(s) (x, y)."""
        return self._eval("fwhm", x, y)

    def alpha(self, x, y):
        """Moffat index at (x, y)."""
        return self._eval("alpha", x, y)

    def e1(self, x, y):
        return self._eval("e1", x, y)

    def e2(self, x, y):
        return self._eval("e2", x, y)

    def shape(self, x, y):
        """``(fwhm, alpha, e1, e2)`` arrays at (x, y): the shape tuple of ``EllipticalMoffat``."""
        return tuple(self._eval(name, x, y) for name in _PSF_PARAMS)

    @property
    def is_constant(self):
        return all(np.all(c.ravel()[1:] == 0) for c in self.coeffs.values())

    def median_fwhm(self, size=None):
        """Median FWHM [px] over an image of ``size = (ny, nx)`` (default: the domain),
        sampled on a 33 x 33 grid."""
        ny, nx = self.size if size is None else size
        return float(np.median(self.fwhm(*np.meshgrid(np.linspace(0, nx - 1, 33), np.linspace(0, ny - 1, 33)))))

    def stamp(self, x, y, size=25, integration="gl8"):
        """Unit-flux, pixel-integrated PSF images ``(N, size, size)`` of the PSF at image
        position(s) (x, y), each centred on its stamp's central pixel ``(size - 1) / 2``."""
        x, y = np.broadcast_arrays(np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float)))
        c = (size - 1) / 2.0
        shape = tuple(jnp.asarray(s) for s in self.shape(x, y))
        m = EllipticalMoffat(integration=integration)
        return np.asarray(m.image(jnp.ones(x.shape), jnp.full(x.shape, c), jnp.full(x.shape, c), shape, 0.0, size, size))

    # -- storage -----------------------------------------------------------------------
    def to_dict(self):
        return {"model": "elliptical_moffat", "size": list(self.size), **{k: c.tolist() for k, c in self.coeffs.items()}}

    @classmethod
    def from_dict(cls, d):
        if isinstance(d, str):
            d = json.loads(d)
        return cls(*(d[k] for k in _PSF_PARAMS), size=tuple(d["size"]))

    def to_header(self, header=None):
        """Write the PSF into a FITS header (returned): ``PSFMODEL, PSFNX, PSFNY`` and one
        keyword per coefficient, e.g. ``PSFFW10`` = fwhm coefficient of ``u**1 v**0``."""
        from astropy.io.fits import Header

        header = Header() if header is None else header
        header["PSFMODEL"] = ("elliptical_moffat", "truth PSF: polynomials in u, v")
        header["PSFNX"] = (self.size[1], "PSF domain: u = 2 x / (PSFNX - 1) - 1")
        header["PSFNY"] = (self.size[0], "PSF domain: v = 2 y / (PSFNY - 1) - 1")
        for name, c in self.coeffs.items():
            for (i, j), value in np.ndenumerate(c):
                header[f"{_PSF_KEY[name]}{i}{j}"] = (float(value), f"truth {name} coefficient of u^{i} v^{j}")
        return header

    @classmethod
    def from_header(cls, header):
        """The PSF stored by :meth:`to_header`; ``ValueError`` if the header has none."""
        if "PSFNX" not in header or "PSFFW00" not in header:
            raise ValueError("header has no ztfpsf truth PSF (PSFNX, PSFFW00, ... keywords)")
        coeffs = {}
        for name, key in _PSF_KEY.items():
            c = np.zeros((10, 10))
            for i in range(10):
                for j in range(10):
                    c[i, j] = header.get(f"{key}{i}{j}", 0.0)
            ni = max([i + 1 for i in range(10) if np.any(c[i])] + [1])
            nj = max([j + 1 for j in range(10) if np.any(c[:, j])] + [1])
            coeffs[name] = c[:ni, :nj]
        return cls(*(coeffs[k] for k in _PSF_PARAMS), size=(header["PSFNY"], header["PSFNX"]))

    def __eq__(self, other):
        if not isinstance(other, VaryingPSF) or self.size != other.size:
            return NotImplemented if not isinstance(other, VaryingPSF) else False
        return all(np.array_equal(*_pad_same(self.coeffs[k], other.coeffs[k])) for k in _PSF_PARAMS)

    __hash__ = None

    def __repr__(self):
        f = self.fwhm(*self._grid(17))
        return f"VaryingPSF(size={self.size}, fwhm {f.min():.3f}-{f.max():.3f} px{', constant' if self.is_constant else ''})"


def _pad_same(a, b):
    n = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
    out = []
    for c in (a, b):
        p = np.zeros(n)
        p[: c.shape[0], : c.shape[1]] = c
        out.append(p)
    return out


# ======================================================================================
# rendering stars into an image
# ======================================================================================
#: Stamp sizes for rendering; each star gets the smallest one whose edge is fainter than
#: ``wing_limit`` (bright stars need big stamps for the Moffat wings).
_RENDER_SIZES = (17, 25, 33, 49, 65, 97, 129)
_CHUNK_PIXELS = 1 << 21  # at most this many pixels per compiled rendering call (8 MB in float32)


@functools.partial(jax.jit, static_argnames=("size", "integration"))
def _render_batch(flux, x, y, fwhm, alpha, e1, e2, *, size, integration):
    model = EllipticalMoffat(integration=integration)
    return model.image(flux, x, y, (fwhm, alpha, e1, e2), 0.0, size, size)


def _render_size(flux, fwhm, alpha, e, wing_limit):
    """Smallest render size whose edge (half-width h along the minor axis of the wing)
    has a surface brightness below ``wing_limit`` [ADU/px]."""
    gamma2 = fwhm**2 / (4.0 * np.expm1(np.log(2.0) / alpha))
    peak = flux * (alpha - 1.0) / (np.pi * gamma2)
    sizes = np.array(_RENDER_SIZES)
    h = (sizes[None, :] - 1) / 2.0 * (1.0 - np.abs(e)[:, None])
    edge = peak[:, None] * (1.0 + h**2 / gamma2[:, None]) ** (-alpha[:, None])
    k = np.argmax(edge < wing_limit, axis=1)
    k[~np.any(edge < wing_limit, axis=1)] = len(sizes) - 1
    return sizes[k]


def _next_pow2(n):
    return 1 << max(0, int(n - 1).bit_length())


@with_x64
def render_stars(shape, x, y, flux, psf, *, integration="gl4", wing_limit=0.005, dtype=np.float32, fwhm_scale=None):
    """Noise-free image ``(ny, nx)`` of point sources [ADU] and each star's peak pixel value.

    Every star is rendered on its own stamp (size by brightness, see ``wing_limit``),
    pixel-integrated with ``integration``; stars of one stamp size are rendered together
    in compiled batches (batch sizes are powers of two so that few programs compile) and
    added into the image with ``bincount``. Pixels off the image are dropped. ``psf`` is
    a :class:`VaryingPSF` (anything with ``.shape(x, y)``). Returns ``(image, peak,
    render_size)``: float64 image, the star's own brightest pixel [ADU], stamp size.
    ``fwhm_scale`` (N,): per-star factor on the PSF's fwhm (brighter-fatter).
    """
    ny, nx = shape
    x, y, flux = (np.asarray(v, dtype=float) for v in (x, y, flux))
    fwhm, alpha, e1, e2 = psf.shape(x, y)
    if fwhm_scale is not None:
        fwhm = fwhm * np.asarray(fwhm_scale, dtype=float)
    size = _render_size(flux, fwhm, alpha, np.hypot(e1, e2), wing_limit)
    image = np.zeros(ny * nx)
    peak = np.zeros(len(x))
    pending = []  # (flat indices, values) not yet added: one bincount per ~4M pixels

    def flush():
        if pending:
            flat, values = (np.concatenate(v) for v in zip(*pending))
            image[:] += np.bincount(flat, weights=values, minlength=ny * nx)
            pending.clear()

    for s in np.unique(size):
        idx = np.flatnonzero(size == s)
        h = (s - 1) // 2
        ix0 = np.rint(x[idx]).astype(np.int64) - h
        iy0 = np.rint(y[idx]).astype(np.int64) - h
        # powers of two from 64 up: few distinct programs compile, little padding is rendered
        chunk = min(max(64, _next_pow2(len(idx))), max(64, _next_pow2(_CHUNK_PIXELS // (s * s)) // 2))
        offs = np.arange(s)
        for start in range(0, len(idx), chunk):
            sel = slice(start, start + chunk)
            n = len(idx[sel])
            args = [flux[idx[sel]], x[idx[sel]] - ix0[sel], y[idx[sel]] - iy0[sel]] + [p[idx[sel]] for p in (fwhm, alpha, e1, e2)]
            # pad to the chunk size (zero-flux stars) so that each size compiles once
            args = [np.pad(a.astype(dtype), (0, chunk - n), constant_values=a[0] if k > 2 else 0.0) for k, a in enumerate(args)]
            stamps = np.asarray(_render_batch(*map(jnp.asarray, args), size=int(s), integration=integration))[:n]
            peak[idx[sel]] = stamps.reshape(n, -1).max(axis=1)
            rows = iy0[sel, None, None] + offs[None, :, None]
            cols = ix0[sel, None, None] + offs[None, None, :]
            inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
            pending.append((np.broadcast_to(rows * nx + cols, stamps.shape)[inside], stamps[inside]))
            if sum(len(f) for f, _ in pending) > 4_000_000:
                flush()
    flush()
    return image.reshape(ny, nx), peak, size


# ======================================================================================
# a ZTF-like science quadrant
# ======================================================================================
_FIELD_CENTER = (280.0, 40.0)  # (ra, dec) [deg] of the nominal field used when ra/dec are not given
_QUADRANT_PITCH = 0.9  # deg between nominal quadrant centres (0.86 deg of pixels plus gaps)
_CORE = 17  # the fitting stamp: "clean" stars have a clean 17x17 box


def quadrant_filename(date, field, filter, ccd, qid, suffix="sciimg"):
    """ZTF file name ``ztf_<filefracday>_<field:06d>_<filter>_c<ccd:02d>_o_q<qid>_<suffix>.fits``.

    ``date`` is an ISO UT date-time (str) or an astropy ``Time``; ``filefracday`` is its
    ``YYYYMMDD`` plus the day fraction in millionths (truncated), as ZTF writes it.
    """
    from astropy.time import Time

    _check_ids(field, filter, ccd, qid)
    t = Time(date, scale="utc")
    day = t.datetime
    frac = (day.hour * 3600 + day.minute * 60 + day.second + day.microsecond * 1e-6) / 86400.0
    ffd = f"{day:%Y%m%d}{min(int(frac * 1e6 + 1e-6), 999999):06d}"
    return f"ztf_{ffd}_{int(field):06d}_{filter}_c{int(ccd):02d}_o_q{int(qid)}_{suffix}.fits"


def _check_ids(field, filter, ccd, qid):
    if filter not in _FILTER_ID:
        raise ValueError(f"unknown ZTF filter {filter!r}; use one of {', '.join(_FILTER_ID)}")
    if not 1 <= int(ccd) <= 16:
        raise ValueError(f"ZTF ccd must be 1-16, got {ccd}")
    if not 1 <= int(qid) <= 4:
        raise ValueError(f"ZTF qid must be 1-4, got {qid}")
    if not 0 <= int(field) <= 999999:
        raise ValueError(f"ZTF field must be 0-999999, got {field}")


def nominal_center(ccd, qid, field_center=_FIELD_CENTER):
    """(ra, dec) of a quadrant's centre on a nominal 4x4-CCD x 2x2-quadrant focal plane
    around ``field_center``: quadrants of one exposure do not overlap on the sky. (Not
    ZTF's true layout, which is irrelevant for a simulation.)"""
    row, col = divmod(int(ccd) - 1, 4)
    qrow, qcol = {1: (0, 1), 2: (0, 0), 3: (1, 0), 4: (1, 1)}[int(qid)]
    dx = (2 * col + qcol - 3.5) * _QUADRANT_PITCH
    dy = (3.5 - 2 * row - qrow) * _QUADRANT_PITCH
    ra0, dec0 = field_center
    dec = dec0 + dy
    return float((ra0 - dx / math.cos(math.radians(dec))) % 360.0), float(dec)


def _tan_wcs(ra, dec, shape, pixel_scale):
    """TAN WCS, CD matrix, north up (+y) and east left (-x), reference at the image centre."""
    from astropy.io.fits import Header

    ny, nx = shape
    s = pixel_scale / 3600.0
    h = Header()
    h["WCSAXES"] = 2
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
    h["CRPIX1"] = ((nx + 1) / 2.0, "FITS 1-based: the image centre")
    h["CRPIX2"] = (ny + 1) / 2.0
    h["CRVAL1"], h["CRVAL2"] = float(ra), float(dec)
    h["CD1_1"], h["CD1_2"] = (-s, "deg/px; north up, east left"), 0.0
    h["CD2_1"], h["CD2_2"] = 0.0, s
    h["RADESYS"], h["EQUINOX"] = "ICRS", 2000.0
    return h


def _draw_magnitudes(rng, n, mag_range, slope):
    """Magnitudes with cumulative counts N(< m) proportional to 10**(slope * m)."""
    lo, hi = (10.0 ** (slope * m) for m in mag_range)
    return np.log10(lo + rng.uniform(size=n) * (hi - lo)) / slope


def _sky_plane(shape, sky):
    """``sky = level`` or ``(level, gradient)``: ``level`` ADU at the centre, rising by
    ``gradient`` ADU from the left to the right edge and by ``gradient / 2`` from the
    bottom to the top. Returns a function of (x, y)."""
    level, gradient = (float(sky), 0.0) if np.ndim(sky) == 0 else (float(sky[0]), float(sky[1]))
    ny, nx = shape
    return lambda x, y: level + gradient * (x / max(nx - 1, 1) - 0.5) + 0.5 * gradient * (y / max(ny - 1, 1) - 0.5)


def _defects(rng, shape, bits):
    """Detector and sky defects: (additive light, extra-noise sigma, NaN pixels, mask bits).

    A satellite track (a bright line with a Gaussian profile, bit ``tracks``), 3 dead
    columns from a random row to the top (NaN in the sciimg as in ZTF, bits ``dead`` and
    ``nan``) and ~1e-4 of the pixels noisy (bit ``noisy``).
    """
    ny, nx = shape
    mask = np.zeros(shape, np.int16)
    light = np.zeros(shape, np.float32)
    # satellite track through a random point at a random angle
    x0, y0, theta = rng.uniform(0, nx), rng.uniform(0, ny), rng.uniform(0, np.pi)
    amp, width = rng.uniform(100.0, 400.0), rng.uniform(1.0, 1.8)
    xx, yy = np.arange(nx, dtype=np.float32)[None, :], np.arange(ny, dtype=np.float32)[:, None]
    dist = np.abs((xx - np.float32(x0)) * np.float32(np.sin(theta)) - (yy - np.float32(y0)) * np.float32(np.cos(theta)))
    near = dist < 5.0 * width
    light[near] = amp * np.exp(-0.5 * (dist[near] / width) ** 2)
    mask[near] |= np.int16(1 << bits["tracks"])
    # dead columns
    nan = np.zeros(shape, bool)
    for col, row0 in zip(rng.integers(0, nx, 3), rng.integers(0, ny // 2, 3)):
        nan[row0:, col] = True
    mask[nan] |= np.int16((1 << bits["dead"]) | (1 << bits["nan"]))
    # noisy pixels
    noisy_sigma = np.zeros(shape, np.float32)
    n_noisy = max(1, int(1e-4 * nx * ny))
    flat = rng.choice(nx * ny, n_noisy, replace=False)
    noisy_sigma.flat[flat] = rng.uniform(20.0, 100.0, n_noisy)
    mask.flat[flat] |= np.int16(1 << bits["noisy"])
    return light, noisy_sigma, nan, mask


def _box_any(bad, x, y, size):
    """True where the ``size x size`` box around (round(x), round(y)) holds a ``bad`` pixel
    or is not entirely inside the image."""
    ny, nx = bad.shape
    h = size // 2
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    inside = (ix >= h) & (iy >= h) & (ix < nx - h) & (iy < ny - h)
    out = ~inside
    offs = np.arange(-h, h + 1)
    flat = (iy[inside, None, None] + offs[None, :, None]) * nx + (ix[inside, None, None] + offs[None, None, :])
    out[inside] = bad.ravel()[flat].any(axis=(1, 2))
    return out


@dataclass
class SimulatedQuadrant:
    """A simulated quadrant in memory; :meth:`write` writes the ZTF-named files."""

    data: np.ndarray  # (ny, nx) float32 ADU, NaN where dead
    mask: np.ndarray | None  # (ny, nx) int16 ZTF mskimg bits, None without mask
    header: object  # astropy Header of the sciimg
    mask_header: object  # astropy Header of the mskimg
    catalog: Table  # id, ra, dec, mag
    truth: Table  # see make_quadrant
    psf: VaryingPSF
    names: dict = dc_field(default_factory=dict)  # sciimg, mskimg, catalog, truth -> file name

    def write(self, out_dir, overwrite=True):
        """Write the files into ``out_dir`` (created); returns ``{kind: Path or None}``.

        Each file is written to a temporary name and renamed, so an interrupted run never
        leaves a truncated file under the final name.
        """
        from astropy.io import fits

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {k: (out / v if v else None) for k, v in self.names.items()}
        for p in paths.values():
            if p is not None and p.exists() and not overwrite:
                raise FileExistsError(f"{p}: exists (pass overwrite=True to replace it)")
        atomic_write(paths["sciimg"], lambda t: fits.PrimaryHDU(self.data, self.header).writeto(t))
        if self.mask is not None:
            atomic_write(paths["mskimg"], lambda t: fits.PrimaryHDU(self.mask, self.mask_header).writeto(t))
        atomic_write(paths["catalog"], lambda t: self.catalog.write(t, format="ascii.csv"))
        atomic_write(paths["truth"], lambda t: self.truth.write(t, format="ascii.ecsv"))
        for kind, p in paths.items():
            if p is not None:
                log.info("wrote %s %s", kind, p)
        return paths


@with_x64
def make_quadrant(
    *,
    seed=0,
    size=ZTF_QUADRANT_SHAPE,
    nstars=15000,
    mag_range=(12.0, 21.0),
    lf_slope=0.2,
    psf=None,
    sky=(150.0, 10.0),
    gain=ZTF_GAIN,
    read_noise=ZTF_READ_NOISE,
    zeropoint=ZTF_ZEROPOINT,
    saturation=ZTF_SATURATION,
    mask=True,
    noise="poisson",
    field=655,
    ccd=13,
    qid=3,
    filter="zr",
    date="2020-09-24T10:21:43.98",
    ra=None,
    dec=None,
    pixel_scale=ZTF_PIXEL_SCALE,
    astrometric_noise=0.0,
    integration="gl4",
    wing_limit=0.005,
    brighter_fatter=0.0,
    bf_ref_mag=17.0,
):
    """Simulate a ZTF-like science quadrant in memory (see :func:`simulate_quadrant`)."""
    from astropy.time import Time
    from astropy.wcs import WCS

    from .io.ztf import DEFAULT_BAD_BITS, MASK_BITS, bad_bits_value

    ny, nx = (int(v) for v in size)
    if ny < _CORE or nx < _CORE:
        raise ValueError(f"size must be at least {_CORE}x{_CORE} pixels, got {size}")
    if nstars < 0:
        raise ValueError(f"nstars must be >= 0, got {nstars}")
    if not mag_range[0] < mag_range[1]:
        raise ValueError(f"mag_range must be (bright, faint) with bright < faint, got {mag_range}")
    if noise not in ("poisson", "gaussian"):
        raise ValueError(f"noise must be 'poisson' or 'gaussian', got {noise!r}")
    _check_ids(field, filter, ccd, qid)
    if (ra is None) != (dec is None):
        raise ValueError("give both ra and dec, or neither (then the nominal quadrant centre is used)")
    if ra is None:
        ra, dec = nominal_center(ccd, qid)
    psf = VaryingPSF.default((ny, nx)) if psf is None else psf
    rng = np.random.default_rng(seed)

    # -- stars -------------------------------------------------------------------------
    mag = _draw_magnitudes(rng, nstars, mag_range, lf_slope)
    x = rng.uniform(-0.5, nx - 0.5, nstars)
    y = rng.uniform(-0.5, ny - 0.5, nstars)
    flux = mag_to_flux(mag, zeropoint)
    bf = _bf_factor(flux, brighter_fatter, bf_ref_mag, zeropoint)
    stars, peak, render_size = render_stars((ny, nx), x, y, flux, psf, integration=integration, wing_limit=wing_limit,
                                            fwhm_scale=bf if brighter_fatter else None)
    sky_at = _sky_plane((ny, nx), sky)
    background = sky_at(np.arange(nx, dtype=np.float32)[None, :], np.arange(ny, dtype=np.float32)[:, None])

    # -- defects, noise, saturation ----------------------------------------------------
    bits = np.zeros((ny, nx), np.int16)
    nan = None
    light = stars + background
    if mask:
        track, noisy_sigma, nan, bits = _defects(rng, (ny, nx), MASK_BITS)
        light += track
    if noise == "poisson":
        data = rng.poisson(np.clip(light, 0.0, None) * gain).astype(np.float32)
        data += rng.standard_normal((ny, nx), dtype=np.float32) * np.float32(read_noise)
        data /= np.float32(gain)
    else:  # the Gaussian limit of the same variance: faster, indistinguishable at ZTF sky levels
        sigma = np.sqrt(np.clip(light, 0.0, None) / gain + (read_noise / gain) ** 2).astype(np.float32)
        data = light.astype(np.float32) + rng.standard_normal((ny, nx), dtype=np.float32) * sigma
    if mask:
        data += rng.standard_normal((ny, nx), dtype=np.float32) * noisy_sigma
    sat_pix = data >= saturation
    data[sat_pix] = np.float32(saturation)
    if mask:
        sigma_sky = np.sqrt(sky_at((nx - 1) / 2.0, (ny - 1) / 2.0) / gain + (read_noise / gain) ** 2)
        bits[sat_pix] |= np.int16(1 << MASK_BITS["saturated"])
        bits[stars > 1.5 * sigma_sky] |= np.int16(1 << MASK_BITS["sexsources"])
        bits[stars > 5.0 * sigma_sky] |= np.int16(1 << MASK_BITS["psfsources"])
        data[nan] = np.nan

    # -- truth and catalogue -----------------------------------------------------------
    header = _tan_wcs(ra, dec, (ny, nx), pixel_scale)
    wcs = WCS(header)
    ra_s, dec_s = wcs.all_pix2world(x, y, 0)
    ids = np.arange(1, nstars + 1)
    fwhm, alpha, e1, e2 = psf.shape(x, y)
    fwhm = fwhm * bf
    star_bg = sky_at(x, y)
    saturated = peak + star_bg >= saturation
    bad = (bits & bad_bits_value(DEFAULT_BAD_BITS)) != 0 if mask else sat_pix
    clean = ~saturated & ~_box_any(bad, x, y, _CORE)
    truth = Table(
        [ids, ra_s, dec_s, mag, x, y, flux, fwhm, alpha, e1, e2, star_bg, peak, render_size, saturated, clean],
        names=("id", "ra", "dec", "mag", "x", "y", "flux", "fwhm", "alpha", "e1", "e2", "background", "peak", "render_size", "saturated", "clean"),
    )
    cat_ra, cat_dec = ra_s, dec_s
    if astrometric_noise > 0:
        d = rng.normal(0.0, astrometric_noise / 3600.0, (2, nstars))
        cat_ra = ra_s + d[0] / np.cos(np.radians(dec_s))
        cat_dec = dec_s + d[1]
    catalog = Table([ids, cat_ra, cat_dec, mag], names=("id", "ra", "dec", "mag"))

    # -- headers -----------------------------------------------------------------------
    t = Time(date, scale="utc")
    ids_h = {
        "FILTER": (f"ZTF_{filter[1]}", "filter"),
        "FILTERID": (_FILTER_ID[filter], "1 zg, 2 zr, 3 zi"),
        "CCDID": (int(ccd), "CCD 1-16"),
        "QID": (int(qid), "quadrant 1-4"),
        "RCID": (4 * (int(ccd) - 1) + int(qid) - 1, "readout channel 0-63"),
        "FIELDID": (int(field), "ZTF field"),
        "OBSMJD": (float(t.mjd), "start of exposure [MJD, UTC]"),
        "DATE-OBS": (t.isot, "start of exposure [UTC]"),
        "MJD-OBS": (float(t.mjd), "start of exposure [MJD, UTC]"),
    }
    seeing = psf.median_fwhm((ny, nx)) * pixel_scale
    meta = {
        "BUNIT": ("DN", "data units (ADU)"),
        "ORIGIN": ("ztfpsf simulate", "simulated image: truth in the _truth.ecsv"),
        "EXPTIME": (ZTF_EXPTIME, "[s]"),
        **ids_h,
        "GAIN": (float(gain), "[e-/ADU]"),
        "READNOI": (float(read_noise), "read noise [e-]"),
        "SATURATE": (float(saturation), "saturation level [ADU]"),
        "MAGZP": (float(zeropoint), "zero point: mag = MAGZP - 2.5 log10(flux [ADU])"),
        "SEEING": (round(seeing, 4), "median PSF FWHM [arcsec]"),
        "PIXSCALE": (float(pixel_scale), "[arcsec/px]"),
        "SIMSEED": (int(seed), "ztfpsf simulate seed"),
        "SIMNSTAR": (int(nstars), "stars rendered"),
    }
    for k, v in meta.items():
        header[k] = v
    psf.to_header(header)
    mask_header = _tan_wcs(ra, dec, (ny, nx), pixel_scale)
    mask_header["ORIGIN"] = "ztfpsf simulate"
    for k, v in ids_h.items():
        mask_header[k] = v
    for name in ("tracks", "sexsources", "noisy", "saturated", "dead", "nan", "psfsources"):
        mask_header[f"BIT{MASK_BITS[name]:02d}"] = (name, "ZTF mskimg bit used by the simulation")

    if brighter_fatter:
        truth.meta.update(brighter_fatter=float(brighter_fatter), bf_ref_mag=float(bf_ref_mag))
    truth.meta.update(
        seed=int(seed), size=[ny, nx], nstars=int(nstars), mag_range=[float(m) for m in mag_range], lf_slope=float(lf_slope),
        sky=[float(v) for v in np.atleast_1d(sky)], gain=float(gain), read_noise=float(read_noise), zeropoint=float(zeropoint),
        saturation=float(saturation), noise=noise, mask=bool(mask), astrometric_noise=float(astrometric_noise),
        integration=integration, pixel_scale=float(pixel_scale), ra=float(ra), dec=float(dec),
        field=int(field), ccd=int(ccd), qid=int(qid), filter=filter, date=t.isot, psf=psf.to_dict(),
        description="truth of ztfpsf simulate: x, y 0-based pixels; flux [ADU] = 10**(-0.4 (mag - zeropoint)); "
        "fwhm, alpha, e1, e2 the PSF at the star; background the sky there [ADU]; peak the star's own "
        "brightest pixel [ADU, no sky]; saturated: peak + background >= saturation; clean: not saturated and "
        "its 17x17 box is inside the image without bad-mask or saturated pixels (neighbours not considered)",
    )
    sci = quadrant_filename(t, field, filter, ccd, qid, "sciimg")
    stem = sci[: -len("_sciimg.fits")]
    names = {"sciimg": sci, "mskimg": f"{stem}_mskimg.fits" if mask else None, "catalog": f"{stem}_catalog.csv", "truth": f"{stem}_truth.ecsv"}
    return SimulatedQuadrant(data, bits if mask else None, header, mask_header, catalog, truth, psf, names)


def simulate_quadrant(out_dir, **kwargs):
    """Simulate a ZTF-like science quadrant with known truth and write it to ``out_dir``.

    Returns ``{"sciimg", "mskimg", "catalog", "truth"}`` -> ``Path`` (``mskimg`` is
    ``None`` with ``mask=False``). Deterministic: one ``numpy.random.Generator`` seeded
    with ``seed`` draws everything, so a seed gives the same files byte for byte.

    Files (``field, ccd, qid, filter, date`` make the ZTF name):
    ``ztf_<filefracday>_<field:06d>_<filter>_c<ccd:02d>_o_q<qid>_sciimg.fits`` (float32
    ADU, ``BUNIT = 'DN'``, TAN WCS with a CD matrix at ``pixel_scale`` "/px, north up and
    east left, ZTF keywords GAIN, READNOI, SATURATE, MAGZP, SEEING, EXPTIME, FILTER,
    FILTERID, CCDID, QID, RCID, FIELDID, OBSMJD, DATE-OBS and the truth PSF's
    coefficients, see :meth:`VaryingPSF.to_header`), the matching ``_mskimg.fits`` (int16
    ZTF bits), ``<stem>_catalog.csv`` (``id, ra, dec, mag``: every rendered star, faint
    ones included, like a Gaia query of the footprint) and ``<stem>_truth.ecsv`` (one row
    per star: ``id, ra, dec, mag, x, y, flux, fwhm, alpha, e1, e2, background, peak,
    render_size, saturated, clean``; the options and the PSF in its meta).

    Parameters
    ----------
    seed : int
    size : (ny, nx)
        Image shape, numpy order; ZTF quadrants are (3080, 3072), i.e. NAXIS1 = 3072.
    nstars : int
        Stars rendered, centres uniform over the image. 15000 with the default
        magnitudes is a ZTF quadrant at intermediate latitude (the ZTF study's quadrant
        had 15174 Gaia stars).
    mag_range, lf_slope
        Magnitudes drawn with cumulative counts ``N(< m) ~ 10**(lf_slope m)``. The
        default 0.2 reproduces the study's 23 % of isolated stars within 14-18 mag.
    psf : VaryingPSF
        Default :meth:`VaryingPSF.default` over the image; :meth:`VaryingPSF.constant`
        for a constant PSF. Pixel-integrated with ``integration`` (Gauss-Legendre,
        default ``gl4``: 1e-6 of the peak), each star on its own stamp whose size
        (17-129 px) grows with brightness until its edge is below ``wing_limit`` ADU.
    sky : float or (level, gradient)
        ADU: ``level`` at the centre plus a plane rising by ``gradient`` across x and
        ``gradient / 2`` across y.
    brighter_fatter, bf_ref_mag : float
        Slope of an injected brighter-fatter law (the module docstring; default 0: off)
        and its reference magnitude; the truth's ``fwhm`` includes it.
    gain, read_noise, zeropoint, saturation
        e-/ADU, e-, mag (MAGZP), ADU (SATURATE). Pixels at or above ``saturation``
        after the noise are set to it (and flagged in the mask); there is no blooming.
    mask : bool
        Add detector defects and write the ``mskimg``: a satellite track (bit
        ``tracks``), 3 dead columns (bits ``dead`` and ``nan``; NaN in the sciimg, as
        ZTF writes unusable pixels), 1e-4 of the pixels noisy (``noisy``), saturated
        pixels (``saturated``) and the source bits ``sexsources`` / ``psfsources`` where a
        star's light exceeds 1.5 / 5 sky sigma (not bad by default). ``False``: no
        defects, no mskimg.
    noise : "poisson" or "gaussian"
        Poisson counts in electrons plus Gaussian read noise, or the Gaussian limit of
        the same variance (about 2x faster; indistinguishable at ZTF sky levels).
    field, ccd, qid, filter, date
        ZTF identifiers for the file name and headers.
    ra, dec : float
        Sky position [deg] of the image centre; default :func:`nominal_center` of
        (ccd, qid), so that the 64 quadrants of an exposure do not overlap.
    astrometric_noise : float
        Gaussian error [arcsec per axis] added to the catalogue positions (the truth
        keeps the exact ones). Default 0: Gaia's errors at these magnitudes are below
        1 mas = 0.001 px.
    """
    return make_quadrant(**kwargs).write(out_dir)
