"""Write the committed cut of the real ZTF quadrant used by the tests (tests/data/ztf/).

Run once from the repository root after ``make data``:
``python scripts/make_ztf_cut.py``. The cut keeps the header (GAIN, READNOI, SATURATE,
MAGZP, SEEING, APCOR*) and a WCS shifted to the cut (astropy ``Cutout2D``).
"""

import argparse
import gzip
import logging
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS

from ztfpsf.datasets import ztf_quadrant

log = logging.getLogger("make_ztf_cut")

#: x0, y0 (0-based pixel of the cut's [0, 0]) and size: a region rich in isolated stars.
X0, Y0, SIZE = 1920, 384, 1024


def write_cut(src, dst, x0=X0, y0=Y0, size=SIZE):
    with fits.open(src) as hdul:
        data, header = hdul[0].data, hdul[0].header
        cut = Cutout2D(data, (x0 + (size - 1) / 2.0, y0 + (size - 1) / 2.0), (size, size), wcs=WCS(header), mode="strict")
        out = header.copy()
        out.update(cut.wcs.to_header())
        out["ZCUTX0"] = (x0, "0-based x of this cut's pixel [0,0] in the quadrant")
        out["ZCUTY0"] = (y0, "0-based y of this cut's pixel [0,0] in the quadrant")
        out["ZCUTSRC"] = (Path(src).name, "quadrant this was cut from")
        hdu = fits.PrimaryHDU(np.ascontiguousarray(cut.data), header=out)
        with open(dst, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
            hdu.writeto(f)  # mtime 0: the same bytes on every run
    log.info("%s -> %s", src, dst)


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="tests/data/ztf/cut1024")
    args = ap.parse_args()
    sci, msk = ztf_quadrant()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for src in (sci, msk):
        write_cut(src, out / (Path(src).name + ".gz"))


if __name__ == "__main__":
    main()
