"""Brighter-fatter on the real ZTF quadrant: the stars' size-flux slope and the PSF - 14 px
aperture magnitude slope over 14-19 mag, without and with the flux-dependent PSF.

    python benchmarks/bench_brighter_fatter.py [--image SCI] [--psf-model analytic|hybrid] [--residual-flux on|off]

Runs the pipeline (``process_image``: detection, selection of isolated 14-19 mag stars,
``--psf varying``) twice on the cached quadrant (``ztfpsf.datasets.ztf_quadrant()``):
``brighter_fatter='off'`` (the diagnostic only) and ``'on'`` (the law fitted after the
joint fit, every star re-measured with it; a hybrid PSF with or without the flux term of
its residual surface, ``--residual-flux``), and prints the summaries' numbers
(:mod:`ztfpsf.psf.brighter_fatter` for the definitions and units).
"""

import argparse
import logging
import tempfile
import time

import ztfpsf


def run(image, mode, psf_model, out, residual_flux):
    from ztfpsf.pipeline import process_image

    t0 = time.perf_counter()
    s = process_image(image, out_dir=out, psf="varying", psf_model=psf_model, brighter_fatter=mode, mag_range=(14.0, 19.0),
                      residual_flux=residual_flux, overwrite=True)
    return s["brighter_fatter"], time.perf_counter() - t0, s


def fmt(v, scale=1.0, digits=2):
    return "-" if v is None else f"{v * scale:+.{digits}f}"


def main():
    ztfpsf.configure()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image")
    p.add_argument("--psf-model", default="analytic", choices=("analytic", "hybrid"))
    p.add_argument("--residual-flux", default="off", choices=("on", "off"), help="the hybrid surface's flux term")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    image = args.image
    if image is None:
        from ztfpsf.datasets import ztf_quadrant

        image = ztf_quadrant()[0]
    with tempfile.TemporaryDirectory() as out:
        rows = []
        for mode in ("off", "on"):
            info, seconds, summary = run(image, mode, args.psf_model, out, args.residual_flux == "on")
            rows.append((mode, info, seconds, summary))
    flux_term = f", residual flux term {args.residual_flux}" if args.psf_model == "hybrid" else ""
    print(f"Brighter-fatter, {image} ({args.psf_model} varying PSF{flux_term}, stars 14-19 mag)")
    print("| PSF | stars | size slope [% per decade of flux] | model slope b [% per decade] | "
          "PSF - AP14 slope 14-19 mag [mmag/mag] | stars | s |")
    print("|---|---|---|---|---|---|---|")
    for mode, info, seconds, summary in rows:
        model = info.get("model") or {}
        ap = info.get("after") or info
        print(f"| {'flux-dependent' if model else 'flux-independent'} | {info['size_n']} | "
              f"{fmt(info['size_slope'], 100)} ± {fmt(info['size_slope_err'], 100)[1:]} | "
              f"{fmt(model.get('slope'), 100)} ± {fmt(model.get('slope_err'), 100)[1:]} | "
              f"{fmt(ap['apcorr_slope'], 1e3)} ± {fmt(ap['apcorr_slope_err'], 1e3)[1:]} | {ap.get('apcorr_n')} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
