"""Selection cuts, stamp cutting, detection and the noise model on a synthetic image whose
every source has a known fate."""

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from ztfpsf.detect import METHODS, detect_stars, estimate_background, half_light_radius
from ztfpsf.io.fits import read_exposure
from ztfpsf.selection import SELECTION_COLUMNS, EmptySelectionWarning, select_stars
from ztfpsf.stamps import cut_stamps, noise_model

NY, NX = 200, 240
SKY, NOISE, SIGMA, ZP, SAT = 100.0, 5.0, 1.2, 25.0, 50000.0

# name: (x, y, mag, the cut that removes it or None)
SOURCES = {
    "A1": (60.0, 60.0, 15.0, None),
    "A2": (120.2, 100.7, 16.0, None),
    "A3": (180.3, 150.7, 17.5, None),
    "M": (100.0, 130.0, 16.0, None),  # a masked pixel in its stamp, 6 px out: outside the core
    "B": (10.0, 100.0, 15.0, "edge"),
    "B2": (100.0, 190.0, 15.0, "edge"),
    "C1": (60.0, 150.0, 15.0, "isolated"),  # C1 and C2 are 10 px apart
    "C2": (70.0, 150.0, 16.0, "isolated"),
    "E": (150.0, 60.0, 15.0, "isolated"),  # a faint neighbour F 15 px away
    "F": (150.0, 75.0, 21.0, "isolated"),
    "G": (16.0, 40.0, 15.0, "isolated"),  # a neighbour just off the image, 19 px away
    "Goff": (-3.0, 40.0, 16.0, "on_image"),
    "H": (200.0, 100.0, 13.0, "magnitude"),
    "I": (100.0, 40.0, 19.0, "magnitude"),
    "J": (60.0, 100.0, np.nan, "magnitude"),
    "K": (140.0, 130.0, 15.0, "clean"),  # a masked pixel next to its centre
    "L": (200.0, 40.0, 15.0, "clean"),  # a saturated pixel next to its centre
    "N": (500.0, 100.0, 15.0, "on_image"),
    "O": (np.nan, np.nan, 15.0, "on_image"),
}
NAMES = list(SOURCES)
GALAXY = (30.0, 175.0)  # in the image, not in the catalogue
HOT = (220, 180)


def _render(image, x, y, flux, sigma):
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    image += flux / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """(image path, mask path, catalogue Table with a 'name' column)."""
    rng = np.random.default_rng(42)
    image = np.full((NY, NX), SKY)
    for x, y, mag, _ in SOURCES.values():
        if np.isfinite(x) and np.isfinite(mag):
            _render(image, x, y, 10 ** (-0.4 * (mag - ZP)), SIGMA)
    _render(image, *GALAXY, 2e5, 4.0)
    image += rng.normal(0.0, NOISE, image.shape)
    image[HOT[1], HOT[0]] += 3000.0
    image[40, 201] = 70000.0  # saturated, in L's core
    mask = np.zeros((NY, NX), np.uint8)
    mask[130, 141] = 1  # in K's core
    mask[130, 106] = 1  # in M's stamp, outside its core
    d = tmp_path_factory.mktemp("scene")
    header = fits.Header({"SATURATE": SAT, "PIXSCALE": 1.0})
    fits.PrimaryHDU(image.astype(np.float32), header).writeto(d / "scene.fits")
    fits.PrimaryHDU(mask).writeto(d / "mask.fits")
    cat = Table(
        {
            "id": np.arange(len(NAMES)) + 100,
            "x": [SOURCES[n][0] for n in NAMES],
            "y": [SOURCES[n][1] for n in NAMES],
            "mag": [SOURCES[n][2] for n in NAMES],
            "name": NAMES,
        }
    )
    cat.meta.update(mag_kind="calibrated", catalog="synthetic")
    for col in ("ra", "dec"):
        cat[col] = np.nan
    return d / "scene.fits", d / "mask.fits", cat


@pytest.fixture(scope="module")
def exposure(scene):
    return read_exposure(scene[0], mask=scene[1])


def _survivors(stage):
    order = ["on_image", "edge", "isolated", "magnitude", "clean"]
    keep = order[order.index(stage) + 1 :] + [None]
    return {n for n, v in SOURCES.items() if v[3] in keep}


