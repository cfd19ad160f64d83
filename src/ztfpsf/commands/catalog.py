"""``ztfpsf catalog``: every source of an image measured with its PSF, neighbours fitted together."""

import logging
from pathlib import Path

HELP = "PSF-fit catalogue: every detected (or catalogued) source measured with the image's PSF file"
log = logging.getLogger("ztfpsf.catalog")


def add_arguments(p):
    p.add_argument("image", help="FITS image (a ZTF sciimg finds its mskimg beside it)")
    p.add_argument("--psf", required=True, metavar="PSF_FILE", help="PSF file written by `ztfpsf fit` (<stem>.psf.fits)")
    p.add_argument("--sources", metavar="CAT", help="sources to measure (x, y or ra, dec): CSV, ECSV, FITS, Parquet; "
                   "default: sep's detections")
    p.add_argument("--out", metavar="FILE.parquet", help="output catalogue (default: <image stem>.catalog.parquet beside the image)")
    p.add_argument("--residual-image", nargs="?", const="", metavar="FILE.fits",
                   help="also write the image less all fitted sources (FITS); without FILE: <image stem>.residual.fits "
                        "beside the catalogue (the name `ztfpsf report` shows as a thumbnail)")
    p.add_argument("--mask", default="auto", help="mask file, 'auto' (ZTF mskimg beside a sciimg) or 'none'")
    p.add_argument("--link", type=float, default=3.0, help="linking length of the groups fitted together [FWHM] (default 3)")
    p.add_argument("--fit-radius", type=float, default=3.0, help="radius of each source's fit disc [FWHM] (default 3)")
    p.add_argument("--redetect", action="store_true", help="detect in the residual of the first pass and refit with the "
                   "sources found there (companions hidden by brighter stars)")
    p.add_argument("--single-pass", action="store_true", help="no second pass with the neighbours' light subtracted")
    p.add_argument("--gain", type=float, help="gain [e-/ADU] (default: header GAIN)")
    p.add_argument("--read-noise", type=float, help="read noise [e-] (default: header READNOI)")
    p.add_argument("--zeropoint", type=float, help="magnitude zero point (default: header MAGZP)")
    p.add_argument("--saturation", type=float, help="saturation level [ADU] (default: header SATURATE)")
    p.add_argument("--noise", default="measured", choices=("measured", "header"), help="noise model (see `ztfpsf fit`)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _default_out(image):
    name = Path(image).name
    for suffix in (".fits.gz", ".fits.fz", ".fits", ".fit"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return Path(image).with_name(f"{name}.catalog.parquet")


def _residual_path(arg, out, image):
    """``--residual-image``'s path: as given, or ``<image stem>.residual.fits`` beside the
    catalogue ``out`` (None without the option)."""
    from ..io.results import result_paths
    from ..pipeline import stem_of

    if arg is None:
        return None
    return Path(arg) if arg else result_paths(Path(out).parent, stem_of(image))["residual"]


def _check_outputs(paths, overwrite):
    from ..cli import UserError

    for path in paths:
        if path is not None and Path(path).exists() and not overwrite:
            raise UserError(f"{path} exists (pass --overwrite)")


def run(args):
    from ..catalog import CatalogOptions, psf_catalog, write_catalog, write_residual
    from ..cli import UserError
    from ..io.catalog import CatalogError, read_catalog
    from ..io.fits import ExposureError, read_exposure
    from ..psf import PSFFileError, PSFModel

    out = Path(args.out) if args.out else _default_out(args.image)
    if out.suffix.lower() != ".parquet":
        raise UserError(f"{out}: the catalogue is written as Parquet (.parquet)")
    residual_path = _residual_path(args.residual_image, out, args.image)
    _check_outputs((out, residual_path), args.overwrite)
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
    sources = None
    if args.sources:
        try:
            sources = read_catalog(args.sources, wcs=exp.wcs, image_shape=exp.shape, wcs_note=exp.wcs_note)
        except CatalogError as err:
            raise UserError(str(err)) from None
    if exp.zeropoint is None:
        log.warning("%s: no zero point known (header MAGZP or --zeropoint): mag and mag_err are NaN", args.image)
    opts = CatalogOptions(link=args.link, fit_radius=args.fit_radius, refit=not args.single_pass, redetect=args.redetect,
                          noise=args.noise, dtype=args.dtype, backend=args.backend)
    try:
        table, residual = psf_catalog(exp, psf, sources, options=opts, residual=residual_path is not None, progress=True)
    except ValueError as err:
        raise UserError(str(err)) from None
    table.meta.update(psf=str(args.psf))
    write_catalog(table, out)
    log.info("wrote %s (%d sources)", out, len(table))
    if residual_path is not None:
        write_residual(residual, exp.header, residual_path)
        log.info("wrote %s", residual_path)
    return 0
