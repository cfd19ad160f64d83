"""``ztfpsf report``: one self-contained HTML report per image of an output folder."""

import logging
from pathlib import Path

HELP = "write one self-contained HTML report per image from an output folder (opens in any browser)"
log = logging.getLogger("ztfpsf.report")


def add_arguments(p):
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder with <stem>.summary.json / <stem>.stars.parquet outputs")
    p.add_argument("--stem", action="append", help="only this image (file name without .fits); repeat for several")
    p.add_argument("--image", help="FITS image, when it moved since the run (only with one --stem)")
    p.add_argument("--worst", type=int, default=5, metavar="N", help="worst fits listed and drawn (default 5)")
    p.add_argument("--typical", type=int, default=2, metavar="N", help="typical fits drawn (default 2)")


def run(args):
    from ..cli import UserError
    from ..report import find_stems, write_reports

    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: no such folder")
    if args.worst < 0 or args.typical < 0:
        raise UserError("--worst and --typical must be >= 0")
    stems = args.stem or find_stems(out_dir)
    if not stems:
        raise UserError(f"{out_dir}: no <stem>.summary.json or <stem>.stars.parquet outputs in this folder")
    if args.image and len(stems) != 1:
        raise UserError("--image needs exactly one image: give --stem too")
    done = write_reports(out_dir, stems, image=args.image, worst=args.worst, typical=args.typical)
    failed = 0
    for stem, path, error in done:
        if path is not None:
            print(path)
        else:
            failed += 1
            print(f"{stem}: report not written: {error}")
    return 1 if failed else 0
