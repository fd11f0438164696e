"""Raw frames -> archive: calexps on disk, rows in the store, provenance, resumable, rejections."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from archive.api import Archive
from archive.pipeline.products import sha256_file
from archive.pipeline.single_epoch import QUALITY_BITS
from archive.sim.config import SimConfig
from archive.sim.survey import simulate_survey
from archive.sky.healpix import angular_separation_deg


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("survey")
    simulate_survey(root, SimConfig(seed=3, n_epochs=3, size=1024, streak_epochs=()))
    return root


def _inputs(root: pathlib.Path):
    return sorted((root / "raw").rglob("*.fits")), sorted((root / "calib").rglob("*.fits"))


@pytest.fixture(scope="module")
def processed(survey, tmp_path_factory):
    """The survey processed once (two worker processes) into a new archive."""
    raws, calib = _inputs(survey)
    path = tmp_path_factory.mktemp("arc") / "arc"
    with Archive.init(path) as arc:
        rep = arc.process_raws(raws, calib, refcat=survey / "refcat.parquet", workers=2)
    return path, rep


def test_process_then_resume(survey, processed):
    raws, calib = _inputs(survey)
    path, rep = processed
    arc = Archive.open(path)
    # every exposure is recorded; a rejection (a process-step decision) carries its reason
    assert not rep.failed, rep.failed
    assert rep.processed and len(rep.processed) + len(rep.rejected) == len(raws)
    assert all(rep.rejected.values()) and rep.n_sources > 100
    exp = arc.sql("SELECT * FROM exposure ORDER BY exposure_id")
    assert len(exp) == len(raws)
    assert exp.set_index("exposure_id")["status"].to_dict() == {
        **{e: "processed" for e in rep.processed}, **{e: "rejected" for e in rep.rejected}}
    exp = exp[exp["status"] == "processed"]
    truth = pd.read_parquet(survey / "truth" / "epochs.parquet")
    truth = truth[(truth["visit"] * 1000 + truth["detector"]).isin(exp["exposure_id"])].sort_values("visit")
    # the exposure row agrees with the simulator: time, seeing, zero point (AB mag of 1 adu/s)
    np.testing.assert_allclose(exp["mjd_mid"], truth["mjd"], atol=1e-6)
    np.testing.assert_allclose(exp["zero_point"], truth["zero_point"] + 2.5 * np.log10(truth["exp_time"]), atol=0.05)
    assert (exp["seeing"] > 0.3).all() and (exp["lim_mag"] > 20).all()
    # calexps and their source catalogs registered with their checksum and provenance
    prods = arc.sql("SELECT * FROM image_product")
    assert len(prods) == 2 * len(rep.processed) and sorted(prods["kind"]) == sorted(
        ["calexp", "src"] * len(rep.processed))
    for _, p in prods.iterrows():
        path = arc.products_root() / p["path"]
        assert sha256_file(path) == p["sha256"]
        if p["kind"] == "calexp":
            with fits.open(path) as hdul:
                assert len(hdul) >= 3
    prov = arc.sql("SELECT * FROM provenance")
    # one calexp provenance row per exposure (rejections included), one for the field's joint astrometry
    calexp_prov = prov[prov["step"] == "calexp"]
    assert len(calexp_prov) == len(raws) and calexp_prov["config_hash"].nunique() == 1
    assert all(json.loads(c) for c in prov["config"]) and set(prods["provenance_id"]) <= set(prov["provenance_id"])
    # the epochs were refined against each other (relative astrometry): the products come from that step
    assert sorted(rep.refined) == sorted(rep.processed) and len(rep.processed) >= 3
    assert all(after <= before for before, after in rep.refined.values())
    astro = prov[prov["step"] == "astrometry"]
    assert len(astro) == 1 and "relative_astrometry" in json.loads(astro["config"].iloc[0])
    assert set(prods["provenance_id"]) == set(astro["provenance_id"])
    prods = prods[prods["kind"] == "calexp"]
    # each calexp's (refined) WCS is the one that placed its sources on the sky
    from archive.image.exposure import Exposure

    for _, p in prods.iterrows():
        wcs = Exposure.read(arc.products_root() / p["path"]).wcs
        s = arc.sql(f"SELECT x, y, ra, dec FROM source WHERE exposure_id = {int(p['exposure_id'])}")
        ra, dec = wcs.all_pix2world(s["x"], s["y"], 0)
        assert np.abs(angular_separation_deg(ra % 360, dec, s["ra"], s["dec"]) * 3.6e6).max() < 0.01  # mas
    # sources lie on true stars
    src = arc.sql("SELECT ra, dec, psf_flux, snr FROM source WHERE snr > 20")
    objs = pd.read_parquet(survey / "truth" / "objects.parquet")
    from scipy.spatial import cKDTree

    tree = cKDTree(np.c_[objs["ra"], objs["dec"]])
    d, i = tree.query(np.c_[src["ra"], src["dec"]])
    sep = angular_separation_deg(src["ra"], src["dec"], objs["ra"].to_numpy()[i], objs["dec"].to_numpy()[i]) * 3600
    assert np.median(sep) < 0.1
    # sources of the epochs are matched into matched_source objects
    ms = arc.sql("SELECT count(*) AS n, max(n_epochs) AS k FROM matched_source")
    assert ms["n"].iloc[0] > 50 and ms["k"].iloc[0] == len(rep.processed)
    assert arc.sql("SELECT count(*) AS n FROM source WHERE matched_source_id IS NULL")["n"].iloc[0] == 0
    # resume: nothing is processed twice
    again = arc.process_raws(raws, calib, refcat=survey / "refcat.parquet")
    assert again.processed == [] and sorted(again.skipped) == sorted(rep.processed + list(rep.rejected))
    assert arc.count("source") == rep.n_sources
    arc.close()


def test_bad_frame_is_rejected_with_reason(survey, tmp_path):
    raws, calib = _inputs(survey)
    bad = tmp_path / "constant.fits"
    with fits.open(raws[0]) as hdul:
        hdul[0].data[:] = 1000
        hdul[0].header["VISIT"] = 99
        hdul.writeto(bad)
    arc = Archive.init(tmp_path / "arc")
    rep = arc.process_raws([bad], calib, refcat=survey / "refcat.parquet")
    assert list(rep.rejected) == [99000]
    row = arc.get("exposure", [99000]).iloc[0]
    # after ISR a flat raw frame is sky-less noise-less structure: no PSF stars
    assert row["status"] == "rejected"
    assert row["quality_reason"] == rep.rejected[99000] and row["quality_reason"].startswith(("psf:", "quality:"))
    assert row["quality_flags"] != 0
    if row["quality_reason"].startswith("psf:"):
        assert row["quality_flags"] == 1 << QUALITY_BITS["STEP_FAILED"]
    assert arc.count("source") == 0 and arc.count("image_product") == 0
    arc.close()


def test_bad_inputs(survey, tmp_path):
    from archive.errors import ArchiveError, NotFoundError

    raws, calib = _inputs(survey)
    arc = Archive.init(tmp_path / "arc")
    with pytest.raises(NotFoundError, match="no such raw file"):
        arc.process_raws([tmp_path / "nope.fits"], calib)
    with pytest.raises(ArchiveError, match="expected a science"):
        arc.process_raws([calib[0]], calib)
    assert arc.count("exposure") == 0
    arc.close()


def test_matched_api_on_processed_field(processed, tmp_path):
    """The Python face of matched sources on a processed field: the epochs x sources matrix."""
    from archive.sky.regions import Cone

    path, rep = processed
    arc = Archive.open(path)
    field = Cone(150.0, 2.0, 0.2)
    mat = arc.epoch_matrix(field, "r", "psf_flux", path=tmp_path / "m.parquet")
    assert mat.shape[0] == len(rep.processed) and mat.shape[1] > 20
    assert np.isfinite(mat.to_numpy()).sum() > 0.5 * mat.size
    back = pd.read_parquet(tmp_path / "m.parquet").set_index("exposure_id")
    assert back.shape == mat.shape and list(back.index) == list(mat.index)
    np.testing.assert_array_equal(back.to_numpy(), mat.to_numpy())
    arc.close()


def test_cloudy_and_defocused_epochs_are_rejected_against_the_others(tmp_path):
    root = tmp_path / "survey"
    simulate_survey(root, SimConfig(seed=5, n_epochs=5, size=640, star_density=60, bad_epochs={2: "clouds", 4: "focus"},
                                    streak_epochs=(), n_bias=3, n_dark=3, n_flat=3))
    raws, calib = _inputs(root)
    with Archive.init(tmp_path / "arc") as arc:
        rep = arc.process_raws(raws, calib, refcat=root / "refcat.parquet")
        assert not rep.failed, rep.failed
        assert sorted(rep.rejected) == [3000, 5000], rep.rejected
        # the cloudy epoch passes every single-frame step and only the comparison catches it; the
        # defocused one has too few sharp stars for a PSF already (POOR_SEEING: tests/process)
        assert "below the median" in rep.rejected[3000] and rep.rejected[5000].startswith(("psf:", "quality:"))
        exp = arc.sql("SELECT * FROM exposure ORDER BY exposure_id").set_index("exposure_id")
        assert exp.loc[3000, "quality_flags"] == 1 << QUALITY_BITS["LOW_TRANSPARENCY"]
        # the measured zero point stays on the rejected row: users see why
        assert exp.loc[3000, "zero_point"] < exp.loc[1000, "zero_point"] - 0.75
        # nothing of a rejected exposure is kept: no sources, no calexp row or file
        assert arc.sql("SELECT count(*) AS n FROM source WHERE exposure_id IN (3000, 5000)")["n"].iloc[0] == 0
        prods = arc.sql("SELECT exposure_id, path FROM image_product WHERE kind = 'calexp'")
        assert sorted(prods["exposure_id"]) == [1000, 2000, 4000]
        assert sorted(p.name for p in (arc.products_root() / "calexp").rglob("*.fits")) == sorted(
            pathlib.Path(p).name for p in prods["path"])
        assert sorted(rep.refined) == [1000, 2000, 4000]
