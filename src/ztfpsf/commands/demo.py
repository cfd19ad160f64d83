"""``ztfpsf demo``: the main job on a built-in example with known truth.

Simulates a ZTF-like science quadrant (its catalogue, mask and truth beside it), runs the
quadrant pipeline on it with a spatially varying PSF model, writes the outputs and the HTML
report to ``./ztfpsf-demo/``, and prints what was recovered against the truth.
"""

import logging
import time
from pathlib import Path

import numpy as np

HELP = "simulate a ZTF quadrant, fit it, write results and report to ./ztfpsf-demo/, compare with the truth"
log = logging.getLogger("ztfpsf.demo")


def add_arguments(p):
    p.add_argument("--out", default="ztfpsf-demo", help="output directory (default ./ztfpsf-demo)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    p.add_argument("--size", type=int, nargs=2, default=(3080, 3072), metavar=("NY", "NX"), help="quadrant size (default 3080 3072)")
    p.add_argument("--nstars", type=int, default=15000, help="stars in the simulated quadrant (default 15000)")
    p.add_argument("--backend", choices=("auto", "cpu", "gpu"), default="auto")


def _pull(table, name):
    return (table[f"{name}_fit"] - table[f"{name}_true"]) / table[f"{name}_err"]


def run(args):
    from astropy.table import Table, join

    from ..config import FitConfig
    from ..io.results import read_parquet
    from ..pipeline import output_paths, process_image
    from ..psf import PSFModel
    from ..psf.model import profile_enclosed
    from ..simulate import VaryingPSF, simulate_quadrant

    out = Path(args.out)
    t0 = time.perf_counter()
    inputs = simulate_quadrant(out / "input", seed=args.seed, size=tuple(args.size), nstars=args.nstars)
    t_sim = time.perf_counter() - t0
    config = FitConfig(catalog=str(inputs["catalog"]), model="elliptical_moffat", psf="varying", degree=2,
                       history=True, report=True, overwrite=True, backend=args.backend)
    t0 = time.perf_counter()
    summary = process_image(inputs["sciimg"], config, out)
    t_fit = time.perf_counter() - t0

    paths = output_paths(inputs["sciimg"], out)
    truth = Table.read(inputs["truth"])
    true_psf = VaryingPSF.from_dict(truth.meta["psf"])
    truth.meta.clear()
    stars = join(read_parquet(paths["stars"]), truth, keys="id", table_names=["fit", "true"])
    # a PSF flux is the flux within the PSF's flux radius (7 px): the truth's, likewise
    true_shape = {k: np.asarray(stars[f"{k}_true"]) for k in ("fwhm", "alpha", "e1", "e2")}
    stars["flux_true"] = stars["flux_true"] * profile_enclosed("elliptical_moffat", true_shape)
    ok = stars["flags"] == 0
    psf = PSFModel.read(paths["psf"])
    x, y = np.asarray(stars["x_fit"]), np.asarray(stars["y_fit"])
    fwhm_err = psf.fwhm(x, y) / true_psf.fwhm(x, y) - 1
    stats = summary["psf_stats"]

    print(f"\nsimulated {Path(inputs['sciimg']).name} ({args.size[0]}x{args.size[1]}, {args.nstars} stars) in {t_sim:.1f} s")
    print("selection: " + " -> ".join(f"{k} {v}" for k, v in summary["counts"].items()))
    print(f"fitted {summary['n_fitted']} stars and the varying PSF in {t_fit:.1f} s "
          f"(fit stage {summary['timings']['fit']:.2f} s, compilation included); {int(ok.sum())} with flags == 0\n")
    print(f"{'stars measured with the PSF model vs truth':<44}{'median':>10}{'scatter':>10}")
    for name in ("x", "y", "flux"):
        p = _pull(stars, name)[ok]
        print(f"  {name + ' pull (fit - true)/err':<42}{np.median(p):>10.3f}{np.std(p):>10.3f}")
    for name, label in (("flux", "flux fit/true - 1"), ("fwhm", "PSF fwhm at the star / true - 1"), ("alpha", "PSF alpha at the star / true - 1")):
        r = (stars[f"{name}_fit"] / stars[f"{name}_true"] - 1)[ok]
        print(f"  {label:<42}{np.median(r):>10.4f}{1.4826 * np.median(np.abs(r - np.median(r))):>10.4f}")
    print(f"\nPSF model ({stats['mode']}, degree {stats['degree']}, {stats['n_fit']} stars, {stats['n_reserve']} reserved, "
          f"{stats['n_outlier']} clipped): fwhm map vs truth at the stars: rms {100 * np.sqrt(np.mean(fwhm_err**2)):.2f} %")
    print(f"chi2/dof: training stars {stats['chi2_dof_train']:.3f}, reserve stars {stats['chi2_dof_reserve']:.3f}")
    print(f"\noutputs in {out}/: {', '.join(Path(p).name for p in summary['outputs'].values())}")
    print(f"open {summary['outputs'].get('report')} in a browser")
    return 0
