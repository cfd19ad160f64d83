"""SExtractor + PSFEx as a peer PSF for the real-quadrant benchmark (``bench_real_psf.py``).

Runs the Debian ``source-extractor`` (2.25) and ``psfex`` (3.21) binaries, reads the
``.psf`` file and renders the model at sub-pixel positions the way PSFEx itself maps it
onto a star's vignet (``psf_makeresi`` in PSFEx's ``psf.c``, ``vignet_resample`` in
``vignet.c``). Conventions, from PSFEx 3.21's source:

* The ``.psf`` file's ``PSF_FIELDS`` table holds ``PSF_DATA`` (1, ncoeff, ny, nx):
  ``ncoeff`` component images of ``PSFAXIS1 x PSFAXIS2`` PSF pixels spaced ``PSF_SAMP``
  image pixels apart (< 1 when PSFEx oversamples an undersampled image).
* The local PSF is ``sum_k c_k(x, y) PSF_DATA[k]`` with ``c_k`` the monomials
  ``xn^i yn^j`` of total degree <= ``POLDEG1``, ``xn`` varying fastest (1, x, x^2, y, xy,
  y^2 for degree 2: ``poly_func``), ``xn = (X_IMAGE - POLZERO1) / POLSCAL1``, ``yn`` likewise,
  X_IMAGE/Y_IMAGE **1-based** (SExtractor), so ``X_IMAGE = x + 1`` for our 0-based x.
* The PSF's centre is its pixel ``(PSFAXIS1 // 2, PSFAXIS2 // 2)``. Image pixel ``j`` of a
  stamp whose centre pixel ``c = n // 2`` is the pixel nearest the star, ``dx = x - round(x)``,
  samples the PSF grid at ``u = PSFAXIS1 // 2 + (j - c - dx) / PSF_SAMP``
  (``vignet_resample(psf->loc, ..., -dx/PSF_SAMP, -dy/PSF_SAMP, 1/PSF_SAMP, 1.0)``).
* Interpolation: separable Lanczos-3, ``sinc(t) sinc(t/3)`` in PSF-pixel units, the taps
  of each output pixel renormalised to sum 1 (``INTERPF``, ``stepi = 1``: no extra low-pass);
  output pixels that map outside the PSF grid are 0.
* Normalisation: PSFEx scales the model by each star's ``PHOTFLUX_KEY`` flux; we divide
  the local PSF by its own integral ``PSF_SAMP**2 * sum(PSF)`` (the total flux of the
  model, which PSFEx clips to the disc of radius ``PSFAXIS/2`` PSF pixels), so a rendered
  stamp sums to the model's enclosed flux, as ztfpsf's stamps do.

The PSF is a sampling of the pixel-convolved ("effective") PSF: it is compared with the
data at pixel centres, with no further pixel integration.

Checked by :func:`verify_rendering` (``bench_real_psf.py --check-psfex``) against PSFEx's
own model of each accepted sample (its SAMPLES - RESIDUALS check cubes) on the real
quadrant: every one of the 515 samples agrees to < 5e-5 relative rms (median 2e-6, i.e.
float32 rounding) once PSFEx's internal re-centring (median 0.08 px) is fitted.
"""

import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

log = logging.getLogger(__name__)

SEX_NAMES = ("source-extractor", "sex")
PSFEX_NAMES = ("psfex",)
SEX_SHARE = Path("/usr/share/source-extractor")
#: Aperture diameters [px] of FLUX_APER (ZTF's APCOR1-6 apertures).
APERTURES = (2.0, 3.0, 4.0, 6.0, 10.0, 14.0)
SEX_PARAMS = (
    "NUMBER", "X_IMAGE", "Y_IMAGE", "XWIN_IMAGE", "YWIN_IMAGE", f"FLUX_APER({len(APERTURES)})",
    f"FLUXERR_APER({len(APERTURES)})", "FLUX_AUTO", "FLUX_RADIUS", "FWHM_IMAGE", "ELONGATION", "FLAGS",
    "IMAFLAGS_ISO", "SNR_WIN", "BACKGROUND", "VIGNET({0},{0})",
)  # fmt: skip
ASSOC_PARAMS = ("VECTOR_ASSOC(1)", "NUMBER_ASSOC")


def find_tools():
    """Paths ``(source-extractor, psfex)``, or None for each one missing."""
    find = lambda names: next((p for p in map(shutil.which, names) if p), None)
    return find(SEX_NAMES), find(PSFEX_NAMES)


def _version(binary):
    out = subprocess.run([binary, "-v"], capture_output=True, text=True)
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "?"


def _run(cmd, cwd, what):
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (Path(cwd) / f"{what}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {(done.stdout + done.stderr)[-800:]}")
    return seconds, done.stdout + done.stderr


