"""The quadrant's PSF on real ZTF pixels (the committed cut, tests/data/ztf/PROVENANCE.md).

A Moffat leaves real ZTF stars at chi2/dof ~ 2 and more; the hybrid PSF (the Moffat plus
its residual surface) fits them near their noise, on stars held out of the fit too, and
its flux scale matches aperture photometry of the same stars.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from ztfpsf.config import FitConfig
from ztfpsf.pipeline import process_image
from ztfpsf.psf import PSFModel

CUT = Path(__file__).parent / "data" / "ztf" / "cut1024" / "ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits.gz"
STEM = "ztf_20200924431759_000655_zr_c13_o_q3_sciimg"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for kind in ("analytic", "hybrid"):
        folder = tmp_path_factory.mktemp(kind)
        process_image(CUT, FitConfig(psf="shared", psf_model=kind), folder)
        out[kind] = (json.loads((folder / f"{STEM}.summary.json").read_text()), PSFModel.read(folder / f"{STEM}.psf.fits"),
                     folder)
    return out


def test_hybrid_fits_real_stars_near_their_noise(runs):
    sa, sh = runs["analytic"][0]["psf_stats"], runs["hybrid"][0]["psf_stats"]
    assert not sa["hybrid"] and sh["hybrid"]
    # measured on this cut: analytic 2.3 train / 1.9 reserve, hybrid 1.3 / 1.3
    assert sa["chi2_dof_train"] > 1.8
    assert sh["chi2_dof_train"] < 1.5 and sh["chi2_dof_reserve"] < 1.6
    assert sh["chi2_dof_train"] < 0.7 * sa["chi2_dof_train"]
    assert sh["n_fit"] >= 0.75 * sh["n_stars"]  # the bright stars are fitted, not clipped away


def test_flux_scale_matches_the_14px_aperture(runs):
    summary, psf, _ = runs["hybrid"]
    scale = summary["flux_scale"]
    assert psf.flux_radius == 7.0 and scale["radius"] == 7.0
    assert scale["apcorr_n"] >= 20
    # PSF minus 14 px aperture magnitude of the bright stars: ZTF's own APCOR6 is +0.0046
    assert abs(scale["apcorr"]) < 3 * scale["apcorr_err"] + 0.005
    assert scale["header_apcor"] == pytest.approx(0.004617)


def test_real_psf_stamps_hold_their_flux_at_every_phase(runs):
    psf = runs["hybrid"][1]
    phases = (np.arange(4) + 0.5) / 4 - 0.5
    px, py = np.meshgrid(phases, phases)
    sums = psf.stamp(500.0 + px.ravel(), 500.0 + py.ravel(), shape=(17, 17)).sum(axis=(1, 2))
    assert np.ptp(sums) / np.mean(sums) < 1e-3
    assert 0.99 < np.mean(sums) < 1.03  # unit flux within 7 px; the 17x17 stamp adds its corners


def test_psf_figure_shows_the_real_residual_surface(runs, tmp_path):
    from PIL import Image

    from ztfpsf.plots import _style
    from ztfpsf.plots.psf import compute_psf, plot_psf

    summary, psf, _ = runs["hybrid"]
    values = compute_psf(psf, summary["psf_stats"]["reserve_by_snr"])
    # the real stars' departure from the Moffat: percents of the peak, both signs
    assert values["surface"].max() > 0.5 and values["surface"].min() < -0.5
    np.testing.assert_allclose(values["stamp"], psf.stamp(*[0.5 * (a + b) for a, b in (psf.bounds[:2], psf.bounds[2:])]))
    path = plot_psf(values, tmp_path / "psf.png")
    # the pipeline's hybrid has the surface's flux term: its panel makes the figure wider
    assert psf.residual_flux == 1 and values["flux_change"] is not None
    assert Image.open(path).size == _style.pixel_size("psf_flux")
    analytic = compute_psf(runs["analytic"][1])
    assert analytic["surface"] is None


def test_figures_render_each_star_with_the_runs_psf(runs):
    """The residual stack of a hybrid run, drawn with its PSF file (surface and flux scale
    included), is flatter than the same table re-rendered as a bare Moffat."""
    from ztfpsf.plots.make import load_run
    from ztfpsf.plots.residuals import compute_residuals

    run = load_run(runs["hybrid"][2] / f"{STEM}.stars.parquet")
    assert run.psf_model is not None and run.table.meta["psf"] == "shared"
    assert np.all(np.asarray(run.table["read_noise"]) > 9.0)  # the measured sky's effective read noise
    with_psf = compute_residuals(run.table, run.image, run.mask, psf=run.psf_model)
    bare = compute_residuals(run.table, run.image, run.mask)
    worst = lambda v: np.nanmax(np.abs(v["mean_by_flux"]))
    assert worst(with_psf) < 0.5 * worst(bare)
    assert worst(with_psf) < 0.01  # mean residual within 1 % of the flux per pixel
