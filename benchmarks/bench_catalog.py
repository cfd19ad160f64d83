"""The full-quadrant PSF-fit catalogue against photutils' PSFPhotometry with a SourceGrouper.

    python benchmarks/bench_catalog.py [--psf QUADRANT.psf.fits] [--photutils-max 1500]

On the study's real ZTF quadrant (:func:`ztfpsf.datasets.ztf_quadrant`, 3072 x 3080): sep's
detections measured with the quadrant's PSF file (fitted once with ``ztfpsf fit --psf shared
--psf-model hybrid`` into ``benchmarks/results/catalog_psf/`` when no ``--psf`` is given) by
:func:`ztfpsf.catalog.psf_catalog` (first call: compilation; then the best of ``--repeat``),
and by photutils ``PSFPhotometry`` with a ``SourceGrouper`` of the same linking length and an
``ImagePSF`` made from the same PSF (rendered at 4 x 4 sub-pixel phases: the pixel-integrated
PSF oversampled 4 x), fit box of the same size as our fit disc, on the background-subtracted
image with the same noise. photutils on the whole quadrant takes many minutes, so by default
it measures the sources of a central square holding about ``--photutils-max`` of them, and
ours is timed on the same sources too: the ratio is per source on the same subset and also
against our full-quadrant time. Prints the machine and writes ``benchmarks/results/catalog.json``.
"""

import argparse
import json
import logging
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
log = logging.getLogger("bench_catalog")


def machine():
    """CPU model, cores and JAX devices of this machine."""
    import jax

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    devices = jax.devices()
    return f"{model}, {cores} cores usable, JAX {devices[0].platform} x{len(devices)}, Python {platform.python_version()}"


def quadrant_psf(image, psf_path):
    """The quadrant's PSF file: given, or fitted once (hybrid, shared) and kept."""
    from ztfpsf.config import FitConfig
    from ztfpsf.pipeline import process_image

    if psf_path:
        return Path(psf_path)
    out = HERE / "results" / "catalog_psf"
    path = out / (Path(image).name.replace(".fits", "") + ".psf.fits")
    if not path.exists():
        log.info("fitting the quadrant's PSF (once) into %s", out)
        process_image(image, FitConfig(psf="shared", psf_model="hybrid", overwrite=True), out)
    return path


def oversampled_psf(psf, x, y, oversampling=4, size=25):
    """photutils ``ImagePSF`` data: our pixel-integrated PSF at ``(x, y)`` rendered at
    ``oversampling**2`` sub-pixel phases and interleaved (unit flux within FLUXRAD, like ours)."""
    o = oversampling
    phases = np.arange(o) / o - (o - 1) / (2 * o)
    out = np.zeros((size * o, size * o))
    c = size // 2
    for i, py in enumerate(phases):
        for j, px in enumerate(phases):
            stamp = psf.render(np.array([x + px]), np.array([y + py]), np.array([[np.floor(x + 0.5) - c, np.floor(y + 0.5) - c]]),
                               (size, size))[0]
            # the value at a pixel offset d from the star is P(d); the star offset by +p
            # samples P(k - p): the oversampled grid point k - p
            out[(o - 1 - i)::o, (o - 1 - j)::o] = stamp
    return out