def run_sextractor(binary, image, weight, flag, workdir, x, y, *, gain, saturation, zeropoint, vignet=35,
                   threads=0, match_radius=1.5):  # fmt: skip
    """SExtractor on ``image`` (weight map: 0 for bad pixels; flag map: the ZTF mskimg),
    keeping only the detections within ``match_radius`` px of the 0-based positions
    ``(x, y)`` (SExtractor's ASSOC, fed 1-based positions; ``VECTOR_ASSOC`` holds the index
    into ``x``). Rewriting an LDAC file with astropy makes PSFEx 3.21 crash, so the catalogue
    is filtered by SExtractor itself.

    Returns ``(ldac_path, seconds)``; the catalogue is FITS_LDAC with ``SEX_PARAMS``.
    """
    workdir = Path(workdir)
    (workdir / "sex.param").write_text("\n".join(p.format(vignet) for p in SEX_PARAMS + ASSOC_PARAMS) + "\n")
    assoc = workdir / "fit_stars.txt"
    np.savetxt(assoc, np.column_stack([np.asarray(x) + 1.0, np.asarray(y) + 1.0, np.arange(len(x))]), fmt="%.4f %.4f %d")
    cat = workdir / "sex.ldac"
    cfg = {
        "CATALOG_NAME": cat, "CATALOG_TYPE": "FITS_LDAC", "PARAMETERS_NAME": workdir / "sex.param",
        "DETECT_TYPE": "CCD", "DETECT_MINAREA": 5, "DETECT_THRESH": 3.0, "ANALYSIS_THRESH": 3.0,
        "FILTER": "Y", "FILTER_NAME": SEX_SHARE / "gauss_2.0_3x3.conv", "DEBLEND_NTHRESH": 32,
        "DEBLEND_MINCONT": 0.005, "CLEAN": "Y", "MASK_TYPE": "CORRECT",
        "WEIGHT_TYPE": "MAP_WEIGHT", "WEIGHT_IMAGE": weight, "WEIGHT_GAIN": "N",
        "FLAG_IMAGE": flag, "FLAG_TYPE": "OR",
        "PHOT_APERTURES": ",".join(f"{a:g}" for a in APERTURES), "PHOT_FLUXFRAC": 0.5,
        "SATUR_LEVEL": saturation, "MAG_ZEROPOINT": zeropoint, "GAIN": gain, "PIXEL_SCALE": 0,
        "SEEING_FWHM": 2.0, "STARNNW_NAME": SEX_SHARE / "default.nnw",
        "BACK_TYPE": "AUTO", "BACK_SIZE": 64, "BACK_FILTERSIZE": 3, "BACKPHOTO_TYPE": "LOCAL",
        "BACKPHOTO_THICK": 24, "CHECKIMAGE_TYPE": "NONE", "VERBOSE_TYPE": "NORMAL", "NTHREADS": threads,
        "MEMORY_BUFSIZE": 4096, "ASSOC_NAME": assoc, "ASSOC_PARAMS": "1,2", "ASSOC_DATA": 3,
        "ASSOC_RADIUS": match_radius, "ASSOC_TYPE": "NEAREST", "ASSOCSELEC_TYPE": "MATCHED",
    }  # fmt: skip
    cmd = [binary, str(image), "-c", "/dev/null"]
    for key, value in cfg.items():
        cmd += [f"-{key}", str(value)]
    seconds, _ = _run(cmd, workdir, "sextractor")
    return cat, seconds


def read_ldac(path):
    """The LDAC_OBJECTS table of a SExtractor FITS_LDAC catalogue."""
    with fits.open(path) as hdul:
        return Table(hdul["LDAC_OBJECTS"].data)


