"""The PSF-fit catalogue (``ztfpsf catalog``): every source measured with the PSF,
neighbours fitted together, on a crowded simulated image with known truth and on the
committed real ZTF cut."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from astropy.io import fits
from scipy.spatial import cKDTree

from ztfpsf.catalog import CatalogOptions, psf_catalog
from ztfpsf.flags import Flag
from ztfpsf.io.fits import Exposure, read_exposure
from ztfpsf.models import get_model
from ztfpsf.psf import PSFModel
from ztfpsf.psf.groups import SIZES, make_groups
from ztfpsf.simulate import mag_to_flux

NY = NX = 640
GAIN, RN, SKY, ZP, SAT = 6.2, 8.0, 150.0, 26.2, 50000.0
HALF = 20  # stars rendered out to 20 px
# the truth: a Moffat whose log fwhm and log(alpha - 1) vary linearly over the image (fwhm ~2.0-2.4 px)
TRUE_PSF = PSFModel("moffat", [[np.log(2.2), 0.05, -0.04], [np.log(2.0), 0.1, 0.05]], (-0.5, NX - 0.5, -0.5, NY - 0.5),
                    degree=1, image_shape=(NY, NX))
FWHM = 2.2
CUT = Path(__file__).parent / "data" / "ztf" / "cut1024"
CUT_IMAGE = CUT / "ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits.gz"
CUT_PSF = CUT / "ztf_20200924431759_000655_zr_c13_o_q3_sciimg.psf.fits"


def _positions(rng):
    """120 pairs 1.5-4 FWHM apart and field stars, no two closer than 1.5 FWHM."""
    n_pairs = 120
    xp, yp = rng.uniform(15, NX - 15, n_pairs), rng.uniform(15, NY - 15, n_pairs)
    sep, ang = rng.uniform(1.5, 4.0, n_pairs) * FWHM, rng.uniform(0, 2 * np.pi, n_pairs)
    x = list(np.concatenate([xp, xp + sep * np.cos(ang)]))
    y = list(np.concatenate([yp, yp + sep * np.sin(ang)]))
    keep = np.ones(len(x), bool)  # pairs too close to another pair: drop both members of the later one
    tree = cKDTree(np.column_stack([x, y]))
    for i, j in sorted(tree.query_pairs(1.5 * FWHM)):
        if j % n_pairs != i % n_pairs:
            keep[[j % n_pairs, j % n_pairs + n_pairs]] = False
    x, y = list(np.asarray(x)[keep]), list(np.asarray(y)[keep])
    n_pair_stars = len(x)
    tree = cKDTree(np.column_stack([x, y]))
    while len(x) < n_pair_stars + 800:  # field stars (~2.5x the real quadrant's density in all)
        cx, cy = rng.uniform(3, NX - 3), rng.uniform(3, NY - 3)
        if tree.query([cx, cy])[0] >= 1.5 * FWHM and (len(x) == n_pair_stars or np.min(np.hypot(np.array(x[n_pair_stars:]) - cx, np.array(y[n_pair_stars:]) - cy)) >= 1.5 * FWHM):
            x.append(cx)
            y.append(cy)
    return np.array(x), np.array(y), n_pair_stars


def _render(x, y, flux, rng):
    """Noisy image: 4x4 Gauss-Legendre pixel integration (not the fit's), sky, Poisson and read noise, saturation."""
    g = get_model("moffat", "gl4")
    s = TRUE_PSF.shape(x, y)
    size = 2 * HALF + 1
    x0, y0 = np.floor(x + 0.5).astype(int) - HALF, np.floor(y + 0.5).astype(int) - HALF
    img = np.full((NY + 2 * size, NX + 2 * size), SKY)
    yy, xx = np.mgrid[0:size, 0:size]
    for a in range(0, len(x), 1024):
        sl = slice(a, a + 1024)
        pad = lambda v: jnp.asarray(np.pad(v[sl], (0, 1024 - len(v[sl])), mode="edge"))
        st = np.asarray(g.image(pad(flux), pad(x - x0), pad(y - y0), (pad(s["fwhm"]), pad(s["alpha"])), 0.0, size, size))
        np.add.at(img, (y0[sl, None, None] + yy + size, x0[sl, None, None] + xx + size), st[: len(x[sl])])
    img = img[size:-size, size:-size]
    noisy = (rng.poisson(img * GAIN) + rng.normal(0, RN, img.shape)) / GAIN
    return np.minimum(noisy, SAT).astype(np.float32)


def _moffat_within(fwhm, alpha, radius):
    gamma2 = fwhm**2 / (4.0 * (2.0 ** (1.0 / alpha) - 1.0))
    return 1.0 - (1.0 + radius**2 / gamma2) ** (1.0 - alpha)


@pytest.fixture(scope="module")
def crowded():
    rng = np.random.default_rng(11)
    x, y, n_pair = _positions(rng)
    mag = np.concatenate([rng.uniform(15.0, 19.0, n_pair), 14.0 + 6.5 * rng.power(2.0, len(x) - n_pair)])
    mag[n_pair:n_pair + 3] = 10.5  # three saturated stars
    flux = mag_to_flux(mag, ZP)
    data = _render(x, y, flux, rng)
    exp = Exposure(path=Path("crowded.fits"), data=data, mask=np.zeros(data.shape, bool), saturated=data >= SAT,
                   gain=GAIN, read_noise=RN, zeropoint=ZP, saturation=SAT)
    s = TRUE_PSF.shape(x, y)
    truth = dict(x=x, y=y, mag=mag, flux=flux * _moffat_within(s["fwhm"], s["alpha"], 7.0), pair=np.arange(len(x)) < n_pair)
    table, residual = psf_catalog(exp, TRUE_PSF, options=CatalogOptions(redetect=True), residual=True)
    return exp, truth, table, residual


def _match(truth, table):
    """Per true star the row measuring it (-1: none): nearest within 1 px, both ways."""
    fx, fy = np.asarray(table["x"]), np.asarray(table["y"])
    ok = np.flatnonzero(np.isfinite(fx))
    d, i = cKDTree(np.column_stack([fx[ok], fy[ok]])).query(np.column_stack([truth["x"], truth["y"]]))
    row = ok[i]
    _, back = cKDTree(np.column_stack([truth["x"], truth["y"]])).query(np.column_stack([fx[row], fy[row]]))
    return np.where((d < 1.0) & (back == np.arange(len(row))), row, -1)


def test_crowded_fluxes_are_unbiased_with_right_errors(crowded):
    _, truth, table, _ = crowded
    row = _match(truth, table)
    flags = np.asarray(table["flags"])
    use = (row >= 0) & (flags[row] == 0)
    flux, err = np.asarray(table["flux"])[row[use]], np.asarray(table["flux_err"])[row[use]]
    pull = (flux - truth["flux"][use]) / err
    # measured: pull std 0.97, median bias -0.04 %, 828 unflagged stars of mag 14-20.5 (of 1,032)
    assert use.sum() > 800
    assert 0.9 <= np.std(pull) <= 1.15
    assert abs(np.median(flux / truth["flux"][use] - 1.0)) < 0.003
    # the pairs down to 1.5 FWHM are among them, with the same pulls
    pairs = truth["pair"][use]
    assert pairs.sum() > 150 and 0.85 <= np.std(pull[pairs]) <= 1.2
    # errors on the positions too
    for k in ("x", "y"):
        dpos = (np.asarray(table[k])[row[use]] - truth[k][use]) / np.asarray(table[f"{k}_err"])[row[use]]
        assert 0.85 <= np.std(dpos) <= 1.2


def test_crowded_completeness_and_flags(crowded):
    _, truth, table, _ = crowded
    row = _match(truth, table)
    flags = np.asarray(table["flags"])
    good = (row >= 0) & (flags[np.maximum(row, 0)] == 0)
    tree = cKDTree(np.column_stack([truth["x"], truth["y"]]))
    nearest = tree.query(np.column_stack([truth["x"], truth["y"]]), k=2)[0][:, 1]
    bright = (truth["mag"] <= 19.0) & (truth["mag"] > 12)
    wide = nearest >= 2.0 * FWHM
    inside = (truth["x"] > 8) & (truth["x"] < NX - 9) & (truth["y"] > 8) & (truth["y"] < NY - 9)  # fit disc on the image
    # measured: 96 % of the mag <= 19 stars at >= 2 FWHM come out as unflagged rows
    assert np.mean(good[bright & wide & inside]) >= 0.95
    # the saturated stars: measured from their wings, flagged
    sat = np.flatnonzero(truth["mag"] < 12)
    assert np.all(row[sat] >= 0) and np.all(flags[row[sat]] & int(Flag.SATURATED))
    # rows that are no star are few and flagged or faint
    fx, fy = np.asarray(table["x"]), np.asarray(table["y"])
    ok = np.isfinite(fx)
    d = tree.query(np.column_stack([fx[ok], fy[ok]]))[0]
    assert np.sum((d > 1.0) & (flags[ok] == 0)) <= 0.01 * ok.sum()
    # schema
    for col in ("x", "y", "flux", "flux_err", "x_err", "y_err", "background", "chi2", "dof", "mag", "mag_err", "ra", "dec",
                "flags", "group_id", "group_size"):
        assert col in table.colnames
    m, f = np.asarray(table["mag"])[ok], np.asarray(table["flux"])[ok]
    assert np.all(np.isnan(m[~(f > 0)]))  # no magnitude for a flux <= 0
    assert np.allclose(m[f > 0], ZP - 2.5 * np.log10(f[f > 0]))
    assert np.max(table["group_size"]) >= 3 and table["redetected"].sum() > 0


def test_residual_image_is_the_noise(crowded):
    exp, truth, table, residual = crowded
    far = cKDTree(np.column_stack([truth["x"][truth["mag"] < 12], truth["y"][truth["mag"] < 12]]))
    yy, xx = np.mgrid[0:NY, 0:NX]
    away = far.query(np.column_stack([xx.ravel(), yy.ravel()]))[0].reshape(NY, NX) > 30
    light = exp.data - residual
    sigma = np.sqrt((np.maximum(light, 0) + SKY) / GAIN + (RN / GAIN) ** 2)
    chi = ((residual - SKY) / sigma)[away & (light > 1.0)]  # pixels with starlight
    assert 0.95 < np.std(chi) < 1.1


def test_rounds_of_iteration_caps_give_the_single_fit(crowded, monkeypatch):
    """The groups fitted in rounds (a low iteration cap, then the capped groups again with
    the full one) come out exactly as one fit with the full cap."""
    import ztfpsf.psf.groups as groups

    exp, _, table, _ = crowded
    assert np.sum(np.asarray(table["group_size"]) == 1) >= groups.ROUND_MIN_GROUPS  # the fixture used rounds
    monkeypatch.setattr(groups, "ROUND_CAPS", ())
    single, _ = psf_catalog(exp, TRUE_PSF, options=CatalogOptions(redetect=True))
    for name in ("flux", "flux_err", "x", "y", "background", "chi2", "flags"):
        assert np.array_equal(np.asarray(table[name]), np.asarray(single[name]), equal_nan=True), name


def test_groups_are_padded_to_few_sizes():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 200, 400), rng.uniform(0, 200, 400)
    g = make_groups(x, y, 6.0)
    assert set(g.members) <= set(SIZES)
    assert sorted(np.concatenate([m[m >= 0] for m in g.members.values()])) == list(range(400))
    # friends of friends: every pair closer than the link shares a group unless a piece was split off
    for i, j in cKDTree(np.column_stack([x, y])).query_pairs(6.0):
        assert g.label[i] == g.label[j] or (g.split[i] and g.split[j])


