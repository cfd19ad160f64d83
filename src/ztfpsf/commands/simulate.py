"""``ztfpsf simulate``: write a simulated ZTF-like science quadrant with its catalogue and truth."""

import logging
import time

HELP = "simulate a ZTF-like science quadrant (sciimg, mskimg, catalogue, truth table)"
log = logging.getLogger("ztfpsf.simulate")


def add_arguments(p):
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory for the files (created)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files (default 0)")
    p.add_argument("--size", type=int, nargs=2, metavar=("NY", "NX"), default=(3080, 3072), help="image shape in numpy order, rows then columns (default: a ZTF quadrant, 3080 3072)")
    p.add_argument("--nstars", type=int, default=15000, help="stars rendered (default 15000)")
    p.add_argument("--mag-range", type=float, nargs=2, metavar=("BRIGHT", "FAINT"), default=(12.0, 21.0), help="magnitude range (default 12 21)")
    p.add_argument("--constant-psf", action="store_true", help="the same PSF everywhere (--fwhm, --alpha) instead of the default varying one")
    p.add_argument("--fwhm", type=float, default=2.2, help="FWHM [px] with --constant-psf (default 2.2)")
    p.add_argument("--alpha", type=float, default=3.0, help="Moffat alpha with --constant-psf (default 3.0)")
    p.add_argument("--no-mask", action="store_true", help="no detector defects and no mskimg")
    p.add_argument("--noise", choices=("poisson", "gaussian"), default="poisson", help="Poisson counts or their Gaussian limit (faster)")
    p.add_argument("--field", type=int, default=655, help="ZTF field id for the file name (default 655)")
    p.add_argument("--ccd", type=int, default=13, help="CCD 1-16 (default 13)")
    p.add_argument("--qid", type=int, default=3, help="quadrant 1-4 (default 3)")
    p.add_argument("--filter", choices=("zg", "zr", "zi"), default="zr", help="filter (default zr)")
    p.add_argument("--date", default="2020-09-24T10:21:43.98", help="UT start of the exposure, ISO (default 2020-09-24T10:21:43.98)")
    p.add_argument("--ra", type=float, default=None, help="ra of the image centre [deg] (default: nominal position of ccd/qid)")
    p.add_argument("--dec", type=float, default=None, help="dec of the image centre [deg]")


def run(args):
    from ..cli import UserError
    from ..simulate import VaryingPSF, make_quadrant

    size = tuple(args.size)
    try:
        psf = VaryingPSF.constant(args.fwhm, args.alpha, size=size) if args.constant_psf else None
        t0 = time.perf_counter()
        quadrant = make_quadrant(
            seed=args.seed, size=size, nstars=args.nstars, mag_range=tuple(args.mag_range), psf=psf,
            mask=not args.no_mask, noise=args.noise, field=args.field, ccd=args.ccd, qid=args.qid,
            filter=args.filter, date=args.date, ra=args.ra, dec=args.dec,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    truth = quadrant.truth
    log.info(
        "simulated %d x %d px, %d stars (%d saturated, %d clean), %s in %.1f s",
        size[0], size[1], len(truth), int(truth["saturated"].sum()), int(truth["clean"].sum()), quadrant.psf, time.perf_counter() - t0,
    )
    try:
        quadrant.write(args.out_dir)
    except OSError as err:
        raise UserError(f"{args.out_dir}: cannot write: {err.strerror or err}") from None
    return 0
