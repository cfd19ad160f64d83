"""The joint PSF fit's bookkeeping: sparse images keep their star fits, the final state
agrees with the flags, singular covariances are said, extrapolation is flagged."""

import json
import logging

import numpy as np
import pytest

from ztfpsf.config import FitConfig
from ztfpsf.flags import Flag
from ztfpsf.photometry import photometry
from ztfpsf.pipeline import process_image
from ztfpsf.psf import fit_psf
from ztfpsf.simulate import simulate_quadrant

from test_joint import GAIN, NX, NY, RN, simulate


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """A small image with ~30 selectable stars: too few for a degree-2 varying PSF."""
    return simulate_quadrant(tmp_path_factory.mktemp("sparse"), seed=3, size=(700, 700), nstars=700, qid=1, ccd=3)


def _summary(folder, paths):
    stem = paths["sciimg"].name[: -len(".fits")]
    return json.loads((folder / f"{stem}.summary.json").read_text())


def test_sparse_image_lowers_the_degree_and_says_so(sparse, tmp_path):
    summary = process_image(sparse["sciimg"], FitConfig(psf="varying", degree=4, psf_model="analytic",
                                                        catalog=str(sparse["catalog"])), tmp_path)
    stats = summary["psf_stats"]
    n = summary["n_fitted"]
    assert 5 <= n < 3 * 15 * 2  # fewer than degree 4 needs (15 terms x 2 shape parameters x 3)
    assert stats["degree_requested"] == 4 and stats["degree"] < 4
    assert n >= 3 * (stats["degree"] + 1) * (stats["degree"] + 2) // 2 * 2
    assert summary["status"] == "ok" and "psf" in summary["outputs"]


def test_too_few_stars_keep_the_independent_fits(sparse, tmp_path, caplog):
    # a magnitude range that leaves a handful of stars: not even one shared shape
    config = FitConfig(psf="shared", psf_model="analytic", catalog=str(sparse["catalog"]), mag_range=(14.0, 15.3))
    with caplog.at_level(logging.WARNING):
        summary = process_image(sparse["sciimg"], config, tmp_path)
    assert 0 < summary["n_fitted"] < 5
    assert summary["status"] == "ok" and "psf" not in summary["outputs"]
    assert "usable stars" in summary["psf_stats"]["error"]
    assert summary["n_converged"] > 0  # the star fits are there
    assert any("independent star fits are kept" in r.message for r in caplog.records)


@pytest.fixture(scope="module")
def clustered():
    """Stars only in one corner of the image: the degree-2 polynomial is extrapolated over
    the rest, and its covariance is near singular."""
    data, truth = simulate(500, seed=9)
    corner = (truth["x"] < 0.3 * NX) & (truth["y"] < 0.3 * NY)
    keep = np.flatnonzero(corner)
    psf, table, stats = fit_psf(data[keep], gain=GAIN, read_noise=RN, origin=truth["origin"][keep],
                                image_shape=(NY, NX), mode="varying", degree=1, reserve=0.0)
    return psf, table, stats, {k: (v[keep] if np.ndim(v) else v) for k, v in truth.items()}


def test_positions_outside_the_stars_hull_are_flagged(clustered):
    psf, table, stats, truth = clustered
    inside = psf.supported(truth["x"], truth["y"])
    assert inside.mean() > 0.85  # the hull of the fitted positions; truth differs by the errors
    assert not psf.supported(0.9 * NX, 0.9 * NY) and psf.supported(np.median(truth["x"]), np.median(truth["y"]))
    flagged = (np.asarray(table["flags"]) & int(Flag.EXTRAPOLATED)) != 0
    np.testing.assert_array_equal(flagged, ~psf.supported(table["x"], table["y"]))
    image = np.random.default_rng(0).normal(150.0, 2.0, (NY, NX)).astype(np.float32)
    t = photometry(image, psf, np.array([[0.9 * NX, 0.9 * NY], [np.median(truth["x"]), np.median(truth["y"])]]),
                   gain=GAIN, read_noise=RN)
    assert (t["flags"][0] & int(Flag.EXTRAPOLATED)) and not (t["flags"][1] & int(Flag.EXTRAPOLATED))


def test_final_state_holds_no_flagged_star():
    """Outliers clipped in the last allowed round are refitted without, never left in."""
    data, truth = simulate(300, varying=False, seed=6)
    rng = np.random.default_rng(2)
    for i in rng.choice(300, 12, replace=False):  # cosmic rays
        data[i, 8 + rng.integers(-3, 4), 8 + rng.integers(2, 5)] += 4000.0
    psf, table, stats = fit_psf(data, gain=GAIN, read_noise=RN, origin=truth["origin"], image_shape=(NY, NX),
                                mode="shared", max_rounds=1, reserve=0.0)
    flags = np.asarray(table["flags"])
    outlier = (flags & int(Flag.OUTLIER)) != 0
    assert outlier.sum() >= 10 and stats["n_outlier"] == outlier.sum()
    assert stats["converged"] and not np.any(flags[~outlier] & int(Flag.NOT_CONVERGED))
    assert stats["n_fit"] == int((~outlier).sum())
