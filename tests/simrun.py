"""A small simulated run, fitted by the real ``ztfpsf fit``: the fixture of the figure and
report tests (``sim_run`` in conftest.py)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ztfpsf import get_model
from ztfpsf.io.results import result_paths as output_paths

IMAGE_SHAPE = (300, 300)
STAMP = 17
GAIN, READ_NOISE, SKY, ZEROPOINT, SATURATION = 6.2, 8.0, 150.0, 26.2, 50000.0
STEM = "ztf_sim_sciimg"


# ---------------------------------------------------------------------------------------
# a small simulated image, fitted as a user would
# ---------------------------------------------------------------------------------------
def true_fwhm(x, y):
    return 1.9 + 0.8 * np.asarray(x) / IMAGE_SHAPE[1]


def true_alpha(x, y):
    return 2.6 + 0.8 * np.asarray(y) / IMAGE_SHAPE[0]


def _positions(rng):
    gx, gy = np.meshgrid(np.linspace(22, 277, 7), np.linspace(22, 277, 6))
    x = gx.ravel() + rng.uniform(-6, 6, gx.size)
    y = gy.ravel() + rng.uniform(-6, 6, gy.size)
    return x[:41], y[:41]


def build_run(out_dir):
    """40 Moffat stars (fwhm and alpha varying over the image) + one empty catalogue position
    in a 300x300 image with ZTF-like noise (header GAIN, READNOI, SATURATE, MAGZP); one star
    has a dead (masked) pixel 4 px from its centre. Fitted by ``ztfpsf fit`` with the
    catalogue and the mask (``--history``): its outputs are in ``out_dir``."""
    from astropy.io import fits
    from astropy.table import Table

    from ztfpsf.cli import main
    from ztfpsf.io.ztf import MASK_BITS

    rng = np.random.default_rng(7)
    x, y = _positions(rng)
    n = x.size
    mag = rng.uniform(14.0, 18.0, n)
    flux = 10 ** (-0.4 * (mag - ZEROPOINT))
    flux[-1] = 0.0  # catalogue star that is not there
    model = get_model("moffat", "gl4")
    # each star rendered on a 31x31 box around it (its flux beyond is < 1e-3 of the total)
    box = 31
    ox, oy = np.floor(x).astype(int) - box // 2, np.floor(y).astype(int) - box // 2
    stars = np.asarray(model.image(flux, x - ox, y - oy, (true_fwhm(x, y), true_alpha(x, y)), np.zeros(n), box, box))
    truth_image = np.full(IMAGE_SHAPE, SKY)
    for k in range(n):
        truth_image[oy[k]:oy[k] + box, ox[k]:ox[k] + box] += stars[k]
    image = (rng.poisson(truth_image * GAIN) + rng.normal(0, READ_NOISE, truth_image.shape)) / GAIN
    mask = np.zeros(IMAGE_SHAPE, np.int32)
    dead = (int(round(y[3])) + 4, int(round(x[3])))  # in the stamp, outside the 3 px core the selection keeps clean
    mask[dead] = 1 << MASK_BITS["dead"]
    inputs = Path(out_dir) / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    img_path, mask_path, cat_path = inputs / f"{STEM}.fits", inputs / "ztf_sim_mskimg.fits", inputs / "catalog.csv"
    header = fits.Header({"GAIN": GAIN, "READNOI": READ_NOISE, "SATURATE": SATURATION, "MAGZP": ZEROPOINT})
    fits.PrimaryHDU(image.astype(np.float32), header).writeto(img_path, overwrite=True)
    fits.PrimaryHDU(mask).writeto(mask_path, overwrite=True)
    # the catalogue: 0-based x, y with 0.1 px errors, and the magnitudes
    Table({"id": np.arange(1000, 1000 + n), "x": x + rng.normal(0, 0.1, n), "y": y + rng.normal(0, 0.1, n), "mag": mag}).write(cat_path)
    code = main(["-q", "fit", str(img_path), "--catalog", str(cat_path), "--mask", str(mask_path), "--out", str(out_dir),
                 "--isolation-px", "20", "--pixel-scale", "1.01", "--history", "--overwrite",
                 # header noise: the figures recompute sigma from the metadata's gain and read noise,
                 # while 'measured' noise uses a per-star effective read noise the table lacks
                 "--noise", "header"])
    assert code == 0, f"ztfpsf fit failed with exit code {code}"
    paths = output_paths(out_dir, STEM)
    truth = {"x": x, "y": y, "flux": flux, "fwhm": true_fwhm(x, y), "alpha": true_alpha(x, y), "mag": mag}
    return SimpleNamespace(out_dir=Path(out_dir), paths=paths, image=image, image_path=img_path, truth=truth,
                           dead=dead, stem=STEM)