def test_counts_after_each_cut(scene, exposure):
    cat = scene[2]
    sel, counts = select_stars(cat, exposure)
    assert list(counts) == ["catalog", "on_image", "edge", "isolated", "magnitude", "stellar", "clean"]
    assert counts["catalog"] == len(SOURCES) == 19
    for stage in ("on_image", "edge", "isolated", "magnitude", "clean"):
        assert counts[stage] == len(_survivors(stage)), stage
    assert counts == {"catalog": 19, "on_image": 16, "edge": 14, "isolated": 9, "magnitude": 6, "stellar": 6, "clean": 4}
    assert set(sel["name"]) == {"A1", "A2", "A3", "M"}
    assert sel.colnames[: len(SELECTION_COLUMNS)] == list(SELECTION_COLUMNS)
    row = sel[sel["name"] == "A2"][0]
    assert (row["x_init"], row["y_init"], row["id"]) == (120.2, 100.7, 100 + NAMES.index("A2"))  # sub-pixel kept
    assert row["nearest"] == pytest.approx(np.hypot(140 - 120.2, 130 - 100.7))  # K is A2's nearest
    assert sel.meta["counts"] == dict(counts) and sel.meta["isolation_px"] == 20.0


def test_isolation_scales_with_pixel_scale(scene, exposure):
    cat = scene[2]
    _, counts = select_stars(cat, exposure, isolation_px=9.0)
    assert counts["isolated"] == 9 + 5  # C1, C2 (10 px apart), E, F (15 px), G (19 px)
    _, counts = select_stars(cat, exposure, isolation=10.0)  # 10" = 10 px at 1"/px
    assert counts["isolated"] == 9 + 3  # E, F, G; C1 and C2 sit exactly at 10 px: not isolated
    # at 0.5 "/px the same 20" are 40 px: A1 (J 40 px away) and others drop
    exposure_fine = read_exposure(scene[0], mask=scene[1], pixel_scale=0.5)
    sel, counts = select_stars(cat, exposure_fine)
    assert sel.meta["isolation_px"] == 40.0 and counts["isolated"] < 9


def test_unknown_pixel_scale_assumes_one_arcsec(scene, exposure):
    exp = read_exposure(scene[0], mask=scene[1])
    exp.pixel_scale = None
    with pytest.warns(UserWarning, match='pixel scale unknown: isolation radius 20" taken as 20 px'):
        _, counts = select_stars(scene[2], exp)
    assert counts["isolated"] == 9


def test_instrumental_rule_snr_and_peak(exposure):
    x = np.array([60.0, 120.2, 180.3, 100.0])
    y = np.array([60.0, 100.7, 150.7, 130.0])
    cat = Table({"x": x, "y": y, "snr": [500.0, 300.0, 15.0, 150.0]})
    cat.meta["mag_kind"] = "instrumental"
    sel, counts = select_stars(cat, exposure)
    assert counts["magnitude"] == 3 and 180.3 not in sel["x_init"]  # snr 15 < 20
    # peaks above the sky: A1 (mag 15) ~ 1105 ADU, A2 ~ 440, M ~ 440: a saturation level
    # that puts the bright limit (0.8 of the way from the sky) between them drops A1
    exp = read_exposure(exposure.path, mask=exposure.mask_path, saturation=SKY + 800.0 / 0.8)
    sel, counts = select_stars(cat, exp, sky=SKY)
    assert set(np.round(sel["x_init"], 1)) == {120.2, 100.0}
    np.testing.assert_allclose(sel["peak"], 10 ** (-0.4 * (16 - ZP)) / (2 * np.pi * SIGMA**2), rtol=0.05)
    # no snr and no magnitudes: only the bright end can be judged
    cat.remove_column("snr")
    cat.meta["mag_kind"] = None
    _, counts = select_stars(cat, exposure)
    assert counts["magnitude"] == 4


def test_stellar_column_is_a_cut(scene, exposure):
    cat = scene[2].copy()
    cat["stellar"] = cat["name"] != "A3"
    sel, counts = select_stars(cat, exposure)
    assert counts["stellar"] == counts["magnitude"] - 1 and "A3" not in sel["name"]
    _, counts = select_stars(cat, exposure, stellar=False)
    assert counts["stellar"] == counts["magnitude"]


def test_empty_selection_keeps_schema(scene, exposure):
    cat = scene[2][[NAMES.index("B"), NAMES.index("B2")]]
    with pytest.warns(EmptySelectionWarning, match="no star left after the selection"):
        sel, counts = select_stars(cat, exposure)
    assert len(sel) == 0 and counts["clean"] == 0
    assert sel.colnames[: len(SELECTION_COLUMNS)] == list(SELECTION_COLUMNS)
    assert sel["x_init"].dtype == np.float64


# --------------------------------------------------------------------------------------
# stamps
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ramp(tmp_path_factory):
    """An image whose pixel value encodes its position: 1000 * row + column."""
    image = (1000.0 * np.arange(40)[:, None] + np.arange(50)[None, :]).astype(np.float32)
    image[20, 25] = np.nan
    path = tmp_path_factory.mktemp("ramp") / "ramp.fits"
    fits.PrimaryHDU(image, fits.Header({"SATURATE": 30040.0})).writeto(path)
    return read_exposure(path)


