"""Throughput of the fitting core, every method against the same simulated Moffat stamps.

Prints stars/s for N = 10 ... 30,000 for ``lm`` (float32, float64), ``tncg``, ``adam``,
``scipy`` (per-star BFGS) and two outside baselines on the same stamps: a per-star
``scipy.optimize.least_squares`` loop on a numpy model, and photutils' ``PSFPhotometry``
with the shape held fixed. Ratios are measured in the same run. Then the compile time of
the ``lm`` program, cold (empty persistent cache) and warm (populated cache), each in a
fresh process. Results also go to a JSON file that ``ztfpsf plot --kind timing`` draws.

    python benchmarks/bench_fit.py                    # CPU, slow baselines up to N=5000
    python benchmarks/bench_fit.py --backend gpu --json benchmarks/results/gpu.json
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

import ztfpsf
from ztfpsf.simulate import simulate_stamps

SIZES = (10, 100, 500, 5000, 30000)


def timed(fn, repeats):
    fn()  # compile / warm up
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- outside baselines ---------------------------------------------------------------
def _moffat_taylor4_numpy(X, Y, fwhm, alpha):
    """The same pixel-integrated Moffat as ztfpsf's default, in numpy (one star)."""
    q = 4.0 * np.expm1(np.log(2.0) / alpha) / fwhm**2
    X2, Y2 = X * X, Y * Y
    Q = q * (X2 + Y2)
    w = 1.0 + Q
    g = [w**-alpha]
    for k in range(1, 5):
        g.append(g[-1] * (-(alpha + k - 1)) / w)
    box = g[0] + q * (g[1] + Q * g[2]) / 6.0 + q * q * (g[2] * 7 / 360 + Q * (g[3] * 7 / 180 + g[4] * Q / 120) + g[4] * q * q * X2 * Y2 / 90)
    return (alpha - 1.0) * q / np.pi * box