def run_psfex(binary, ldac, workdir, *, degree=2, sampling=0.0, psf_size=25, basis="PIXEL_AUTO",
              fwhm_range=(0.5, 10.0), min_snr=20.0, max_ellip=0.3, threads=0, check_images=False):  # fmt: skip
    """PSFEx on an LDAC catalogue; returns ``(psf_path, seconds, summary)``.

    ``summary``: ``accepted``, ``loaded``, ``sampling``, ``chi2``, ``fwhm`` (Moffat fit of
    the model), ``ellipticity``, ``residuals``, ``asymmetry`` from PSFEx's report line.
    ``check_images``: also write the SAMPLES and RESIDUALS cubes (``samp_*.fits``,
    ``resi_*.fits``) for :func:`verify_rendering`.
    """
    workdir = Path(workdir)
    cfg = {
        "BASIS_TYPE": basis, "BASIS_NUMBER": 20, "PSF_SAMPLING": sampling, "PSF_ACCURACY": 0.01,
        "PSF_SIZE": f"{psf_size},{psf_size}", "PSF_RECENTER": "Y", "PHOTFLUX_KEY": "FLUX_APER(5)",
        "PHOTFLUXERR_KEY": "FLUXERR_APER(5)", "CENTER_KEYS": "X_IMAGE,Y_IMAGE",
        "PSFVAR_KEYS": "X_IMAGE,Y_IMAGE", "PSFVAR_GROUPS": "1,1", "PSFVAR_DEGREES": degree,
        "SAMPLE_AUTOSELECT": "Y", "SAMPLEVAR_TYPE": "SEEING",
        "SAMPLE_FWHMRANGE": f"{fwhm_range[0]},{fwhm_range[1]}", "SAMPLE_VARIABILITY": 0.3,
        "SAMPLE_MINSN": min_snr, "SAMPLE_MAXELLIP": max_ellip, "SAMPLE_FLAGMASK": "0x00fe",
        "CHECKPLOT_TYPE": "NONE", "CHECKIMAGE_TYPE": "SAMPLES,RESIDUALS" if check_images else "NONE",
        "CHECKIMAGE_NAME": "samp.fits,resi.fits", "CHECKIMAGE_CUBE": "Y", "WRITE_XML": "N",
        "PSF_DIR": workdir, "VERBOSE_TYPE": "NORMAL", "NTHREADS": threads,
    }  # fmt: skip
    cmd = [binary, str(ldac), "-c", "/dev/null"]
    for key, value in cfg.items():
        cmd += [f"-{key}", str(value)]
    seconds, text = _run(cmd, workdir, "psfex")
    psf_path = workdir / (Path(ldac).stem + ".psf")
    if not psf_path.exists():
        raise RuntimeError(f"psfex wrote no {psf_path.name}: {text[-800:]}")
    # report line: name  accepted/loaded  sampling  chi2/dof  FWHM  ellip.  resi.  asym.
    m = re.search(r"(\d+)/(\d+)\s+" + r"\s+".join([r"([-\d.]+)"] * 6), text)
    names = ("sampling", "chi2", "fwhm", "ellipticity", "residuals", "asymmetry")
    summary = {"accepted": int(m.group(1)), "loaded": int(m.group(2)), **dict(zip(names, map(float, m.groups()[2:])))} if m else {}
    return psf_path, seconds, summary


def lanczos3(t):
    """PSFEx's Lanczos-3 kernel ``sinc(t) sinc(t/3)``, 0 for |t| >= 3."""
    t = np.asarray(t, dtype=np.float64)
    return np.where(np.abs(t) < 3.0, np.sinc(t) * np.sinc(t / 3.0), 0.0)


def _resample_weights(u, n_psf):
    """(N, n_out, n_psf) interpolation weights: Lanczos-3 taps at PSF-grid positions ``u``
    (N, n_out), each row renormalised; rows outside the grid are 0 (as in PSFEx)."""
    k = np.arange(n_psf)
    w = lanczos3(k[None, None, :] - u[..., None])
    norm = w.sum(axis=-1, keepdims=True)
    inside = (u >= 0.0) & (u <= n_psf - 1)
    return np.where(inside[..., None] & (norm > 0), w / np.where(norm > 0, norm, 1.0), 0.0)