def test_cut_stamps_positions_and_origin(ramp):
    x = np.array([10.4, 10.5, 30.6, 25.0])
    y = np.array([12.6, 12.5, 8.49, 21.0])
    st = cut_stamps(ramp, x, y, size=5)
    assert st.data.shape == (4, 5, 5) and len(st) == 4 and st.size == 5
    np.testing.assert_array_equal(st.origin, [[8, 11], [9, 11], [29, 6], [23, 19]])  # round half up
    for k in range(4):
        ox, oy = st.origin[k]
        expected = 1000.0 * (oy + np.arange(5))[:, None] + (ox + np.arange(5))[None, :]
        got = np.where(np.isnan(st.data[k]), -1, st.data[k])
        np.testing.assert_array_equal(got, np.where(np.isnan(st.data[k]), -1, expected))
    np.testing.assert_array_equal(st.x_init, x)
    assert not st.off_image.any()
    # the NaN pixel (25, 20) is masked in the last stamp, at (row 1, column 2)
    assert st.mask[3, 1, 2] and st.mask[3].sum() == 1
    # saturation: row 30, columns >= 40 (30040) never appear in these stamps
    assert not st.saturated.any()


def test_cut_stamps_off_image_and_nan(ramp):
    st = cut_stamps(ramp, [1.0, 48.6, np.nan, 25.0], [1.0, 38.7, 5.0, 30.0], size=5)
    assert list(st.off_image) == [True, True, True, False]
    assert st.mask[0, 0].all() and st.mask[0, :, 0].all() and not st.mask[0, 2:, 2:].any()
    assert np.isnan(st.data[0, 0, 0]) and st.data[0, 1, 1] == 0.0
    assert st.mask[2].all() and np.isnan(st.origin[2]).all()
    assert st.saturated[3].sum() == 10 and st.saturated[3, 3:].all()  # rows 31 and 32 are >= 30040
    with pytest.raises(ValueError, match="odd integer"):
        cut_stamps(ramp, [10.0], [10.0], size=4)
    with pytest.raises(ValueError, match="same length"):
        cut_stamps(ramp, [10.0, 11.0], [10.0], size=5)


def test_noise_model_choices(exposure, caplog):
    bkg = estimate_background(exposure)
    st = cut_stamps(exposure, [60.0, 120.2, np.nan], [60.0, 100.7, 5.0], 17, background=bkg)
    assert st.sky[0] == pytest.approx(SKY, abs=2.0) and np.isnan(st.sky[2])
    kwargs, info = noise_model(exposure, st, bkg)  # no gain: the sky variance
    np.testing.assert_allclose(kwargs["variance"][:2], NOISE**2, rtol=0.2)
    assert info["model"] == "sky variance" and "no source Poisson noise" in info["description"]
    assert info["sky_rms_measured"] == pytest.approx(NOISE, rel=0.05) and info["rms_ratio"] is None
    # the scene's sky noise is 5 ADU, but gain 10 and read noise 7 predict sqrt(100/10 + 0.7^2) = 3.24
    exp = read_exposure(exposure.path, gain=10.0, read_noise=7.0)
    kwargs, info = noise_model(exp, st, bkg)  # measured (default): the sky rms at each star
    assert info["model"] == "measured" and set(kwargs) == {"gain", "read_noise"}
    rn, c = kwargs["read_noise"], 8
    np.testing.assert_allclose(st.sky[:2] / 10.0 + (rn[:2] / 10.0) ** 2, st.sky_rms[:2, c, c] ** 2, rtol=1e-5)
    assert rn[2] == pytest.approx(np.median(rn[:2]))  # off the image: the others' median
    assert info["sky_rms_header"] == pytest.approx(np.sqrt(SKY / 10.0 + 0.49), rel=0.01)
    assert info["rms_ratio"] == pytest.approx(NOISE / np.sqrt(SKY / 10.0 + 0.49), rel=0.05)
    kwargs, info = noise_model(exp, st, bkg, mode="header")
    assert kwargs == {"gain": 10.0, "read_noise": 7.0} and info["model"] == "header"
    # gain without read noise, header mode: one effective value: rms^2 = sky/gain + (rn/gain)^2
    exp = read_exposure(exposure.path, gain=10.0)
    kwargs, info = noise_model(exp, st, bkg, mode="header")
    expected = 10.0 * np.sqrt(bkg.median_rms**2 - bkg.median_level / 10.0)  # ~10 sqrt(25 - 10)
    assert kwargs["read_noise"] == pytest.approx(expected) and kwargs["read_noise"] > 0
    assert info["rms_ratio"] is None
    # a gain too small for the sky's scatter (sky/gain = 50 > 25): read noise 0, said in the log
    with caplog.at_level("WARNING", logger="ztfpsf.stamps"):
        kwargs, _ = noise_model(read_exposure(exposure.path, gain=2.0), st, bkg)
    assert np.all(kwargs["read_noise"] == 0.0) and "below the Poisson noise" in caplog.text
    with pytest.raises(ValueError, match="noise mode"):
        noise_model(exp, st, bkg, mode="sky")
    with pytest.raises(ValueError, match="background"):
        noise_model(exposure, cut_stamps(exposure, [60.0], [60.0], 17))