def test_real_cut_catalogue_and_residual(tmp_path):
    """The committed real ZTF cut with its hybrid PSF file, through the command line."""
    from ztfpsf.cli import main
    from ztfpsf.detect import estimate_background
    from ztfpsf.io.results import read_parquet

    out, res = tmp_path / "cat.parquet", tmp_path / "res.fits"
    assert main(["catalog", str(CUT_IMAGE), "--psf", str(CUT_PSF), "--out", str(out), "--residual-image", str(res)]) == 0
    table = read_parquet(out)
    exp = read_exposure(CUT_IMAGE)
    residual = fits.getdata(res)
    flags = np.asarray(table["flags"])
    # measured: 1,102 sources, 70 % unflagged (POOR_FIT: galaxies and blends; EXTRAPOLATED:
    # outside the hull of the PSF stars)
    assert len(table) > 1000 and np.mean(flags == 0) > 0.6
    assert np.all(np.isfinite(np.asarray(table["mag"])[flags == 0]))
    bkg = estimate_background(exp)
    light = exp.data - residual
    yy, xx = np.mgrid[0:exp.data.shape[0], 0:exp.data.shape[1]]
    grid = np.column_stack([xx.ravel(), yy.ravel()])
    dist = lambda sel: cKDTree(np.column_stack([np.asarray(table["x_init"])[sel], np.asarray(table["y_init"])[sel]])).query(
        grid)[0].reshape(exp.data.shape)
    bright = (np.asarray(table["mag"]) < 15.5) | ((flags & int(Flag.SATURATED)) != 0)
    ok = ~exp.mask & ~exp.saturated & (dist(bright) > 25)
    # the residual image away from bright and saturated stars: the sky noise (measured: robust rms 1.00x)
    r = (residual - bkg.level)[ok]
    assert abs(1.4826 * np.median(np.abs(r - np.median(r))) / np.median(bkg.rms) - 1.0) < 0.1
    # on the pixels of the unflagged sources: their noise (measured: 1.14, the hybrid PSF's own
    # chi2/dof 1.3 on its training stars)
    near = ok & (dist(flags == 0) <= 3 * table.meta["fwhm"]) & (dist(flags != 0) > 6)
    chi = ((residual - bkg.level) / np.sqrt(bkg.rms**2 + np.maximum(light, 0) / exp.gain))[near]
    assert near.sum() > 10000 and 0.95 < np.std(chi) < 1.2
