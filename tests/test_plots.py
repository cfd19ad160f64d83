"""Figures drawn from a small simulated run: files, pixel sizes, and plotted values
against the results table (no re-fitting happens in the figures)."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ztfpsf import get_model
from ztfpsf.cli import main as cli_main
from ztfpsf.flags import BAD, Flag
from ztfpsf.plots import (
    FIGSIZE,
    compute_loss,
    compute_maps,
    compute_residuals,
    compute_stars,
    compute_timing,
    load_run,
    make_figures,
    pixel_size,
    plot_loss,
    plot_maps,
    plot_residuals,
    plot_star,
    plot_timing,
    read_results,
    read_timings,
    select_stars,
    total_loss,
)

from simrun import GAIN, READ_NOISE, SKY, STAMP, STEM, ZEROPOINT, true_alpha, true_fwhm  # noqa: E402


@pytest.fixture(scope="module")
def results(sim_run):
    return read_results(sim_run.paths["stars"])


@pytest.fixture(scope="module")
def run(sim_run):
    return load_run(sim_run.paths["stars"])


def png_size(path):
    """(width, height) of a PNG file, from its IHDR chunk."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_png(path, kind):
    assert Path(path).is_file() and Path(path).stat().st_size > 5000
    assert png_size(path) == pixel_size(kind)


# ---------------------------------------------------------------------------------------
# the simulated run itself
# ---------------------------------------------------------------------------------------
def test_simulated_run_is_as_designed(sim_run, results):
    flags = np.asarray(results["flags"])
    assert len(results) == 41
    assert flags[-1] & int(BAD), "the empty catalogue position must have no values"
    assert flags[3] & Flag.MASKED_PIXELS, "the star with a dead pixel must be flagged"
    good = (flags & int(BAD)) == 0
    assert good.sum() == 40
    # the fits found the truth (so the figures show real fits)
    assert np.allclose(results["x"][good], sim_run.truth["x"][good], atol=0.15)
    assert np.allclose(results["fwhm"][good], sim_run.truth["fwhm"][good], rtol=0.12)
    assert results.meta["model"] == "moffat" and results.meta["stamp_size"] == STAMP


def test_read_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_results(tmp_path / "nope.parquet")
    bad = tmp_path / "plain.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1.0]}), bad)
    with pytest.raises(ValueError, match="plain.parquet: no 'ztfpsf' metadata"):
        read_results(bad)
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(ValueError, match="text.parquet: not a Parquet file"):
        read_results(tmp_path / "text.parquet")


