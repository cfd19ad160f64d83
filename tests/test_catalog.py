"""Catalogues: formats, column names (Gaia, SExtractor), projection, bad catalogues."""

from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from astropy.wcs import WCS

from ztfpsf.io.catalog import CatalogError, FootprintWarning, read_catalog

DATA = Path(__file__).parent / "data" / "images"
SHAPE = (100, 120)


@pytest.fixture(scope="module")
def wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [210.0, 54.0]
    w.wcs.crpix = [60.5, 50.5]
    w.wcs.cd = np.array([[-1.0, 0.0], [0.0, 1.0]]) / 3600.0
    return w


@pytest.fixture(scope="module")
def truth(wcs):
    """Five sources with known pixels (one off the image) and their sky positions."""
    x = np.array([10.25, 60.0, 99.5, 119.4, 300.0])
    y = np.array([5.75, 50.0, 20.0, 99.4, -40.0])
    ra, dec = wcs.wcs_pix2world(x, y, 0)
    return Table({"id": np.array([11, 12, 13, 14, 15]), "ra": ra, "dec": dec, "x": x, "y": y, "mag": [14.0, 15.5, 16.0, 17.0, 18.0]})


def _write(table, path):
    fmt = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".fits": "fits", ".parquet": "parquet"}[path.suffix]
    table.write(path, format=fmt, overwrite=True)
    return path


@pytest.mark.parametrize("ext", [".csv", ".ecsv", ".fits", ".parquet"])
def test_formats_sky_positions(tmp_path, truth, wcs, ext):
    path = _write(truth["id", "ra", "dec", "mag"], tmp_path / f"cat{ext}")
    cat = read_catalog(path, wcs=wcs, image_shape=SHAPE)
    assert cat.colnames[:7] == ["id", "ra", "dec", "x", "y", "mag", "snr"]
    np.testing.assert_allclose(cat["x"], truth["x"], atol=1e-6)
    np.testing.assert_allclose(cat["y"], truth["y"], atol=1e-6)
    np.testing.assert_array_equal(cat["id"], truth["id"])
    np.testing.assert_array_equal(cat["mag"], truth["mag"])
    assert cat.meta["positions"] == "sky" and cat.meta["mag_kind"] == "calibrated"
    assert cat.meta["n_on_image"] == 4


@pytest.mark.parametrize("ext", [".csv", ".ecsv", ".fits", ".parquet"])
def test_formats_pixel_positions(tmp_path, truth, wcs, ext):
    path = _write(truth["x", "y"], tmp_path / f"xy{ext}")
    cat = read_catalog(path, wcs=wcs)  # the WCS gives ra/dec to a pixel catalogue
    np.testing.assert_array_equal(cat["x"], truth["x"])
    np.testing.assert_array_equal(cat["id"], np.arange(5))  # generated: the row index
    np.testing.assert_allclose(cat["ra"], truth["ra"], atol=1e-9)
    assert np.isnan(cat["mag"]).all() and cat.meta["mag_kind"] is None
    no_wcs = read_catalog(path)
    assert np.isnan(no_wcs["ra"]).all() and no_wcs.meta["pixel_origin"] == 0


def test_gaia_names(tmp_path, truth, wcs):
    gaia = Table(
        {
            "source_id": np.array([4295806720, 38655544960, 1275606125952, 1653563247744, 2851858288640], dtype=np.int64),
            "ra": truth["ra"],
            "dec": truth["dec"],
            "phot_g_mean_mag": truth["mag"],
            "phot_g_mean_flux": [1e5, 2e4, 1e4, 5e3, 2e3],
            "phot_g_mean_flux_error": [100.0, 40.0, 40.0, 50.0, 100.0],
            "parallax": np.ones(5),
        }
    )
    cat = read_catalog(_write(gaia, tmp_path / "gaia.fits"), wcs=wcs)
    assert cat["id"].dtype == np.int64 and cat["id"][0] == 4295806720
    np.testing.assert_array_equal(cat["mag"], truth["mag"])
    np.testing.assert_allclose(cat["snr"], [1000, 500, 250, 100, 20])
    assert "parallax" in cat.colnames and "source_id" not in cat.colnames
    assert cat.meta["mag_column"] == "phot_g_mean_mag"


def test_aliases_and_explicit_columns(tmp_path, truth, wcs):
    t = Table({"RA": truth["ra"], "DEC": truth["dec"], "Gmag": truth["mag"], "NAME": ["a", "b", "c", "d", "e"]})
    cat = read_catalog(_write(t, tmp_path / "upper.csv"), wcs=wcs)
    assert list(cat["id"]) == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(cat["mag"], truth["mag"])
    t = Table({"RA_ICRS": truth["ra"], "DE_ICRS": truth["dec"], "my_mag": truth["mag"]})
    cat = read_catalog(_write(t, tmp_path / "vizier.ecsv"), wcs=wcs, columns={"mag": "my_mag"})
    np.testing.assert_allclose(cat["x"], truth["x"], atol=1e-6)
    np.testing.assert_array_equal(cat["mag"], truth["mag"])
    with pytest.raises(CatalogError, match="column 'nope' given in columns= is not in the catalogue"):
        read_catalog(tmp_path / "vizier.ecsv", wcs=wcs, columns={"mag": "nope"})
    t = Table({"xcentroid": truth["x"], "ycentroid": truth["y"]})
    np.testing.assert_array_equal(read_catalog(_write(t, tmp_path / "phot.ecsv"))["y"], truth["y"])


