"""``ztfpsf plot``: figures of a run from its results file, or timing figures from benchmarks."""

import logging
from pathlib import Path

HELP = "draw figures from a results file (stars, maps, residuals, loss) or from benchmark timings JSON"
log = logging.getLogger("ztfpsf.plot")


def add_arguments(p):
    p.add_argument("inputs", nargs="+", metavar="FILE",
                   help="<stem>.stars.parquet results file(s); or benchmark timings .json file(s), "
                   "drawn in one timing figure")
    p.add_argument("--image", help="FITS image the results come from (default: the path recorded in the results)")
    p.add_argument("--kind", action="append", choices=("stars", "maps", "residuals", "loss", "psf", "brighter_fatter"),
                   help="figure kind; repeat for several (default: every kind the outputs allow)")
    p.add_argument("--ids", nargs="+", metavar="ID", help="draw these stars (values of the 'id' column)")
    p.add_argument("--worst", type=int, default=None, metavar="N",
                   help="draw the N stars with the largest chi2/dof (default 5 unless --ids)")
    p.add_argument("--typical", type=int, default=None, metavar="N",
                   help="draw the N stars with chi2/dof closest to the median (default 3 unless --ids)")
    p.add_argument("--psf", help="PSF model file for the model maps (default: <stem>.psf.fits beside the results)")
    p.add_argument("--out", help="output folder (default: the results file's folder; for timings: the current folder)")
    p.add_argument("--format", default="png", choices=("png", "pdf", "svg"), help="figure file format (default png)")


def _check_counts(args):
    from ..cli import UserError

    for name in ("worst", "typical"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise UserError(f"--{name} must be >= 0; got {v}")
    default = 0 if args.ids else None
    worst = args.worst if args.worst is not None else (default if default is not None else 5)
    typical = args.typical if args.typical is not None else (default if default is not None else 3)
    return worst, typical


def _timing(paths, args):
    from ..cli import UserError
    from ..plots import make_timing_figure

    if args.kind or args.ids or args.image:
        raise UserError("--kind, --ids and --image apply to results files, not to benchmark timings")
    out = Path(args.out or ".") / f"timing.{args.format}"
    try:
        path = make_timing_figure(paths, out)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    print(path)


def run(args):
    from ..cli import UserError
    from ..plots import make_figures

    json_files = [f for f in args.inputs if f.lower().endswith(".json")]
    results = [f for f in args.inputs if not f.lower().endswith(".json")]
    if json_files and results:
        raise UserError("give either results (.parquet) files or benchmark (.json) files, not both")
    if json_files:
        _timing(json_files, args)
        return 0
    if args.image and len(results) > 1:
        raise UserError("--image applies to one results file; give one at a time")
    worst, typical = _check_counts(args)
    for path in results:
        if path.endswith(".summary.json"):
            raise UserError(f"{path}: a summary, not a results file; give <stem>.stars.parquet")
        try:
            made = make_figures(path, out_dir=args.out, kinds=args.kind, image=args.image, ids=args.ids, worst=worst,
                                typical=typical, psf=args.psf, fmt=args.format)
        except (FileNotFoundError, ValueError) as err:
            msg = str(err)
            raise UserError(msg if msg.startswith(path) else f"{path}: {msg}") from None
        for paths in made.values():
            for p in paths:
                print(p)
    return 0