def test_matplotlib_imported_only_to_draw(sim_run):
    code = (
        "import sys, ztfpsf.plots, ztfpsf.report\n"
        "from ztfpsf.plots import compute_maps, read_results, compute_timing\n"
        f"t = read_results({str(sim_run.paths['stars'])!r}); compute_maps(t)\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported without drawing'\n"
        "ztfpsf.plots.plot_maps(compute_maps(t))\n"
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------
# per-star figure
# ---------------------------------------------------------------------------------------
def test_select_stars(results):
    rchi2 = np.asarray(results["chi2"]) / np.asarray(results["dof"])
    sel = select_stars(results, ids=[1005], worst=3, typical=2)
    assert sel[0] == (5, "chosen")
    worst = [i for i, r in sel if r == "worst"]
    good = np.nonzero((np.asarray(results["flags"]) & int(BAD)) == 0)[0]
    assert worst == list(good[np.argsort(-rchi2[good])][:3])
    typical = [i for i, r in sel if r == "typical"]
    med = np.median(rchi2[good])
    assert all(abs(rchi2[i] - med) <= np.sort(np.abs(rchi2[good] - med))[1] + 1e-12 for i in typical)
    with pytest.raises(ValueError, match="no star with id 77"):
        select_stars(results, ids=[77])


def test_star_arrays_are_data_minus_model(sim_run, run):
    t = run.table
    stars = compute_stars(t, run.image, [(0, "chosen"), (3, "chosen"), (40, "chosen")], mask=run.mask)
    s0, s3, empty = stars
    x0, y0 = s0["origin"]
    # data is the image at the stamp; the model is the table's parameters rendered again
    assert np.array_equal(s0["data"], sim_run.image.astype(np.float32)[y0:y0 + STAMP, x0:x0 + STAMP])
    m = get_model("moffat", t.meta["integration"])
    r = t[0]
    expect = np.asarray(m.image(r["flux"], r["x"] - x0, r["y"] - y0, (r["fwhm"], r["alpha"]), r["background"], STAMP, STAMP))
    assert np.allclose(s0["model"], expect, rtol=1e-10, atol=1e-9)
    for s in (s0, s3):
        assert np.array_equal(s["residual"], s["data"] - s["model"], equal_nan=True)
        # the fit's own chi2 is recovered from the plotted residual/sigma: nothing re-fitted, same pixels
        assert np.nansum(s["residual_sigma"] ** 2) == pytest.approx(t["chi2"][s["row"]], rel=2e-3)
    # the masked (dead) pixel is NaN in the data and left out of residual/sigma
    dy, dx = sim_run.dead[0] - s3["origin"][1], sim_run.dead[1] - s3["origin"][0]
    assert np.isnan(s3["data"][dy, dx]) and np.isnan(s3["residual_sigma"][dy, dx])
    assert np.isfinite(s3["data"]).sum() == STAMP * STAMP - 1
    # a star without values has no model
    assert np.all(np.isnan(empty["model"])) and empty["flags"] & int(BAD)
    # without gain in the metadata, sigma is the residual's robust scatter: the sky noise here
    no_gain = t.copy()
    no_gain.meta["gain"] = None
    s = compute_stars(no_gain, run.image, [0])[0]
    assert s["noise"].startswith("robust")
    assert np.all(s["sigma"] == s["sigma"][0, 0])
    assert s["sigma"][0, 0] == pytest.approx(np.sqrt(SKY / GAIN + (READ_NOISE / GAIN) ** 2), rel=0.2)


def test_star_figure(tmp_path, run):
    star = compute_stars(run.table, run.image, [(0, "typical")], mask=run.mask)[0]
    fig = plot_star(star, tmp_path / "star.png")
    assert_png(tmp_path / "star.png", "star")
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 4
    for im, key in zip(images, ("data", "model", "residual", "residual_sigma")):
        assert np.array_equal(np.asarray(im.get_array().filled(np.nan)), star[key], equal_nan=True)
    # data, model and residual share one colour scale
    assert len({(im.norm.vmin, im.norm.vmax) for im in images[:3]}) == 1
    assert images[0].norm.vmax == pytest.approx(np.nanmax(star["data"]))
    assert "id=1000" in fig.get_suptitle()


def test_gaussian_results():
    """Another model's columns: the model stamp re-rendered from sigma_x, sigma_y, rho is exact."""
    from astropy.table import Table

    from ztfpsf.plots.maps import star_ellipticity

    g = get_model("gaussian")
    t = Table({"id": [1, 2], "x_init": [20.2, 40.0], "y_init": [30.0, 22.6], "x": [20.3, 39.8], "y": [29.6, 22.9],
               "flux": [5000.0, 800.0], "background": [10.0, 12.0], "sigma_x": [1.2, 0.9], "sigma_y": [0.8, 0.9],
               "rho": [0.2, -0.1], "chi2": [300.0, 280.0], "dof": [283, 283], "flags": [0, 0]})
    t["fwhm"] = np.asarray(g.fwhm((t["sigma_x"], t["sigma_y"], t["rho"])))
    t.meta.update(model="gaussian", integration="erf", stamp_size=STAMP, gain=None)
    image = np.zeros((50, 60))
    for r in t:
        x0, y0 = int(np.floor(r["x_init"] + 0.5)) - 8, int(np.floor(r["y_init"] + 0.5)) - 8
        image[y0:y0 + STAMP, x0:x0 + STAMP] = np.asarray(
            g.image(r["flux"], r["x"] - x0, r["y"] - y0, (r["sigma_x"], r["sigma_y"], r["rho"]), r["background"], STAMP, STAMP))
    stars = compute_stars(t, image, [0, 1])
    assert max(np.abs(s["residual"]).max() for s in stars) < 1e-9
    e1, e2 = star_ellipticity(t)
    ge1, ge2 = g.ellipticity((np.asarray(t["sigma_x"]), np.asarray(t["sigma_y"]), np.asarray(t["rho"])))
    assert np.allclose(e1, ge1) and np.allclose(e2, ge2) and e1[0] > 0.3
    values = compute_maps(t)
    assert values["stars"]["alpha"] is None and np.allclose(values["stars"]["e1"], e1)


# ---------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------
class StandInPSF:
    """Has the methods of ztfpsf.psf.PSFModel that the maps use."""

    def fwhm(self, x, y):
        return true_fwhm(x, y)

    def alpha(self, x, y):
        return true_alpha(x, y)

    def ellipticity(self, x, y, components=False):
        e1, e2 = 0.05 * np.asarray(x) / 300, 0.03 * np.ones_like(np.asarray(y))
        return (e1, e2) if components else np.hypot(e1, e2)


def test_maps_values_and_figure(tmp_path, results):
    values = compute_maps(results)
    good = np.nonzero((np.asarray(results["flags"]) & int(BAD)) == 0)[0]
    s = values["stars"]
    assert np.array_equal(s["row"], good)
    for name in ("x", "y", "fwhm", "alpha"):
        assert np.array_equal(s[name], np.asarray(results[name])[good])
    assert s["e1"] is None and values["model"] is None  # circular Moffat, no PSF file
    fig = plot_maps(values, tmp_path / "maps.png")
    assert_png(tmp_path / "maps.png", "maps")
    sc = fig.axes[0].collections[0]
    assert np.array_equal(sc.get_offsets(), np.column_stack([s["x"], s["y"]]))
    assert np.array_equal(sc.get_array(), s["fwhm"])
    # the fwhm map shows the simulated gradient along x
    assert np.corrcoef(s["x"], s["fwhm"])[0, 1] > 0.8


def test_maps_with_psf_model_and_whiskers(tmp_path, results):
    t = results.copy()
    t["e1"] = np.linspace(-0.1, 0.1, len(t))
    t["e2"] = 0.05
    values = compute_maps(t, StandInPSF(), grid=10)
    m = values["model"]
    X, Y = np.meshgrid(m["x"], m["y"])
    assert np.allclose(m["fwhm"], true_fwhm(X, Y)) and np.allclose(m["alpha"], true_alpha(X, Y))
    assert np.allclose(m["e1"], 0.05 * X / 300) and np.allclose(m["e2"], 0.03)
    assert m["x"][0] == pytest.approx(300 / 20 - 0.5)
    good = values["stars"]["row"]
    assert np.array_equal(values["stars"]["e1"], np.asarray(t["e1"])[good])
    fig = plot_maps(values, tmp_path / "maps_model.png")
    assert_png(tmp_path / "maps_model.png", "maps_model")
    # whiskers: length |e| along the position angle atan2(e2, e1) / 2
    q = fig.axes[2].collections[0]
    e1, e2 = np.asarray(t["e1"])[good], 0.05
    theta = 0.5 * np.arctan2(e2, e1)
    assert np.allclose(q.U, np.hypot(e1, e2) * np.cos(theta)) and np.allclose(q.V, np.hypot(e1, e2) * np.sin(theta))
    assert len(fig.axes[3].images) == 1 and np.allclose(fig.axes[3].images[0].get_array(), m["fwhm"])


# ---------------------------------------------------------------------------------------
# residuals: mean normalised residual, chi2/dof histogram, magnitude residuals
# ---------------------------------------------------------------------------------------
def test_residual_values_and_figure(tmp_path, run):
    t = run.table
    values = compute_residuals(t, run.image, run.mask)
    rchi2 = np.asarray(t["chi2"]) / np.asarray(t["dof"])
    rchi2 = rchi2[np.isfinite(rchi2)]
    counts, _ = np.histogram(rchi2, bins=values["hist_edges"])
    assert np.array_equal(values["hist_counts"], counts) and counts.sum() == rchi2.size
    good = np.nonzero((np.asarray(t["flags"]) & int(BAD)) == 0)[0]
    stars = compute_stars(t, run.image, list(good), mask=run.mask)
    by_flux = np.nanmean([s["residual"] / s["params"]["flux"] for s in stars], axis=0)
    assert values["n_stacked"] == good.size
    assert np.allclose(values["mean_by_flux"], by_flux, equal_nan=True)
    # the right model leaves noise only: the mean of ~40 stars' residual/sigma is ~N(0, 1/sqrt(40))
    assert np.nanstd(values["mean_by_sigma"]) < 0.35
    m = values["mag"]
    fit_mag = ZEROPOINT - 2.5 * np.log10(np.asarray(t["flux"])[good])
    assert np.allclose(m["dmag"] + m["offset"], fit_mag - np.asarray(t["mag"])[good])
    assert abs(m["offset"]) < 0.02  # zero point of the simulation
    fig = plot_residuals(values, tmp_path / "residuals.png")
    assert_png(tmp_path / "residuals.png", "residuals")
    assert np.allclose(fig.axes[0].images[0].get_array(), 100 * values["mean_by_flux"], equal_nan=True)


def test_mean_residual_shows_model_mismatch(run):
    """A too-wide PSF leaves a positive core in the stacked residual."""
    wrong = run.table.copy()
    wrong["fwhm"] = wrong["fwhm"] * 1.15
    values = compute_residuals(wrong, run.image, run.mask)
    c = STAMP // 2
    assert values["mean_by_sigma"][c, c] > 5.0


# ---------------------------------------------------------------------------------------
# loss curves
# ---------------------------------------------------------------------------------------
def test_total_loss_carries_stopped_stars():
    nan = np.nan
    hist = np.array([[10.0, 5.0, nan, nan, nan, 4.0, 3.0],
                     [20.0, 8.0, 6.0, nan, nan, 5.0, nan],
                     [nan] * 7])
    # star 0 stopped after iteration 1: its 5.0 counts until the second pass (column 5)
    assert np.allclose(total_loss(hist), [30, 13, 11, nan, nan, 9, 8], equal_nan=True)


def test_loss_values_and_figure(tmp_path, run):
    hist = run.history
    assert hist.shape[0] == len(run.table)
    values = compute_loss({"lm": hist}, dof=run.table["dof"])
    total = values["total"]["lm"]
    assert total[0] > np.nanmin(total) and np.nanmin(total) > 0
    # the final total equals the sum of the table's chi2 over the fitted stars (same loss)
    good = np.isfinite(np.asarray(run.table["chi2"])) & np.isfinite(hist).any(axis=1)
    last = total[np.isfinite(total)][-1]
    assert last == pytest.approx(np.sum(np.asarray(run.table["chi2"])[good]), rel=2e-3)
    fig = plot_loss(values, tmp_path / "loss.png")
    assert_png(tmp_path / "loss.png", "loss")
    line = fig.axes[0].lines[0]
    assert np.array_equal(line.get_ydata(), total, equal_nan=True) and fig.axes[0].get_xscale() == "log"


# ---------------------------------------------------------------------------------------
# timing figure from benchmark JSON
# ---------------------------------------------------------------------------------------
def _bench(path, device, backend, rows):
    doc = {"machine": "test", "device": device, "rows": [
        {"method": m, "backend": backend, "dtype": "float32", "model": "moffat", "n": n, "seconds": s, "stars_per_s": n / s}
        for m, n, s in rows]}
    path.write_text(json.dumps(doc))
    return path


def test_timing_values_and_figure(tmp_path):
    cpu = _bench(tmp_path / "cpu.json", "2-core CPU", "cpu",
                 [("lm", 100, 0.5), ("lm", 1000, 2.0), ("lm", 1000, 3.0), ("adam", 100, 4.0), ("adam", 1000, 30.0)])
    gpu = _bench(tmp_path / "gpu.json", "H100", "gpu", [("lm", 100, 0.05), ("lm", 1000, 0.1), ("lm", 10000, 0.4)])
    values = compute_timing(read_timings([cpu, gpu]))
    s = values["series"]
    assert set(s) == {"lm cpu float32 [2-core CPU]", "adam cpu float32 [2-core CPU]", "lm gpu float32 [H100]"}
    lm = s["lm cpu float32 [2-core CPU]"]
    assert np.array_equal(lm["n"], [100, 1000]) and np.allclose(lm["seconds"], [0.5, 2.5])
    assert np.allclose(lm["stars_per_s"], [200, (500 + 1000 / 3) / 2]) and lm["repeats"].tolist() == [1, 2]
    assert values["bar_n"] == 1000 and values["bar"]["lm gpu float32 [H100]"] == (1000, 0.1)
    fig = plot_timing(values, tmp_path / "timing.png")
    assert_png(tmp_path / "timing.png", "timing")
    ax_t, ax_r, ax_b = fig.axes[:3]
    gpu_s = s["lm gpu float32 [H100]"]
    assert np.allclose(ax_t.lines[2].get_ydata(), gpu_s["seconds"]) and np.allclose(ax_t.lines[2].get_xdata(), [100, 1000, 10000])
    assert np.allclose(ax_r.lines[2].get_ydata(), [2000, 10000, 25000])
    assert np.allclose(sorted(p.get_width() for p in ax_b.patches), [0.1, 2.5, 30.0])


def test_timing_file_errors(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"status": "ok"}))
    with pytest.raises(ValueError, match="s.json: not a benchmark timings file"):
        read_timings(tmp_path / "s.json")
    (tmp_path / "r.json").write_text(json.dumps({"rows": [{"method": "lm", "n": 3}]}))
    with pytest.raises(ValueError, match="r.json: row 0 lacks backend, seconds"):
        read_timings(tmp_path / "r.json")