def test_both_positions_prefer(tmp_path, truth, wcs):
    t = truth.copy()
    t["x"] += 1000.0  # pixels measured on another image
    path = _write(t, tmp_path / "both.ecsv")
    assert read_catalog(path, wcs=wcs)["x"][0] == pytest.approx(1010.25)  # auto: pixels first
    np.testing.assert_allclose(read_catalog(path, wcs=wcs, prefer="sky")["x"], truth["x"], atol=1e-6)
    with pytest.raises(ValueError, match="prefer"):
        read_catalog(path, prefer="both")


def test_masked_values_become_nan(tmp_path, truth, wcs):
    t = truth["id", "ra", "dec"].copy()
    t["mag"] = MaskedColumn([14.0, 15.0, 0.0, 16.0, 17.0], mask=[False, False, True, False, False])
    cat = read_catalog(_write(t, tmp_path / "masked.ecsv"), wcs=wcs)
    assert np.isnan(cat["mag"][2]) and cat["mag"][3] == 16.0


def test_sextractor_catalog_is_one_based():
    cat = read_catalog(DATA / "sep" / "image.cat", image_shape=(256, 256))
    raw = Table.read(DATA / "sep" / "image.cat", format="ascii.sextractor")
    assert len(cat) == 65 and cat.meta["pixel_origin"] == 1
    np.testing.assert_allclose(cat["x"], raw["X_IMAGE"] - 1.0)
    np.testing.assert_allclose(cat["y"], raw["Y_IMAGE"] - 1.0)
    np.testing.assert_array_equal(cat["id"], raw["NUMBER"])
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_allclose(cat["snr"], np.where(raw["FLUXERR_AUTO"] > 0, raw["FLUX_AUTO"] / raw["FLUXERR_AUTO"], np.nan))
    assert "XWIN_IMAGE" in cat.colnames and "FLAGS" in cat.colnames  # other columns carried along
    assert cat.meta["mag_kind"] is None
    # an explicit origin overrides the guess
    zero = read_catalog(DATA / "sep" / "image.cat", pixel_origin=0)
    np.testing.assert_allclose(zero["x"], raw["X_IMAGE"])


def test_galactic_wcs_projects_icrs(tmp_path):
    w = WCS(naxis=2)
    w.wcs.ctype = ["GLON-CAR", "GLAT-CAR"]
    w.wcs.crval = [18.0, 0.0]
    w.wcs.crpix = [50.5, 40.5]
    w.wcs.cd = np.array([[-1.2, 0.0], [0.0, 1.2]]) / 3600.0
    gal = SkyCoord(l=[18.0, 18.01], b=[0.0, 0.005], unit="deg", frame="galactic").icrs
    t = Table({"ra": gal.ra.deg, "dec": gal.dec.deg})
    cat = read_catalog(_write(t, tmp_path / "icrs.csv"), wcs=w)
    # l = 18.01 is 0.01 deg = 30 px to the left (CDELT1 < 0), b = 0.005 is 15 px up
    np.testing.assert_allclose(cat["x"], [49.5, 49.5 - 30.0], atol=1e-6)
    np.testing.assert_allclose(cat["y"], [39.5, 39.5 + 15.0], atol=1e-6)


# --------------------------------------------------------------------------------------
# bad catalogues
# --------------------------------------------------------------------------------------
def test_missing_columns_lists_found(tmp_path):
    path = _write(Table({"alpha": [1.0], "delta": [2.0], "brightness": [3.0]}), tmp_path / "odd.csv")
    with pytest.raises(CatalogError) as err:
        read_catalog(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: no position columns")
    assert "found: alpha, delta, brightness" in msg


def test_sky_catalog_without_wcs(tmp_path, truth):
    path = _write(truth["ra", "dec"], tmp_path / "sky.csv")
    msg = r"sky.csv: the catalogue has sky positions \(ra, dec\) but the image has no celestial WCS \(no WCS in the header\)"
    with pytest.raises(CatalogError, match=msg):
        read_catalog(path, wcs_note="no WCS in the header")
    with pytest.raises(CatalogError, match="prefer='pixel' but no x/y columns"):
        read_catalog(path, prefer="pixel")


def test_outside_footprint_warns(tmp_path, wcs):
    far = Table({"ra": [10.0, 10.1], "dec": [-5.0, -5.1]})  # another part of the sky
    path = _write(far, tmp_path / "far.csv")
    with pytest.warns(FootprintWarning, match=r"far.csv: none of the 2 sources falls on the 120x100 image"):
        cat = read_catalog(path, wcs=wcs, image_shape=SHAPE)
    assert cat.meta["n_on_image"] == 0 and len(cat) == 2


def test_unreadable_catalogs(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(CatalogError, match=r"empty.csv: empty file"):
        read_catalog(empty)
    with pytest.raises(CatalogError, match="no such file"):
        read_catalog(tmp_path / "missing.csv")
    binary = tmp_path / "junk.parquet"
    binary.write_bytes(b"\x00\x01not parquet at all" * 10)
    with pytest.raises(CatalogError, match=r"junk.parquet: cannot read it as a catalogue"):
        read_catalog(binary)
    image = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(image)
    with pytest.raises(CatalogError, match="image.fits: the FITS file holds no table HDU"):
        read_catalog(image)


def test_non_numeric_positions(tmp_path):
    path = tmp_path / "sexagesimal.csv"
    path.write_text("ra,dec\n10:20:30,+05:06:07\n")
    with pytest.raises(CatalogError, match=r"sexagesimal.csv: column 'ra' is not numeric \(e.g. '10:20:30'\)"):
        read_catalog(path, wcs=WCS(naxis=2))