def least_squares_loop(data, var):
    """The obvious Python approach: scipy least_squares star after star (finite differences)."""
    from scipy.optimize import least_squares

    ny, nx = data.shape[1:]
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    out = []
    for d, v in zip(data, var):
        sig = np.sqrt(v)
        bg = np.median(np.concatenate([d[0], d[-1]]))
        p0 = [max(d.sum() - bg * d.size, 1.0), nx // 2, ny // 2, 2.0, 3.0, bg]

        def resid(p, d=d, sig=sig):
            return ((p[0] * _moffat_taylor4_numpy(xx - p[1], yy - p[2], p[3], p[4]) + p[5] - d) / sig).ravel()

        sol = least_squares(resid, p0, bounds=([-np.inf, 0, 0, 0.3, 1.05, -np.inf], [np.inf, nx, ny, nx, 30, np.inf]))
        jac = sol.jac
        np.linalg.inv(jac.T @ jac)  # uncertainties, as ours include them
        out.append(sol.x)
    return np.array(out)


def photutils_fixed_shape(data, var, truth):
    """photutils PSFPhotometry (flux, x, y free; Moffat shape and background held fixed)."""
    from astropy.table import Table
    from photutils.psf import MoffatPSF, PSFPhotometry

    n, s, _ = data.shape
    side = int(np.ceil(np.sqrt(n)))
    image = np.zeros((side * s, side * s))
    err = np.ones_like(image)
    rows, cols = np.divmod(np.arange(n), side)
    for i in range(n):
        image[rows[i] * s:(rows[i] + 1) * s, cols[i] * s:(cols[i] + 1) * s] = data[i] - truth["background"][i]
        err[rows[i] * s:(rows[i] + 1) * s, cols[i] * s:(cols[i] + 1) * s] = np.sqrt(var[i])
    alpha = float(np.median(truth["alpha"]))
    gamma = float(np.median(truth["fwhm"])) / (2 * np.sqrt(2 ** (1 / alpha) - 1))
    psf = MoffatPSF(alpha=gamma, beta=alpha)
    init = Table({"x": cols * s + truth["x"], "y": rows * s + truth["y"], "flux": truth["flux"]})
    phot = PSFPhotometry(psf, (s, s), aperture_radius=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return phot(image, error=err, init_params=init)


# ---- compile time in fresh processes ---------------------------------------------------
_PROBE = """
import time, numpy as np, ztfpsf
ztfpsf.configure()
from ztfpsf.simulate import simulate_stamps
d, v, _ = simulate_stamps({n}, seed=1)
t0 = time.perf_counter(); ztfpsf.fit_stamps(d, v, backend="{backend}"); t1 = time.perf_counter()
ztfpsf.fit_stamps(d, v, backend="{backend}"); t2 = time.perf_counter()
print((t1 - t0) - (t2 - t1), t1 - t0)
"""


def compile_times(n, backend):
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, ZTFPSF_CACHE_DIR=cache)
        out = []
        for _ in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", _PROBE.format(n=n, backend=backend)], env=env, capture_output=True, text=True, check=True)
            out.append([float(v) for v in res.stdout.split()])
    return out


def one_device_lm(n, backend):
    """lm float32 throughput with a single CPU device, to show what the second core adds."""
    probe = _PROBE.format(n=n, backend=backend)
    env = dict(os.environ, ZTFPSF_CPU_DEVICES="1")
    res = subprocess.run([sys.executable, "-c", probe.replace("print((t1 - t0) - (t2 - t1), t1 - t0)", "print(t2 - t1)")], env=env, capture_output=True, text=True, check=True)
    return float(res.stdout.split()[-1])


def main():
    ztfpsf.configure()  # a benchmark owns its process: float64, all cores, compilation cache
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--slow-max", type=int, default=5000, help="largest N for scipy, adam and the outside baselines")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--methods", nargs="+", default=["lm32", "lm64", "tncg", "adam", "scipy", "least_squares", "photutils"])
    ap.add_argument("--json", default=None, help="write the rows here (default benchmarks/results/<backend>.json)")
    ap.add_argument("--no-compile", action="store_true", help="skip the cold/warm compile measurement")
    args = ap.parse_args()

    devices = ztfpsf.fitting.batching.select_devices(args.backend)
    device = f"{devices[0].platform}: {getattr(devices[0], 'device_kind', '')} x{len(devices)}"
    nmax = max(args.sizes)
    data, var, truth = simulate_stamps(nmax, seed=1)
    print(f"ztfpsf {ztfpsf.__version__}, jax {ztfpsf._jax.jax.__version__}, device {device}, {os.cpu_count()} CPU cores")
    print("Moffat stamps 17x17, mag 14-18, uncertainties included; best of repeats after a warm-up\n")

    methods = {
        "lm32": ("lm", "float32", lambda d, v, t: ztfpsf.fit_stamps(d, v, dtype="float32", backend=args.backend)),
        "lm64": ("lm", "float64", lambda d, v, t: ztfpsf.fit_stamps(d, v, dtype="float64", backend=args.backend)),
        "tncg": ("tncg", "float32", lambda d, v, t: ztfpsf.fit_stamps(d, v, method="tncg", backend=args.backend)),
        "adam": ("adam", "float32", lambda d, v, t: ztfpsf.fit_stamps(d, v, method="adam", backend=args.backend)),
        "scipy": ("scipy", "float64", lambda d, v, t: ztfpsf.fit_stamps(d, v, method="scipy", dtype="float64", backend=args.backend)),
        "least_squares": ("least_squares", "float64", lambda d, v, t: least_squares_loop(d, v)),
        "photutils": ("photutils", "float64", lambda d, v, t: photutils_fixed_shape(d, v, t)),
    }
    slow = {"adam", "scipy", "least_squares", "photutils"}
    backend = devices[0].platform
    rows = []
    print(f"{'method':<16}" + "".join(f"{n:>10}" for n in args.sizes) + "   (stars/s)")
    for key in args.methods:
        name, dtype, fn = methods[key]
        line = f"{key:<16}"
        for n in args.sizes:
            if key in slow and n > args.slow_max:
                line += f"{'-':>10}"
                continue
            d, v, t = data[:n], var[:n], truth[:n]
            seconds = timed(lambda: fn(d, v, t), repeats=1 if n >= 5000 or key in slow else 3)
            rows.append({"method": name, "backend": backend if name in ("lm", "tncg", "adam", "scipy") else "cpu", "dtype": dtype, "model": "moffat", "n": n, "seconds": seconds, "stars_per_s": n / seconds})
            line += f"{n / seconds:>10.0f}"
        print(line, flush=True)

    def rate(method, dtype, n):
        r = [row["stars_per_s"] for row in rows if row["method"] == method and row["dtype"] == dtype and row["n"] == n]
        return r[0] if r else None

    common = max(n for n in args.sizes if n <= args.slow_max)
    lm = rate("lm", "float32", common)
    print(f"\nratios at N = {common} (lm float32 / other):")
    for method, dtype in (("least_squares", "float64"), ("photutils", "float64"), ("scipy", "float64"), ("adam", "float32"), ("tncg", "float32"), ("lm", "float64")):
        other = rate(method, dtype, common)
        if lm and other:
            print(f"  lm float32 / {method + ' ' + dtype:<24} {lm / other:8.1f}x")
    if backend == "cpu" and nmax >= 30000:
        one = one_device_lm(30000, args.backend)
        two = rate("lm", "float32", 30000)
        print(f"\nlm float32 at N = 30000: {two:.0f} stars/s on all cores vs {30000 / one:.0f} with one CPU device ({two * one / 30000:.2f}x)")
    if not args.no_compile:
        (cold, cold_first), (warm, warm_first) = compile_times(30000 if nmax >= 30000 else nmax, args.backend)
        print(f"\ncompile overhead of the lm program (fresh process, N = {min(nmax, 30000)}): cold {cold:.2f} s, warm cache {warm:.2f} s")
        print(f"first call in total: cold {cold_first:.2f} s, warm cache {warm_first:.2f} s")
    out = args.json or os.path.join(os.path.dirname(__file__), "results", f"{backend}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": platform.node(), "device": device, "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
    print(f"\nrows written to {out}")


if __name__ == "__main__":
    main()