# ---------------------------------------------------------------------------------------
# all figures of a run, and the CLI
# ---------------------------------------------------------------------------------------
def test_make_figures_every_kind(tmp_path, sim_run):
    made = make_figures(sim_run.paths["stars"], out_dir=tmp_path, worst=2, typical=1, ids=["1040"])
    assert set(made) == {"stars", "maps", "residuals", "loss"}
    for kind in ("maps", "residuals", "loss"):
        assert made[kind] == [tmp_path / f"{STEM}.{kind}.png"]
        assert_png(made[kind][0], kind)
    assert len(made["stars"]) == 4 and tmp_path / f"{STEM}.star-1040.png" in made["stars"]
    for p in made["stars"]:
        assert_png(p, "star")
    with pytest.raises(ValueError, match="per-star figures need the image: .*nothere.fits: no such image"):
        make_figures(sim_run.paths["stars"], out_dir=tmp_path, kinds=["stars"], image=tmp_path / "nothere.fits")
    with_model = make_figures(sim_run.paths["stars"], out_dir=tmp_path / "m", kinds=["maps"], psf=StandInPSF())
    assert_png(with_model["maps"][0], "maps_model")
    with pytest.raises(FileNotFoundError, match="nopsf.fits: no such PSF model file"):
        make_figures(sim_run.paths["stars"], out_dir=tmp_path, kinds=["maps"], psf=tmp_path / "nopsf.fits")


