"""``ztfpsf fit``: select stars and fit their PSF on one or many images."""

import logging
import sys
from pathlib import Path

HELP = "fit the PSF of the selected stars of ZTF quadrants or any FITS images (Dask for many)"
log = logging.getLogger("ztfpsf.fit")


def add_arguments(p):
    p.add_argument("images", nargs="+", metavar="IMAGE", help="FITS images (ZTF sciimg or any image)")
    p.add_argument("--catalog", metavar="CAT", help="star catalogue (CSV, ECSV, FITS, Parquet; ra/dec or x/y; Gaia names); "
                   "'auto': <name>_catalog.* beside each image; default: detect stars")
    p.add_argument("--catalog-positions", choices=("auto", "pixel", "sky"), default="auto",
                   help="use the catalogue's x/y or its ra/dec (default: x/y when present)")
    p.add_argument("--catalog-origin", type=int, choices=(0, 1), help="origin of the catalogue's x/y (default: 1 for SExtractor *_IMAGE, else 0)")
    p.add_argument("--model", choices=("moffat", "gaussian", "elliptical_moffat"), default="moffat")
    p.add_argument("--method", choices=("lm", "tncg", "adam", "scipy"), default="lm")
    p.add_argument("--psf", choices=("independent", "shared", "varying"), default="independent",
                   help="each star its own shape (default), one shape per image, or a shape varying over the image")
    p.add_argument("--degree", type=int, default=2, help="polynomial degree of --psf varying (default 2)")
    p.add_argument("--psf-model", choices=("auto", "analytic", "hybrid"), default="auto",
                   help="with --psf shared|varying: analytic profile, or hybrid = analytic + pixel residual surface "
                        "(default auto: hybrid from 50 selected stars on)")
    p.add_argument("--residual-flux", choices=("on", "off"), default="on",
                   help="a hybrid PSF's residual surface changes linearly with log flux (default on: the cores of "
                        "ZTF stars do)")
    p.add_argument("--brighter-fatter", choices=("auto", "on", "off"), default="off",
                   help="flux-dependent PSF size (brighter-fatter) with --psf shared|varying: off (default: the size/flux "
                        "diagnostic only), on, or auto (when the stars' size trend and the law's slope exceed 3 sigma)")
    p.add_argument("--reserve", type=float, default=0.1, help="fraction of stars kept out of a joint PSF fit to score it")
    p.add_argument("--out", default="ztfpsf-out", help="output directory (default ztfpsf-out)")
    p.add_argument("--mask", help="mask FITS for the image (non-zero = bad; ZTF bits for a mskimg); default: the mskimg beside a sciimg")
    p.add_argument("--no-mask", action="store_true", help="use no mask file")
    p.add_argument("--bad-bits", help="ZTF mask bits that make a pixel bad: names (comma-separated) or an integer")
    p.add_argument("--hdu", help="image HDU (index or EXTNAME)")
    p.add_argument("--mag-range", type=float, nargs=2, default=(14.0, 18.0), metavar=("BRIGHT", "FAINT"))
    p.add_argument("--isolation", type=float, default=20.0, help="no other source within this radius [arcsec] (default 20)")
    p.add_argument("--isolation-px", type=float, help="isolation radius in pixels (overrides --isolation)")
    p.add_argument("--edge", type=int, default=15, help="minimum distance to the image edges [px] (default 15)")
    p.add_argument("--stamp", type=int, default=17, help="stamp size [px], odd (default 17)")
    p.add_argument("--min-snr", type=float, default=20.0, help="faint limit by S/N when magnitudes are instrumental (default 20)")
    for name, unit in (("gain", "e-/ADU"), ("read-noise", "e-"), ("saturation", "ADU"), ("zeropoint", "mag"), ("pixel-scale", "arcsec/px")):
        p.add_argument(f"--{name}", type=float, help=f"override the header value [{unit}]")
    p.add_argument("--noise", choices=("measured", "header"), default="measured",
                   help="pixel noise: the sky variance measured on the image plus the source's Poisson noise (default), "
                   "or the header gain and read noise alone")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--backend", choices=("auto", "cpu", "gpu"), default="auto", help="auto: a GPU when JAX sees one, else the CPU")
    p.add_argument("--workers", type=int, help="worker processes of the local Dask cluster (default: the cores; 1: no Dask)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="send the work to this Dask scheduler (e.g. tcp://host:8786) instead")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    p.add_argument("--history", action="store_true", help="record every star's loss per iteration (<stem>.history.npy)")
    p.add_argument("--report", action="store_true", help="write the HTML report of each image")


def config_from_args(args):
    from ..config import FitConfig
    from ..io.ztf import DEFAULT_BAD_BITS

    bad_bits = DEFAULT_BAD_BITS
    if args.bad_bits:
        bad_bits = int(args.bad_bits) if args.bad_bits.isdigit() else tuple(b.strip() for b in args.bad_bits.split(",") if b.strip())
    hdu = int(args.hdu) if args.hdu is not None and args.hdu.isdigit() else args.hdu
    return FitConfig(
        catalog=args.catalog, catalog_positions=args.catalog_positions, catalog_origin=args.catalog_origin,
        mask=None if args.no_mask else (args.mask or "auto"), bad_bits=bad_bits, hdu=hdu,
        gain=args.gain, read_noise=args.read_noise, saturation=args.saturation, zeropoint=args.zeropoint,
        pixel_scale=args.pixel_scale, mag_range=tuple(args.mag_range), isolation=args.isolation,
        isolation_px=args.isolation_px, edge=args.edge, stamp=args.stamp, min_snr=args.min_snr,
        model=args.model, method=args.method, dtype=args.dtype, backend=args.backend, psf=args.psf,
        degree=args.degree, psf_model=args.psf_model, residual_flux=args.residual_flux == "on", reserve=args.reserve, brighter_fatter=args.brighter_fatter, noise=args.noise, overwrite=args.overwrite, history=args.history, report=args.report,
    )  # fmt: skip


def _check_inputs(args):
    from ..cli import UserError

    for image in args.images:
        if not Path(image).exists():
            raise UserError(f"{image}: no such file")
    if args.catalog and args.catalog != "auto" and not Path(args.catalog).exists():
        raise UserError(f"{args.catalog}: no such catalogue file")
    if args.mask and not Path(args.mask).exists():
        raise UserError(f"{args.mask}: no such mask file")


def run(args):
    from ..cli import UserError
    from ..pipeline import output_paths, run as run_images

    try:
        config = config_from_args(args)
    except ValueError as err:
        raise UserError(str(err)) from None
    if len(args.images) == 1:
        _check_inputs(args)
    try:
        record = run_images(args.images, config, args.out, workers=args.workers, scheduler=args.scheduler)
    except ValueError as err:  # refused before anything ran (e.g. two inputs with one name)
        raise UserError(str(err)) from None
    images = record["images"]
    failed = {p: e for p, e in images.items() if e["status"] == "failed"}
    if len(args.images) == 1 and failed:
        raise UserError(next(iter(failed.values()))["error"])
    for p, e in images.items():
        if e["status"] == "ok":
            print(f"{p}: {e['n_fitted']} stars -> {output_paths(p, args.out)['stars']}")
        elif e["status"] == "skipped":
            print(f"{p}: skipped (outputs exist; --overwrite to redo)")
        else:
            print(f"{p}: FAILED: {e['error']}", file=sys.stderr)
    print(f"{record['n_ok']} done, {record['n_skipped']} skipped, {record['n_failed']} failed in {record['seconds']:.1f} s; run summary: {Path(args.out) / 'run_summary.json'}")
    return 1 if failed else 0
