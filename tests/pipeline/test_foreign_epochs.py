"""`archive process` on calibrated epochs written by another pipeline (IMAGE/MASK/VARIANCE,
``MP_*`` mask keys, MJD-OBS or DATE-OBS with TIMESYS, FILTER, EXPTIME, a zero-point card, no
VISIT card): exposure ids, atomic recording, fluxes in nJy or none, times in TAI.

The epochs are made by :mod:`foreign_mef` with numpy and astropy only (not archive.sim).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from astropy.time import Time
from scipy.spatial import cKDTree

from archive.api import Archive
from archive.catalog.backends import open_store
from archive.cli.main import main
from archive.errors import ArchiveError, StoreLockedError
from archive.image.foreign import read_calibrated_mef
from archive.pipeline.single_epoch import QUALITY_BITS, process_raws
from archive.process.flags import FLAG_NOT_CALIBRATED
from archive.process.single_frame import process_exposure
from foreign_mef import njy_per_count_of_zp, truth_catalog, write_epoch

EXPTIME = 30.0
TAI_MINUS_UTC = 37.0  # s, since 2017-01-01

#: three epochs of one field: (zero point, time cards)
EPOCHS = [
    (28.30, {"MJD-OBS": 60400.10, "TIMESYS": "UTC"}),
    (28.12, {"MJD-OBS": 60401.20}),  # no TIMESYS: UTC, as the FITS standard says
    (28.45, {"DATE-OBS": "2024-04-04T03:36:00.000", "TIMESYS": "UTC"}),  # MJD 60404.15 UTC
]


def _mjd_tai_mid(cards: dict) -> float:
    start = cards["MJD-OBS"] if "MJD-OBS" in cards else Time(cards["DATE-OBS"], scale="utc").mjd
    return start + (TAI_MINUS_UTC + EXPTIME / 2) / 86400.0


def _write(directory, k: int, zp: float | None, time_cards: dict, extra: dict | None = None, **kw):
    cards = {"FILTER": "r", "EXPTIME": EXPTIME, "GAIN": 2.0, **time_cards, **(extra or {})}
    if zp is not None:
        cards["MAGZERO"] = (zp, "AB mag of 1 count")
    directory.mkdir(parents=True, exist_ok=True)
    return write_epoch(directory / f"epoch{k}.fits", cards, seed=100 + k, truth=truth_catalog(),
                       njy_per_count=njy_per_count_of_zp(zp if zp is not None else 28.3),
                       shift_arcsec=(3.0 * k, -2.0 * k), fwhm_arcsec=1.1 + 0.1 * k, **kw)


def _flux_ratio(sources: pd.DataFrame, epoch) -> np.ndarray:
    """psf_flux / true flux (nJy) of the detections within 1 px of a true star."""
    t = epoch.truth
    d, i = cKDTree(t[["x", "y"]].to_numpy()).query(sources[["x", "y"]].to_numpy(float))
    ok = d < 1.0
    return sources["psf_flux"].to_numpy(float)[ok] / t["flux"].to_numpy()[i[ok]]


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """The three epochs processed by one `process_raws` run (no reference catalog)."""
    root = tmp_path_factory.mktemp("foreign")
    epochs = [_write(root / "in", k, zp, tc) for k, (zp, tc) in enumerate(EPOCHS)]
    with Archive.init(root / "arc") as arc:
        rep = arc.process_raws([e.path for e in epochs], [], refcat=None)
        exp = arc.sql("SELECT * FROM exposure ORDER BY mjd_mid")
        src = arc.sql("SELECT * FROM source")
    return epochs, rep, exp, src


def test_epochs_without_visit_get_their_own_ids_times_and_njy_fluxes(field):
    """Items 1, 2, 10 end to end.  Before: every epoch was exposure 0 (the run aborted after
    replacing the first epoch's sources); psf_flux was stored in counts (median ratio to the
    truth 0.058 = 1/17.4 here); MJD-OBS (UTC) was read as TAI (37 s early)."""
    epochs, rep, exp, src = field
    assert not rep.failed and not rep.rejected and len(rep.processed) == 3, rep
    assert exp["exposure_id"].nunique() == 3 and not rep.uncalibrated
    for e, (zp, cards), (_, row) in zip(epochs, EPOCHS, exp.iterrows()):
        mjd = _mjd_tai_mid(cards)
        # mid-exposure in TAI: start (UTC) + 37 s + EXPTIME / 2
        assert row["mjd_mid"] == pytest.approx(mjd, abs=1e-8)
        # no VISIT card: the visit is the mid-exposure TAI second since MJD 0, detector 0
        assert row["visit"] == round(mjd * 86400) and row["exposure_id"] == row["visit"] * 1000
        assert row["zero_point"] == pytest.approx(zp + 2.5 * math.log10(EXPTIME), abs=1e-9)
        assert row["status"] == "processed" and row["quality_flags"] == 0
        mine = src[src["exposure_id"] == row["exposure_id"]]
        assert (mine["mjd"] == row["mjd_mid"]).all()
        # this exposure's own stars, in nJy: the zero points differ by 0.15-0.33 mag between
        # epochs, so sources replaced by another epoch's would be off by 15-35 %
        ratio = _flux_ratio(mine, e)
        assert len(ratio) >= 0.9 * len(e.truth)
        assert np.median(ratio) == pytest.approx(1.0, abs=0.015)
    assert (src["flags"].to_numpy() & int(FLAG_NOT_CALIBRATED) == 0).all()


def test_duplicate_exposure_ids_are_refused_before_anything_is_written(tmp_path):
    """Two epochs whose headers give one exposure id (same EXPNUM, no VISIT).  Before: the
    second epoch's sources replaced the first's, then the run aborted on the exposure row."""
    cards = {"EXPNUM": 424242, "MJD-OBS": 60400.10}
    a = _write(tmp_path / "in", 0, 28.3, cards)
    b = _write(tmp_path / "in", 1, 28.1, {**cards, "MJD-OBS": 60401.10})
    repo = tmp_path / "arc"
    with Archive.init(repo) as arc:
        with pytest.raises(ArchiveError) as err:
            arc.process_raws([a.path, b.path], [], refcat=None)
        msg = str(err.value)
        assert str(a.path) in msg and str(b.path) in msg and "424242000" in msg and "EXPNUM" in msg
        for table in ("exposure", "source", "matched_source", "image_product", "provenance"):
            assert arc.count(table) == 0, table
        assert not [p for p in arc.products_root().rglob("*") if p.is_file()]
    # the CLI says it in one line and exits non-zero
    rc = main(["process", "--repo", str(repo), str(a.path), str(b.path)])
    assert rc == 2


def test_an_id_held_from_another_file_is_refused(tmp_path, capsys):
    a = _write(tmp_path / "a", 0, 28.3, {"VISIT": 5, "MJD-OBS": 60400.10})
    b = _write(tmp_path / "b", 1, 28.1, {"VISIT": 5, "MJD-OBS": 60401.10})
    b.path = b.path.rename(b.path.with_name("other.fits"))
    with Archive.init(tmp_path / "arc") as arc:
        assert arc.process_raws([a.path], [], refcat=None).processed == [5000]
        before = arc.sql("SELECT source_id, psf_flux FROM source ORDER BY source_id")
        with pytest.raises(ArchiveError, match="already registered from .*epoch0.fits"):
            arc.process_raws([b.path], [], refcat=None)
        pd.testing.assert_frame_equal(arc.sql("SELECT source_id, psf_flux FROM source ORDER BY source_id"), before)
        # the same file again is a resume: skipped
        assert arc.process_raws([a.path], [], refcat=None).skipped == [5000]


def test_no_zero_point_stores_no_flux_and_says_so(tmp_path, capsys):
    """No reference catalog and no zero-point card, through `archive process` (a directory of
    calibrated epochs, no --calib).  Before: status processed, psf_flux in counts under the nJy
    column (median 4,788 counts for a true median of 82,611 nJy here), no flag, zero point NaN
    without a word."""
    e = _write(tmp_path / "in", 0, None, {"MJD-OBS": 60400.10, "TIMESYS": "UTC"})
    Archive.init(tmp_path / "arc").close()
    assert main(["process", "--repo", str(tmp_path / "arc"), "--workers", "1", str(tmp_path / "in")]) == 0
    err = capsys.readouterr().err
    assert "processed 1 exposure(s) (1 without photometric calibration)" in err and "uncalibrated" in err
    with Archive.open(tmp_path / "arc") as arc:
        row = arc.sql("SELECT * FROM exposure").iloc[0]
        src = arc.sql("SELECT * FROM source")
    assert row["status"] == "processed"
    assert pd.isna(row["zero_point"]) and pd.isna(row["lim_mag"])
    assert row["quality_flags"] == 1 << QUALITY_BITS["NO_PHOTOCAL"]
    assert "not photometrically calibrated" in row["quality_reason"] and "MAGZERO" in row["quality_reason"]
    assert len(src) > 100
    for c in ("psf_flux", "psf_flux_err", "ap_flux_r3", "ap_flux_r12_err", "sky"):
        assert src[c].isna().all(), c
    assert (src["flags"].to_numpy() & int(FLAG_NOT_CALIBRATED) != 0).all()
    assert src["ra"].notna().all() and (src["snr"] > 0).all()


ZP = 28.3


@pytest.mark.parametrize("cards, per_second", [
    ({"MAGZERO": (ZP, "AB mag of 1 count")}, None),
    ({"PHOTZP": ZP, "PHOTSYS": "AB"}, None),
    ({"FLUXMAG0": 10 ** (0.4 * ZP), "FLUXMAG0ERR": 1e9}, None),
    ({"MAGZP": (ZP, "ZTF-style zero point")}, None),
    # a zero point for 1 count/s on an image in counts: + 2.5 log10(EXPTIME)
    ({"MAGZERO": (ZP - 2.5 * math.log10(EXPTIME), "[mag] AB zeropoint for 1 ADU/s")}, None),
    # an image in counts/s (BUNIT) with its own rate zero point: used as it is
    ({"PHOTZP": ZP - 2.5 * math.log10(EXPTIME), "BUNIT": "adu/s"}, EXPTIME),
], ids=["MAGZERO", "PHOTZP", "FLUXMAG0", "MAGZP", "MAGZERO-per-second", "rate-image"])
def test_header_zero_point_conventions_give_njy(tmp_path, cards, per_second):
    """Every convention gives the same nJy for the same stars (truth within 1.5 %)."""
    e = _write(tmp_path, 0, None, {"MJD-OBS": 60400.10}, extra=cards, per_second=per_second)
    exp = read_calibrated_mef(e.path)
    assert exp.photo_calib.zero_point == pytest.approx(
        ZP if per_second is None else ZP - 2.5 * math.log10(EXPTIME), abs=1e-9)
    res = process_exposure(exp, None)
    assert not res.rejected and res.calibration == "header"
    assert np.median(_flux_ratio(res.sources, e)) == pytest.approx(1.0, abs=0.015)


def test_a_locked_archive_refuses_the_run_and_the_next_run_does_it(tmp_path):
    """Another writer holds the archive: the run is refused before anything is processed or
    written (registering the inputs needs the lock), and the next run does everything."""
    epochs = [_write(tmp_path / "in", k, 28.3, {"MJD-OBS": 60400.1 + k}) for k in range(2)]
    store = open_store(str(tmp_path / "arc"), create=True)
    products = tmp_path / "products"
    try:
        with store.transaction():  # the other writer
            with pytest.raises(StoreLockedError, match="locked"):
                process_raws(store, [e.path for e in epochs], [], None, products)
        assert not [p for p in products.rglob("*") if p.is_file()]
        for table in ("input_file", "exposure", "source", "matched_source", "image_product", "provenance"):
            assert store.count(table) == 0, table
        rep = process_raws(store, [e.path for e in epochs], [], None, products)
        assert len(rep.processed) == 2 and not rep.failed
        assert store.count("image_product") == 4 and len(list(products.rglob("*.fits"))) == 2
    finally:
        store.close()