def test_cli_plot(tmp_path, sim_run, capsys):
    rc = cli_main(["plot", str(sim_run.paths["stars"]), "--kind", "stars", "--ids", "1001", "1002", "--out", str(tmp_path),
                   "--image", str(sim_run.image_path)])
    assert rc == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / f"{STEM}.star-1001.png"), str(tmp_path / f"{STEM}.star-1002.png")]
    assert_png(out[0], "star")
    assert cli_main(["plot", str(sim_run.paths["stars"]), "--ids", "99"]) == 2
    assert "no star with id 99" in capsys.readouterr().err
    assert cli_main(["plot", str(tmp_path / "missing.stars.parquet")]) == 2
    assert "missing.stars.parquet: no such results file" in capsys.readouterr().err
    bench = _bench(tmp_path / "b.json", "cpu", "cpu", [("lm", 10, 0.1), ("lm", 100, 0.5)])
    assert cli_main(["plot", str(bench), "--out", str(tmp_path)]) == 0
    assert_png(tmp_path / "timing.png", "timing")
    assert cli_main(["plot", str(sim_run.paths["summary"])]) == 2
    assert "not a benchmark timings file" in capsys.readouterr().err


def test_figure_sizes_are_fixed(tmp_path, run):
    """A figure's pixel size does not depend on what it holds (no 'tight' bounding box, no
    layout that grows): a typical star, the star without values, and one whose id, values
    and flags make very long labels all give FIGSIZE x 100 dpi; so do maps without and
    with a PSF model, and a loss figure of one star or all."""
    expect = {kind: (int(round(w * 100)), int(round(h * 100))) for kind, (w, h) in FIGSIZE.items()}
    assert expect["star"] == (1600, 340) and all(pixel_size(kind) == size for kind, size in expect.items())
    t = run.table
    typical, empty = compute_stars(t, run.image, [0, len(t) - 1], mask=run.mask)
    loud = dict(typical, id="x" * 120, flags=int(sum(Flag)), reason="chosen")
    loud["params"] = dict(typical["params"], flux=1.234567e12, x=-123456.789)
    for key in ("data", "model", "residual"):
        loud[key] = typical[key] * 1e9 - 5e12
    drawn = []
    for i, star in enumerate((typical, empty, loud)):
        plot_star(star, tmp_path / f"star{i}.png")
        drawn.append((tmp_path / f"star{i}.png", "star"))
    plot_maps(compute_maps(t), tmp_path / "maps.png")
    plot_maps(compute_maps(t, StandInPSF(), grid=5), tmp_path / "maps_model.png")
    drawn += [(tmp_path / "maps.png", "maps"), (tmp_path / "maps_model.png", "maps_model")]
    for k, hist in enumerate((run.history[:1], run.history)):
        plot_loss(compute_loss({"lm": hist}), tmp_path / f"loss{k}.png")
        drawn.append((tmp_path / f"loss{k}.png", "loss"))
    for path, kind in drawn:
        assert png_size(path) == expect[kind], (path.name, png_size(path))
