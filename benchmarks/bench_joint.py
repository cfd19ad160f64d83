"""Benchmark: joint PSF fit (spatially varying, Schur-complement LM) vs independent fits.

Simulates N stars (default 2000) over a 3072x3080 ZTF quadrant with a PSF whose fwhm,
alpha (and ellipticity) vary quadratically, then times, on the same stamps:

* ``fit_psf(mode='varying', degree=D)``: starting values, rounds of joint LM with outlier
  clipping and re-weighting, reserve stars measured with the final PSF;
* ``fit_stamps``: every star its own shape (the default LM, the same noise model).

Compile time = first call - median of the next ones (the persistent compilation cache is
switched off unless --cache). Prints a markdown table and the PSF accuracy.

    python benchmarks/bench_joint.py [--nstars 2000] [--degree 2] [--models moffat elliptical_moffat]
"""

import argparse
import os
import sys
import time

if "--cache" not in sys.argv:
    os.environ["ZTFPSF_CACHE_DIR"] = "off"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ztfpsf import fit_stamps  # noqa: E402
from ztfpsf.flags import BAD, Flag  # noqa: E402
from ztfpsf.psf import fit_psf  # noqa: E402
from ztfpsf.models import get_model  # noqa: E402
from ztfpsf.simulate import mag_to_flux  # noqa: E402

NX, NY, SIZE = 3072, 3080, 17
GAIN, RN, SKY = 6.2, 8.0, 150.0


def true_shape(model, x, y):
    xn, yn = 2 * (x + 0.5) / NX - 1, 2 * (y + 0.5) / NY - 1
    s = {"fwhm": 2.2 + 0.25 * xn + 0.15 * yn + 0.08 * xn * yn - 0.1 * xn**2, "alpha": 3.0 + 0.3 * yn - 0.2 * xn**2}
    if model == "elliptical_moffat":
        s["e1"] = 0.02 + 0.05 * xn
        s["e2"] = 0.03 * yn - 0.01 * xn
    return s


def simulate(n, model, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(10, NX - 11, n), rng.uniform(10, NY - 11, n)
    flux = mag_to_flux(rng.uniform(14.0, 18.5, n))
    origin = np.stack([np.round(x) - SIZE // 2, np.round(y) - SIZE // 2], axis=1)
    shape = true_shape(model, x, y)
    g = get_model(model, "gl4")
    img = np.asarray(g.image(jnp.asarray(flux), jnp.asarray(x - origin[:, 0]), jnp.asarray(y - origin[:, 1]),
                             tuple(jnp.asarray(shape[k]) for k in g.shape_names), jnp.full(n, SKY), SIZE, SIZE))
    data = (rng.poisson(img * GAIN) + rng.normal(0, RN, img.shape)) / GAIN
    return data, dict(x=x, y=y, origin=origin, **shape)


def timed(fn, repeat):
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, first, float(np.median(times)), float(np.min(times))


def main():
    import ztfpsf

    ztfpsf.configure()  # a benchmark owns its process: float64, all cores, compilation cache
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nstars", type=int, default=2000)
    p.add_argument("--degree", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["moffat", "elliptical_moffat"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cache", action="store_true", help="keep the persistent compilation cache on")
    args = p.parse_args()

    devices = jax.devices()
    print(f"# joint PSF fit: {args.nstars} stars, degree {args.degree}, {args.dtype}; "
          f"{len(devices)} {devices[0].platform} device(s), {os.cpu_count()} cores visible, "
          f"load average {os.getloadavg()[0]:.1f}")
    print()
    print("| model | fit | compile [s] | compute [s] (median) | best [s] | ratio joint/independent | joint iterations |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    for model in args.models:
        data, truth = simulate(args.nstars, model)
        kw = dict(gain=GAIN, read_noise=RN, origin=truth["origin"], dtype=args.dtype)
        (psf, table, stats), j_first, j_med, j_min = timed(
            lambda: fit_psf(data, image_shape=(NY, NX), model=model, mode="varying", degree=args.degree, **kw), args.repeat)
        ind, i_first, i_med, i_min = timed(lambda: fit_stamps(data, model=model, **kw), args.repeat)
        ratio = j_med / i_med
        print(f"| {model} | joint varying | {j_first - j_med:.1f} | {j_med:.3f} | {j_min:.3f} | {ratio:.2f} | {stats['n_iter']} in {stats['rounds']} rounds |")
        print(f"| {model} | independent | {i_first - i_med:.1f} | {i_med:.3f} | {i_min:.3f} | 1 | median {np.median(ind['n_iter']):.0f} per star |")
        ok = (np.asarray(table["flags"]) & int(BAD)) == 0
        rel = psf.fwhm(truth["x"][ok], truth["y"][ok]) / truth["fwhm"][ok] - 1
        good = np.asarray(ind["flags"]) == 0
        rel_ind = ind["fwhm"][good] / truth["fwhm"][good] - 1
        notes.append(
            f"{model}: PSF fwhm map rms error {100 * np.sqrt(np.mean(rel**2)):.2f} % (independent per-star fwhm: "
            f"{100 * np.sqrt(np.mean(rel_ind**2)):.2f} % rms scatter); chi2/dof train {stats['chi2_dof_train']:.4f}, "
            f"reserve {stats['chi2_dof_reserve']:.4f}; {stats['n_fit']} fitted, {stats['n_reserve']} reserve, "
            f"{int(((np.asarray(table['flags']) & int(Flag.OUTLIER)) != 0).sum())} outliers"
        )
    print()
    for line in notes:
        print("- " + line)


if __name__ == "__main__":
    main()
