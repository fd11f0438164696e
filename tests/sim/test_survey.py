import json

import numpy as np
import pandas as pd
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits

from archive.cli.main import main
from archive.errors import ValidationError
from archive.image.raw import read_raw
from archive.sim import SimConfig, load_manifest, simulate_survey, truth_psf, wcs_from_text


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    cfg = SimConfig(size=160, n_epochs=4, n_detectors=2, bands=("r", "g"), seed=9, n_bias=2, n_dark=2, n_flat=2)
    manifest = simulate_survey(out, cfg)
    return out, cfg, manifest


def test_manifest_and_files(survey):
    out, cfg, manifest = survey
    assert load_manifest(out) == json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["raws"] == 8 == len(manifest["raws"])
    assert len(manifest["calib"]["bias"]) == 4 and len(manifest["calib"]["dark"]) == 4
    assert sorted(manifest["calib"]["flat"]) == ["g", "r"] and len(manifest["calib"]["flat"]["g"]) == 4
    assert SimConfig.from_dict(manifest["config"]) == cfg
    assert list(manifest["counts"]["bad_epochs"].values()) == ["clouds"]  # n_epochs = 4: one cloudy visit
    for entry in manifest["raws"]:
        raw = read_raw(out / entry["path"])
        assert raw.imagetyp == "OBJECT"
        info = raw.info
        assert (info.visit, info.detector, info.band) == (entry["visit"], entry["detector"], entry["band"])
        assert info.mjd == entry["mjd"]
        assert raw.image.shape == (cfg.ny, cfg.nx) and raw.overscan.shape == (cfg.ny, cfg.overscan_width)
        assert raw.wcs is not None and raw.header["SATURATE"] < 65535
    for kind in ("bias", "dark"):
        for entry in manifest["calib"][kind]:
            assert read_raw(out / entry["path"]).imagetyp == kind.upper()
    flat = read_raw(out / manifest["calib"]["flat"]["g"][0]["path"])
    assert flat.imagetyp == "FLAT" and flat.info.band == "g"


def test_truth_tables(survey):
    out, cfg, manifest = survey
    t = {k: pd.read_parquet(out / v) for k, v in manifest["truth"].items()}
    ep = t["epochs"]
    assert len(ep) == 8 and set(ep.detector) == {0, 1}
    assert set(ep.band) == {"r", "g"} and set(ep.quality) == {"good", "clouds"}
    src = t["sources"]
    for col in ("visit", "detector", "object_id", "kind", "x", "y", "flux_njy", "counts", "psf_fwhm"):
        assert col in src
    assert src.x.between(-0.5, cfg.nx - 0.5).all()
    objs = t["objects"].set_index("object_id")
    assert set(src.object_id) <= set(objs.index)
    assert (t["defects"].kind.isin(["hot_pixel", "bad_column"])).all()
    assert {"x0", "y0", "x1", "y1", "e_per_px"} <= set(t["cosmic_rays"].columns)
    # true WCS vs header WCS: off by the recorded pointing error; truth positions follow the true WCS
    row = ep.iloc[0]
    tw, hw = wcs_from_text(row.wcs_true), wcs_from_text(row.wcs_header)
    s = src[(src.visit == row.visit) & (src.detector == row.detector)]
    ra, dec = tw.all_pix2world(s.x, s.y, 0)
    np.testing.assert_allclose(ra, s.ra, atol=1e-9)
    off = SkyCoord(*tw.all_pix2world([[80.0, 80.0]], 0)[0], unit="deg").separation(
        SkyCoord(*hw.all_pix2world([[80.0, 80.0]], 0)[0], unit="deg")).arcsec
    assert off == pytest.approx(np.hypot(row.wcs_dra_arcsec, row.wcs_ddec_arcsec), abs=0.5)
    raw = read_raw(out / manifest["raws"][0]["path"])
    np.testing.assert_allclose(raw.wcs.wcs.crval, hw.wcs.crval, rtol=0, atol=1e-12)
    psf = truth_psf(row)
    assert psf.fwhm() == pytest.approx(row.psf_fwhm)
    assert psf.ellipticity() == row.psf_ellipticity and 0 <= psf.ellipticity() < 0.5
    here = s[s.kind == "star"].iloc[0]
    assert psf.fwhm(here.x, here.y) == pytest.approx(here.psf_fwhm, rel=1e-12)
    ref = pd.read_parquet(out / manifest["refcat"])
    assert {"ra", "dec", "g", "r", "i", "g_err", "r_err", "i_err"} <= set(ref.columns)


def test_deterministic_and_refuses_non_empty(survey, tmp_path):
    out, cfg, manifest = survey
    cfg2 = SimConfig(**{**cfg.__dict__, "n_epochs": 1, "n_detectors": 1})
    a = simulate_survey(tmp_path / "a", cfg2)
    b = simulate_survey(tmp_path / "b", cfg2)
    for ra, rb in zip(a["raws"], b["raws"]):
        assert (tmp_path / "a" / ra["path"]).read_bytes() == (tmp_path / "b" / rb["path"]).read_bytes()
    for ca, cb in zip(a["calib"]["bias"], b["calib"]["bias"]):
        assert (tmp_path / "a" / ca["path"]).read_bytes() == (tmp_path / "b" / cb["path"]).read_bytes()
    c = simulate_survey(tmp_path / "c", SimConfig(**{**cfg2.__dict__, "seed": cfg2.seed + 1}))
    with fits.open(tmp_path / "a" / a["raws"][0]["path"]) as h1, fits.open(tmp_path / "c" / c["raws"][0]["path"]) as h2:
        assert not np.array_equal(h1[0].data, h2[0].data)
    with pytest.raises(ValidationError, match="not empty"):
        simulate_survey(tmp_path / "a", cfg2)
    # overwrite replaces an earlier, larger set without leaving its files behind
    (tmp_path / "a" / "keep.txt").write_text("user file")
    cfg3 = SimConfig(**{**cfg2.__dict__, "n_bias": 1})
    simulate_survey(tmp_path / "a", cfg3, overwrite=True)
    assert len(list((tmp_path / "a" / "calib" / "bias").iterdir())) == 1
    assert (tmp_path / "a" / "keep.txt").read_text() == "user file"


def test_cli_sim(tmp_path, capsys):
    rc = main(["sim", str(tmp_path / "s"), "--epochs", "2", "--size", "96", "--seed", "4", "--bands", "g,i"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 2 raw frame(s)" in out
    m = load_manifest(tmp_path / "s")
    assert m["config"]["seed"] == 4 and m["config"]["bands"] == ["g", "i"]
    rc = main(["sim", str(tmp_path / "s"), "--epochs", "2", "--size", "96"])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    assert main(["sim", str(tmp_path / "t"), "--epochs", "0"]) == 2
    # --config: a previous manifest reproduces the set; command-line options override it
    rc = main(["sim", str(tmp_path / "u"), "--config", str(tmp_path / "s" / "manifest.json"), "--seed", "5"])
    assert rc == 0
    m2 = load_manifest(tmp_path / "u")
    assert m2["config"] == {**m["config"], "seed": 5}
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["sim", str(tmp_path / "v"), "--config", str(tmp_path / "bad.json")]) == 2