# --------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_detect_finds_stars_and_tells_them_apart(scene, exposure, method):
    det = detect_stars(exposure, method=method)
    assert det.meta["background"]["method"].startswith(method)
    assert det.meta["mag_kind"] == "instrumental"
    # bright stars on the image, but K (a masked pixel in its core) and L (saturated)
    bright = [n for n, v in SOURCES.items() if np.isfinite(v[2]) and v[2] <= 17.5 and 0 <= v[0] < NX and n not in ("K", "L")]
    for name in bright:
        x, y = SOURCES[name][:2]
        d = np.hypot(det["x"] - x, det["y"] - y)
        k = int(np.argmin(d))
        assert d[k] < 0.25, name  # isophotal centroids: the fit refines them
        assert det["stellar"][k], name
    r50_true = SIGMA * np.sqrt(2 * np.log(2))
    assert det.meta["r50_star"] == pytest.approx(r50_true, rel=0.1)
    for x, y in (GALAXY, HOT):
        k = int(np.argmin(np.hypot(det["x"] - x, det["y"] - y)))
        assert np.hypot(det["x"][k] - x, det["y"][k] - y) < 1.0 and not det["stellar"][k]
    sat = int(np.argmin(np.hypot(det["x"] - 200.0, det["y"] - 40.0)))
    assert det["n_saturated"][sat] == 1 and not det["stellar"][sat]
    # flux: the segment holds most of a star's light
    a1 = int(np.argmin(np.hypot(det["x"] - 60.0, det["y"] - 60.0)))
    assert det["flux"][a1] == pytest.approx(10 ** (-0.4 * (15 - ZP)), rel=0.05)
    assert det["mag"][a1] == pytest.approx(-2.5 * np.log10(det["flux"][a1]))
    # the detections feed the same selection
    sel, counts = select_stars(det, exposure)
    dist = {n: np.min(np.hypot(sel["x_init"] - v[0], sel["y_init"] - v[1])) for n, v in SOURCES.items() if np.isfinite(v[0])}
    got = {n for n, d in dist.items() if d < 1.0}
    # E and G look isolated to detection: their neighbours (F, mag 21, and Goff, off the
    # image) are not detected; H (mag 13) passes without calibrated magnitudes
    assert got == {"A1", "A2", "A3", "M", "E", "G", "H"}


def test_detect_with_zeropoint_gives_calibrated_mags(exposure):
    exp = read_exposure(exposure.path, mask=exposure.mask_path, zeropoint=ZP)
    det = detect_stars(exp)
    assert det.meta["mag_kind"] == "calibrated"
    a1 = int(np.argmin(np.hypot(det["x"] - 60.0, det["y"] - 60.0)))
    assert det["mag"][a1] == pytest.approx(15.0, abs=0.05)


def test_detect_nothing(tmp_path):
    path = tmp_path / "flat.fits"
    fits.PrimaryHDU(np.full((64, 64), 10.0, np.float32)).writeto(path)
    exp = read_exposure(path, pixel_scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing but a log line
        det = detect_stars(exp)
    assert len(det) == 0 and {"id", "x", "y", "flux", "mag", "snr", "stellar"} <= set(det.colnames)
    with pytest.warns(EmptySelectionWarning):
        sel, counts = select_stars(det, exp)
    assert counts["catalog"] == 0 and len(sel) == 0


def test_half_light_radius_of_a_gaussian():
    image = np.zeros((60, 60))
    xs, ys, sigmas = [15.3, 40.0, 30.7], [15.8, 20.2, 44.5], [1.0, 1.8, 2.6]
    for x, y, s in zip(xs, ys, sigmas, strict=True):
        _render(image, x, y, 1e4, s)
    r50 = half_light_radius(image, np.zeros(image.shape, bool), np.array(xs), np.array(ys), 10.0)
    np.testing.assert_allclose(r50, np.array(sigmas) * np.sqrt(2 * np.log(2)), rtol=0.05)
