"""A small simulated run written as the pipeline writes it: the fixture of the figure and
report tests (``sim_run`` in conftest.py)."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ztfpsf import get_model
from ztfpsf.flags import BAD, Flag
from ztfpsf.io.results import result_paths as output_paths
from ztfpsf.plots._data import cut_stamps, stamp_origins

IMAGE_SHAPE = (300, 300)
STAMP = 17
GAIN, READ_NOISE, SKY, ZEROPOINT = 6.2, 8.0, 150.0, 26.2
STEM = "ztf_sim_sciimg"


# ---------------------------------------------------------------------------------------
# a small simulated run, written as the pipeline writes it
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


def write_results(table, meta, summary, out_dir, stem):
    """Write ``<stem>.stars.parquet`` (+ ``ztfpsf`` metadata), ``.summary.json``, ``.history.npy``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = output_paths(out_dir, stem)
    arrow = pa.table({c: np.asarray(table[c]) for c in table.colnames})
    arrow = arrow.replace_schema_metadata({b"ztfpsf": json.dumps(meta).encode()})
    pq.write_table(arrow, paths["stars"])
    paths["summary"].write_text(json.dumps(summary, indent=1))
    if "loss_history" in table.meta:
        np.save(paths["history"], table.meta["loss_history"])
    return paths


def build_run(out_dir):
    """40 Moffat stars (fwhm and alpha varying over the image) + one empty catalogue position
    in a 300x300 image with ZTF-like noise; one star has a dead (masked) pixel."""
    from astropy.io import fits
    from astropy.table import Table

    from ztfpsf import fit_stamps
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
    dead = (int(round(y[3])) + 1, int(round(x[3])))
    mask[dead] = 1 << MASK_BITS["dead"]
    img_path = Path(out_dir) / f"{STEM}.fits"
    mask_path = Path(out_dir) / "ztf_sim_mskimg.fits"
    fits.PrimaryHDU(image.astype(np.float32)).writeto(img_path, overwrite=True)
    fits.PrimaryHDU(mask).writeto(mask_path, overwrite=True)

    x_cat, y_cat = x + rng.normal(0, 0.1, n), y + rng.normal(0, 0.1, n)
    cat = Table({"x_init": x_cat, "y_init": y_cat})
    origins = stamp_origins(cat, STAMP)
    stamps = cut_stamps(image.astype(np.float32), origins, STAMP)
    bad = cut_stamps((mask != 0).astype(float), origins, STAMP) > 0
    t0 = time.perf_counter()
    fit = fit_stamps(stamps, model="moffat", mask=bad, gain=GAIN, read_noise=READ_NOISE, saturation=50000.0,
                     origin=origins, x_init=x_cat, y_init=y_cat, return_history=True)
    seconds = time.perf_counter() - t0
    table = Table({"id": np.arange(1000, 1000 + n), "ra": 10 + x / 3600, "dec": 20 + y / 3600, "mag": mag})
    for c in fit.colnames:
        table[c] = fit[c]
    table.meta["loss_history"] = fit.meta["loss_history"]
    meta = {
        "version": "0.1.0", "image": str(img_path.resolve()), "mask": str(mask_path.resolve()),
        "model": fit.meta["model"], "integration": fit.meta["integration"], "method": fit.meta["method"],
        "stamp_size": STAMP, "gain": GAIN, "read_noise": READ_NOISE, "saturation": 50000.0,
        "zeropoint": ZEROPOINT, "pixel_scale": 1.01, "image_shape": list(IMAGE_SHAPE),
        "options": {"max_iter": 30}, "units": {"x": "pix", "y": "pix", "flux": "adu"},
    }
    flags = np.asarray(table["flags"])
    good = (flags & int(BAD)) == 0
    summary = {
        "image": meta["image"], "stem": STEM, "status": "ok", "error": None,
        "counts": {"catalogue": n + 5, "in image": n + 2, "isolated": n + 1, "magnitude": n, "fitted": n},
        "n_fitted": int(good.sum()), "n_converged": int((good & ((flags & Flag.NOT_CONVERGED) == 0)).sum()),
        "n_flagged": int((flags != 0).sum()), "fwhm_median_px": float(np.median(table["fwhm"][good])),
        "fwhm_median_arcsec": float(np.median(table["fwhm"][good]) * 1.01),
        "alpha_median": float(np.median(table["alpha"][good])),
        "timings": {"read": 0.12, "select": 0.03, "fit": seconds}, "model": "moffat", "method": "lm",
        "outputs": {"stars": f"{STEM}.stars.parquet"},
    }
    paths = write_results(table, meta, summary, out_dir, STEM)
    truth = {"x": x, "y": y, "flux": flux, "fwhm": true_fwhm(x, y), "alpha": true_alpha(x, y), "mag": mag}
    return SimpleNamespace(out_dir=Path(out_dir), paths=paths, image=image, image_path=img_path, truth=truth,
                           dead=dead, stem=STEM)