def run_photutils(exp, background, psf, det, link, fit_radius, oversampling=4):
    """photutils PSFPhotometry with a SourceGrouper on the given detections."""
    from astropy.table import Table
    from photutils.psf import ImagePSF, PSFPhotometry, SourceGrouper

    xmin, xmax, ymin, ymax = psf.bounds
    data = oversampled_psf(psf, float(np.floor(0.5 * (xmin + xmax))), float(np.floor(0.5 * (ymin + ymax))), oversampling)
    model = ImagePSF(data, oversampling=oversampling)
    sub = np.where(exp.mask | exp.saturated, 0.0, exp.data - background.level)
    err = np.sqrt(background.rms**2 + np.maximum(sub, 0) / (exp.gain or 1.0))
    size = 2 * int(np.ceil(fit_radius)) + 1
    phot = PSFPhotometry(model, (size, size), grouper=SourceGrouper(min_separation=link), aperture_radius=fit_radius)
    init = Table({"x": det["x"], "y": det["y"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        result = phot(sub, error=err, mask=exp.mask | exp.saturated, init_params=init)
        return time.perf_counter() - t, result


def main():
    import ztfpsf

    ztfpsf.configure()
    from ztfpsf.catalog import CatalogOptions, effective_fwhm, psf_catalog
    from ztfpsf.datasets import ztf_quadrant
    from ztfpsf.detect import detect_stars, estimate_background
    from ztfpsf.io.fits import read_exposure
    from ztfpsf.psf import PSFModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--psf", help="PSF file of the quadrant (default: fitted once, kept in benchmarks/results)")
    ap.add_argument("--photutils-max", type=int, default=1500, help="sources photutils measures (a central square)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "catalog.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jax").setLevel(logging.WARNING)

    image = ztf_quadrant()[0]
    psf = PSFModel.read(quadrant_psf(image, args.psf))
    exp = read_exposure(image)
    where = machine()
    print(f"machine: {where}")
    t = time.perf_counter()
    bkg = estimate_background(exp)
    fwhm = effective_fwhm(psf)
    det = detect_stars(exp, background=bkg, fwhm=fwhm)
    t_detect = time.perf_counter() - t
    opt = CatalogOptions()
    t = time.perf_counter()
    table, _ = psf_catalog(exp, psf, det, background=bkg, options=opt)
    t_first = time.perf_counter() - t
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        table, _ = psf_catalog(exp, psf, det, background=bkg, options=opt)
        times.append(time.perf_counter() - t)
    t_ours = min(times)
    n = len(table)
    print(f"quadrant {exp.shape[1]}x{exp.shape[0]}: {n} detections (sep + background {t_detect:.2f} s), "
          f"{table.meta['n_groups']} groups, PSF {'hybrid' if psf.residual is not None else 'analytic'} fwhm {fwhm:.2f} px")
    print(f"ztfpsf catalog: first call {t_first:.1f} s (compilation included), then {t_ours:.2f} s "
          f"(best of {args.repeat}: {', '.join(f'{v:.2f}' for v in times)}); {n / t_ours:,.0f} sources/s")

    # photutils on a central square of about --photutils-max sources, ours on the same
    x, y = np.asarray(det["x"]), np.asarray(det["y"])
    cx, cy = exp.shape[1] / 2, exp.shape[0] / 2
    half = np.sort(np.maximum(np.abs(x - cx), np.abs(y - cy)))[min(args.photutils_max, n) - 1]
    sub = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    link, radius = opt.link * fwhm, opt.fit_radius * fwhm
    t_phot, phot = run_photutils(exp, bkg, psf, det[sub], link, radius)
    psf_catalog(exp, psf, det[sub], background=bkg, options=opt)
    t = time.perf_counter()
    psf_catalog(exp, psf, det[sub], background=bkg, options=opt)
    t_sub = time.perf_counter() - t
    n_sub = int(sub.sum())
    rate_phot, rate_sub, rate_full = n_sub / t_phot, n_sub / t_sub, n / t_ours
    print(f"photutils PSFPhotometry + SourceGrouper ({link:.1f} px), ImagePSF 4x oversampled, fit box "
          f"{2 * int(np.ceil(radius)) + 1} px: {n_sub} sources of a central {2 * half:.0f} px square in {t_phot:.1f} s "
          f"({rate_phot:,.0f} sources/s)")
    print(f"ztfpsf on the same {n_sub} sources: {t_sub:.2f} s ({rate_sub:,.0f} sources/s): {t_phot / t_sub:.0f}x photutils; "
          f"full quadrant per source: {rate_full / rate_phot:.0f}x")
    ok = np.isfinite(np.asarray(phot["flux_fit"]))
    print(f"photutils measured {ok.sum()} of {n_sub}")
    result = dict(machine=where, n_sources=n, n_groups=table.meta["n_groups"], detect_s=t_detect, first_call_s=t_first,
                  catalog_s=times, catalog_best_s=t_ours, photutils_sources=n_sub, photutils_s=t_phot, ours_same_sources_s=t_sub,
                  ratio_same_sources=t_phot / t_sub, ratio_per_source_full=rate_full / rate_phot)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