class PSFExPSF:
    """A PSFEx ``.psf`` model; :meth:`render` gives unit-flux stamps in 0-based image pixels."""

    def __init__(self, path):
        self.path = Path(path)
        with fits.open(self.path) as hdul:
            hdu = hdul["PSF_DATA"] if "PSF_DATA" in hdul else hdul[1]
            h = hdu.header
            self.comps = np.asarray(hdu.data["PSF_MASK"][0], dtype=np.float64)  # (ncoeff, ny, nx)
            self.header = h
        self.step = float(h["PSF_SAMP"])
        n_axis = int(h.get("POLNAXIS", 0))
        if n_axis not in (0, 2) or int(h.get("POLNGRP", 1)) > 1:
            raise ValueError(f"{self.path}: only X_IMAGE,Y_IMAGE in one polynomial group are supported")
        self.degree = int(h.get("POLDEG1", 0)) if n_axis else 0
        self.zero = (float(h.get("POLZERO1", 0.0)), float(h.get("POLZERO2", 0.0)))
        self.scale = (float(h.get("POLSCAL1", 1.0)), float(h.get("POLSCAL2", 1.0)))
        self.terms = [(i, j) for j in range(self.degree + 1) for i in range(self.degree + 1 - j)]
        if len(self.terms) != self.comps.shape[0]:
            raise ValueError(f"{self.path}: {self.comps.shape[0]} components for {len(self.terms)} polynomial terms")
        self.fwhm = float(h.get("PSF_FWHM", np.nan))
        self.accepted, self.loaded, self.chi2 = h.get("ACCEPTED"), h.get("LOADED"), h.get("CHI2")

    @property
    def extent(self):
        """Width of the PSF grid in image pixels."""
        return self.comps.shape[-1] * self.step

    def local(self, x, y):
        """(N, ny, nx) local PSF grids at 0-based image positions, normalised to unit integral."""
        xn = (np.asarray(x, np.float64) + 1.0 - self.zero[0]) / self.scale[0]
        yn = (np.asarray(y, np.float64) + 1.0 - self.zero[1]) / self.scale[1]
        basis = np.stack([xn**i * yn**j for i, j in self.terms], axis=-1)  # (N, ncoeff)
        loc = np.einsum("nk,kij->nij", basis, self.comps)
        return loc / (loc.sum(axis=(1, 2), keepdims=True) * self.step**2)

    def render(self, x, y, shape=(17, 17)):
        """Unit-flux stamps ``(N, ny, nx)`` of stars at 0-based ``(x, y)`` and their origins.

        The stamp's centre pixel ``[ny // 2, nx // 2]`` is the pixel nearest the star
        (``floor(x + 0.5)``); returns ``(stamps, (x0, y0))`` with ``(x0, y0)`` the image
        coordinates of pixel [0, 0].
        """
        ny, nx = shape
        x = np.atleast_1d(np.asarray(x, np.float64))
        y = np.atleast_1d(np.asarray(y, np.float64))
        ix, iy = np.floor(x + 0.5), np.floor(y + 0.5)
        loc = self.local(x, y)
        py, px = loc.shape[1:]
        u = px // 2 + (np.arange(nx)[None, :] - nx // 2 - (x - ix)[:, None]) / self.step
        v = py // 2 + (np.arange(ny)[None, :] - ny // 2 - (y - iy)[:, None]) / self.step
        wx, wy = _resample_weights(u, px), _resample_weights(v, py)
        stamps = wy @ loc @ np.swapaxes(wx, 1, 2)
        return stamps, (ix - nx // 2, iy - ny // 2)


def verify_rendering(psf_path, ldac, samples, residuals, n_max=None):
    """Check :meth:`PSFExPSF.render` against PSFEx's own model of its samples.

    PSFEx's RESIDUALS cube holds ``vignet - norm * model`` on every pixel of positive
    weight of each accepted sample, so ``SAMPLES - RESIDUALS`` is PSFEx's model there. Each
    sample is matched to its catalogue row (identical vignet; PSFEx zeroes the bad pixels),
    rendered with :class:`PSFExPSF` at the catalogue's ``X_IMAGE - 1, Y_IMAGE - 1`` on the
    vignet's pixels (centre pixel ``int(X_IMAGE + 0.49999)``, 1-based, as PSFEx), and fitted
    with a free scale and sub-pixel shift (PSFEx recentres its samples itself). Returns the
    median and worst relative rms mismatch and the median |shift| [px].
    """
    from scipy.optimize import least_squares

    model = PSFExPSF(psf_path)
    cat = read_ldac(ldac)
    vigs = np.asarray(cat["VIGNET"], np.float32)
    rows = {np.where(v <= -1e29, 0, v).tobytes(): i for i, v in enumerate(vigs)}
    samp, resi = fits.getdata(samples), fits.getdata(residuals)
    n = samp.shape[-1]
    mismatch, shifts = [], []
    for s, r in zip(samp[:n_max], resi[:n_max]):
        i = rows.get(np.asarray(s, np.float32).tobytes())
        if i is None:
            continue
        X, Y = float(cat["X_IMAGE"][i]), float(cat["Y_IMAGE"][i])
        x0, y0 = int(X + 0.49999) - 1 - n // 2, int(Y + 0.49999) - 1 - n // 2  # 0-based vignet origin
        good = vigs[i] > -1e29
        target = (s - r)[good]

        def resid(p):
            img, (ox, oy) = model.render([X - 1.0 + p[0]], [Y - 1.0 + p[1]], (n + 4, n + 4))
            jx, jy = int(x0 - ox[0]), int(y0 - oy[0])
            img = img[0, jy : jy + n, jx : jx + n][good]
            return target - img * (img @ target) / (img @ img)

        fit = least_squares(resid, [0.0, 0.0], diff_step=1e-4, bounds=([-1.5, -1.5], [1.5, 1.5]))
        mismatch.append(np.sqrt(np.mean(fit.fun**2) / np.mean(target**2)))
        shifts.append(np.hypot(*fit.x))
    if not mismatch:
        raise RuntimeError(f"{samples}: no sample matched a catalogue vignet")
    return {"n_samples": len(mismatch), "median_rel_rms": float(np.median(mismatch)), "max_rel_rms": float(np.max(mismatch)),
            "n_above_1e-4": int(np.sum(np.asarray(mismatch) > 1e-4)), "median_shift_px": float(np.median(shifts))}  # fmt: skip


def tool_versions(sex, psfex):
    return {"source-extractor": _version(sex) if sex else None, "psfex": _version(psfex) if psfex else None}
