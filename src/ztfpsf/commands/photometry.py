"""``ztfpsf photometry``: forced PSF photometry at catalogue positions with a PSF file."""

import logging
import sys
from pathlib import Path

import numpy as np

HELP = "forced PSF photometry: flux, mag and errors at given positions with a fitted PSF file"
log = logging.getLogger("ztfpsf.photometry")

_FORMATS = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits", ".parquet": "parquet"}


def add_arguments(p):
    p.add_argument("image", help="FITS image (a ZTF sciimg finds its mskimg beside it)")
    p.add_argument("--psf", required=True, metavar="PSF_FILE", help="PSF file written by `ztfpsf fit` (<stem>.psf.fits)")
    p.add_argument("--positions", required=True, metavar="CAT",
                   help="catalogue with x, y (0-based pixels) or ra, dec [deg] columns: CSV, ECSV, FITS, Parquet")
    p.add_argument("--fit-position", action="store_true", help="fit x, y too (default: held at the given positions)")
    p.add_argument("--neighbours", metavar="CAT", help="catalogue of the field's other sources (x, y or ra, dec; flux or mag): "
                   "rows whose flux their light shifts are flagged BLENDED")
    p.add_argument("--sources", metavar="CAT|detect", help="fit the positions together with the image's other sources, "
                   "grouped as `ztfpsf catalog` groups them: 'detect' (sep's detections) or a catalogue (x, y or ra, dec); "
                   "positions held, neighbours fitted (not with --neighbours)")
    p.add_argument("--link", type=float, help="with --sources: linking length of the groups [FWHM] (default 3)")
    p.add_argument("--fit-radius", type=float, help="with --sources: radius of each source's fit disc [FWHM] (default 3)")
    p.add_argument("--redetect", action="store_true", help="with --sources: also fit the sources sep finds in the residual "
                   "of the first pass")
    p.add_argument("--out", metavar="FILE", help="output table (.csv, .ecsv, .fits, .parquet); default: CSV on stdout")
    p.add_argument("--stamp", type=int, default=17, help="stamp size in pixels, odd (default 17; not with --sources)")
    p.add_argument("--gain", type=float, help="gain [e-/ADU] (default: header GAIN)")
    p.add_argument("--read-noise", type=float, help="read noise [e-] (default: header READNOI)")
    p.add_argument("--zeropoint", type=float, help="magnitude zero point (default: header MAGZP)")
    p.add_argument("--saturation", type=float, help="saturation level [ADU] (default: header SATURATE)")
    p.add_argument("--mask", default="auto", help="mask file, 'auto' (ZTF mskimg beside a sciimg) or 'none'")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _write(table, out, overwrite):
    from ..cli import UserError
    from ..io.results import atomic_write

    path = Path(out)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{out}: unknown output format {path.suffix!r}; use one of {', '.join(_FORMATS)}")
    if path.exists() and not overwrite:
        raise UserError(f"{out} exists (pass --overwrite)")
    if fmt == "parquet":
        atomic_write(path, lambda tmp: table.to_pandas().to_parquet(tmp, index=False))
    else:
        atomic_write(path, lambda tmp: table.write(tmp, format=fmt))


def _group_options(args):
    """``CatalogOptions`` of ``--sources`` (None without it); the group options need it."""
    from ..catalog import CatalogOptions
    from ..cli import UserError

    if args.sources is None:
        if args.link is not None or args.fit_radius is not None or args.redetect:
            raise UserError("--link, --fit-radius and --redetect need --sources (the neighbours fitted together)")
        return None
    if args.neighbours:
        raise UserError("--sources fits the neighbours, --neighbours only judges blends: give one of them")
    for name, v in (("--link", args.link), ("--fit-radius", args.fit_radius)):
        if v is not None and not v > 0:
            raise UserError(f"{name} must be > 0; got {v}")
    defaults = CatalogOptions()
    return CatalogOptions(link=args.link or defaults.link, fit_radius=args.fit_radius or defaults.fit_radius,
                          redetect=args.redetect)


def run(args):
    from ..cli import UserError
    from ..flags import Flag
    from ..io.catalog import CatalogError, read_catalog
    from ..io.fits import ExposureError, read_exposure
    from ..photometry import photometry
    from ..psf import PSFFileError, PSFModel

    if args.stamp < 3 or args.stamp % 2 == 0:
        raise UserError(f"--stamp must be an odd size >= 3; got {args.stamp}")
    options = _group_options(args)
    try:
        psf = PSFModel.read(args.psf)
    except PSFFileError as err:
        raise UserError(str(err)) from None
    mask = None if str(args.mask).lower() == "none" else args.mask
    try:
        exp = read_exposure(args.image, mask=mask, gain=args.gain, read_noise=args.read_noise,
                            zeropoint=args.zeropoint, saturation=args.saturation)
    except ExposureError as err:
        raise UserError(str(err)) from None
    if psf.image_shape is not None and tuple(psf.image_shape) != tuple(exp.shape):
        log.warning("%s was fitted on a %dx%d image, %s is %dx%d", args.psf, psf.image_shape[1], psf.image_shape[0],
                    args.image, exp.shape[1], exp.shape[0])
    try:
        cat = read_catalog(args.positions, wcs=exp.wcs, image_shape=exp.shape, wcs_note=exp.wcs_note)
    except CatalogError as err:
        raise UserError(str(err)) from None
    if exp.gain is None:
        log.warning("%s: no gain known (header GAIN or --gain): noise from each stamp's border scatter", args.image)
    if exp.zeropoint is None:
        log.warning("%s: no zero point known (header MAGZP or --zeropoint): mag and mag_err are NaN", args.image)
    neighbours = None
    if args.neighbours:
        try:
            neighbours = read_catalog(args.neighbours, wcs=exp.wcs, image_shape=exp.shape, wcs_note=exp.wcs_note)
        except CatalogError as err:
            raise UserError(str(err)) from None
    sources = args.sources
    if sources is not None and sources != "detect":
        try:
            sources = read_catalog(sources, wcs=exp.wcs, image_shape=exp.shape, wcs_note=exp.wcs_note)
        except CatalogError as err:
            raise UserError(str(err)) from None
    try:
        table = photometry(exp, psf, cat, fit_position=args.fit_position, stamp=args.stamp, dtype=args.dtype,
                           backend=args.backend, neighbours=neighbours, sources=sources, options=options)
    except ValueError as err:
        raise UserError(str(err)) from None
    table.meta.update(image=str(args.image), psf=str(args.psf), positions=str(args.positions))
    flags = np.asarray(table["flags"])
    count = lambda bit: int(np.sum((flags & int(bit)) != 0))
    log.info("%d positions: %d off the image, %d outside the PSF's region, %d poor fits, %d blended", len(table),
             count(Flag.OFF_IMAGE), count(Flag.OUTSIDE_PSF), count(Flag.POOR_FIT), count(Flag.BLENDED))
    if args.out:
        _write(table, args.out, args.overwrite)
        log.info("wrote %s", args.out)
    else:
        table.write(sys.stdout, format="ascii.csv")
    return 0
