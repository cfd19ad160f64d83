"""``ztfpsf demo``: simulate stars with a known PSF, fit them, compare with the truth."""

import logging
import time

import numpy as np

HELP = "simulate ZTF-like stars, fit them and print the recovered PSF against the truth"
log = logging.getLogger("ztfpsf.demo")


def add_arguments(p):
    p.add_argument("--nstars", type=int, default=2000, help="number of simulated stars (default 2000)")
    p.add_argument("--model", default="moffat", choices=("moffat", "gaussian", "elliptical_moffat"))
    p.add_argument("--seed", type=int, default=0)


def run(args):
    from .. import fit_stamps
    from ..simulate import simulate_stamps

    data, _, truth = simulate_stamps(args.nstars, model=args.model, seed=args.seed, shape={"fwhm": 2.2, "alpha": 3.0} if args.model != "gaussian" else None)
    t0 = time.perf_counter()
    table = fit_stamps(data, model=args.model, gain=truth.meta["gain"], read_noise=truth.meta["read_noise"])
    dt = time.perf_counter() - t0
    ok = table["flags"] == 0
    print(f"fitted {len(table)} stars in {dt:.2f} s ({len(table) / dt:.0f} stars/s, compilation included); {ok.sum()} with flags == 0")
    rows = [("fwhm [px]", "fwhm")] + [(n, n) for n in ("alpha", "sigma_x", "sigma_y", "rho", "e1", "e2") if n in table.colnames]
    print(f"{'parameter':<12}{'truth (median)':>16}{'fit (median)':>14}{'median pull':>13}{'pull std':>10}")
    for label, name in rows:
        pull = ((table[name] - truth[name]) / table[name + "_err"])[ok]
        print(f"{label:<12}{np.median(truth[name]):>16.4f}{np.median(table[name][ok]):>14.4f}{np.median(pull):>13.3f}{np.std(pull):>10.3f}")
    for name in ("x", "y", "flux"):
        pull = ((table[name] - truth[name]) / table[name + "_err"])[ok]
        print(f"{name:<12}{'':>16}{'':>14}{np.median(pull):>13.3f}{np.std(pull):>10.3f}")
    print(f"median flux ratio fit/truth: {np.median(table['flux'][ok] / truth['flux'][ok]):.5f}")
    return 0
