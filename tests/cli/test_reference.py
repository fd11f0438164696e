"""Data a user can read: the flag reference (generated from the code) and light curves in AB magnitudes."""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pandas as pd

from archive.cli.main import main


def _out(capsys, *args, rc=0):
    capsys.readouterr()
    assert main([str(a) for a in args]) == rc
    return capsys.readouterr()


# -- flags ---------------------------------------------------------------------------------
def test_flags_doc_is_generated_from_the_code():
    from archive.api import Archive

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "flags.md"
    assert doc.read_text() == Archive.flags_markdown() + "\n", \
        "regenerate: archive flags --markdown > docs/flags.md"


def test_every_flag_the_code_defines_is_explained():
    from archive.catalog.association import DUPLICATE_FLAG
    from archive.flags import MEANINGS, bits
    from archive.image.mask import DEFAULT_MASK_PLANES
    from archive.pipeline.single_epoch import QUALITY_BITS
    from archive.process.flags import MEASUREMENT_FLAGS

    rows = bits()
    assert all(r["meaning"] for r in rows), [r["name"] for r in rows if not r["meaning"]]
    names = {r["name"] for r in rows}
    assert set(MEANINGS) == names  # no meaning left over for a name the code dropped
    src = {r["name"]: r["bit"] for r in rows if r["column"] == "source.flags"}
    dia = {r["name"]: r["bit"] for r in rows if r["column"] == "dia_source.flags"}
    qual = {r["name"]: r["bit"] for r in rows if r["column"] == "exposure.quality_flags"}
    assert {k: src[k] for k in DEFAULT_MASK_PLANES} == DEFAULT_MASK_PLANES
    assert all(1 << src[k] == int(v) for k, v in MEASUREMENT_FLAGS.items())
    assert 1 << dia["DUPLICATE"] == int(DUPLICATE_FLAG) and dia["DUPLICATE"] == 56 and "DUPLICATE" not in src
    from archive.process.diffim.detection import DIA_FLAGS

    assert all(1 << dia[k] == int(v) for k, v in DIA_FLAGS.items()) and not set(DIA_FLAGS) & set(src)
    assert qual == QUALITY_BITS
    for column in ("source.flags", "dia_source.flags", "exposure.quality_flags"):  # one name per bit
        bits_of = [r["bit"] for r in rows if r["column"] == column]
        assert len(bits_of) == len(set(bits_of))


def test_flags_command_lists_and_decodes(capsys):
    listed = pd.read_csv(io.StringIO(_out(capsys, "flags", "--format", "csv").out))
    assert list(listed.columns) == ["column", "bit", "value", "name", "meaning"]
    assert set(listed["column"]) == {"source.flags", "dia_source.flags", "exposure.quality_flags"}
    value = (1 << 56) | (1 << 36) | (1 << 1)  # duplicate, blended, saturated
    dec = pd.read_csv(io.StringIO(_out(capsys, "flags", "decode", value, "--column", "dia_source.flags",
                                       "--format", "csv").out))
    assert dec["name"].tolist() == ["SAT", "BLENDED", "DUPLICATE"] and dec["bit"].tolist() == [1, 36, 56]
    # hex, and the same value read as a source flag: bit 56 means nothing there
    dec = json.loads(_out(capsys, "flags", "decode", hex(value), "--column", "source.flags", "--format", "json").out)
    assert [d["name"] for d in dec] == ["SAT", "BLENDED", "?"]
    q = pd.read_csv(io.StringIO(_out(capsys, "flags", "decode", "0b100000000000010", "--column",
                                     "exposure.quality_flags", "--format", "csv").out))
    assert q["name"].tolist() == ["EMPTY", "NO_PHOTOCAL"]
    err = _out(capsys, "flags", "decode", "twelve", rc=2).err
    assert "'twelve' is not an integer" in err and len(err.strip().splitlines()) == 1
    err = _out(capsys, "flags", "decode", rc=2).err
    assert "usage" in err and len(err.strip().splitlines()) == 1


# -- light curves --------------------------------------------------------------------------
def _visits(tmp_path, fluxes, errs):
    files = []
    for v, (f, e) in enumerate(zip(fluxes, errs), start=1):
        path = tmp_path / f"v{v}.parquet"
        pd.DataFrame({"dia_source_id": [100 * v], "exposure_id": v, "visit": v, "detector": 0, "band": "r",
                      "mjd": 60000.0 + v, "ra": 80.0, "dec": -30.0, "psf_flux": f, "psf_flux_err": e,
                      "flags": 0}).to_parquet(path)
        files.append(path)
    return files


def test_light_curve_in_ab_magnitudes_with_upper_limits(repo, tmp_path, capsys):
    # AB = 31.4 - 2.5 log10(flux / nJy): 10**3.56 nJy is 22.5; 20 nJy +- 10 is 2 sigma: a limit at 50 nJy
    f1, f2 = 10 ** 3.56, 10 ** 4.56
    for f in _visits(tmp_path, [f1, f2], [f1 / 100, 100.0]):
        _out(capsys, "ingest", "dia-sources", "--repo", repo, f)
    oid = json.loads(_out(capsys, "sql", "--repo", repo, "--format", "json",
                          "SELECT DISTINCT dia_object_id FROM dia_source").out)[0]["dia_object_id"]
    forced = pd.DataFrame({"dia_forced_source_id": [7001, 7002], "dia_object_id": oid, "exposure_id": [3, 4],
                           "visit": [3, 4], "detector": 0, "band": "r", "mjd": [60003.0, 60004.0], "ra": 80.0,
                           "dec": -30.0, "psf_flux": [20.0, -15.0], "psf_flux_err": [10.0, 10.0], "flags": 0})
    forced.to_parquet(tmp_path / "forced.parquet")
    _out(capsys, "ingest", "forced", "--repo", repo, tmp_path / "forced.parquet")
    png = tmp_path / "lc.png"
    lc = json.loads(_out(capsys, "lightcurve", "--repo", repo, oid, "--format", "json", "--plot", png).out)
    assert [r["kind"] for r in lc] == ["detection", "detection", "forced", "forced"]
    assert abs(lc[0]["mag"] - 22.5) < 1e-9 and abs(lc[1]["mag"] - 20.0) < 1e-9
    assert abs(lc[0]["mag_err"] - 2.5 / np.log(10) * 0.01) < 1e-12 and lc[0]["mag_limit"] is None
    for r in lc[2:]:  # below 5 sigma: no magnitude, a 5-sigma limit of 50 nJy
        assert r["mag"] is None and abs(r["mag_limit"] - (31.4 - 2.5 * np.log10(50.0))) < 1e-9
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_light_curve_figure_axes():
    """Magnitudes brighter up, limits drawn as downward triangles, MJD written out in full."""
    import matplotlib.pyplot as plt

    from archive.cli.dia import light_curve_figure

    lc = pd.DataFrame({"mjd": [60001.25, 60002.5, 60003.75], "band": "g", "flux": [3631.0, 3000.0, 5.0],
                       "flux_err": [36.0, 30.0, 10.0], "mag": [22.5, 22.707, np.nan],
                       "mag_err": [0.01, 0.01, np.nan], "mag_limit": [np.nan, np.nan, 25.65],
                       "kind": ["detection", "forced", "forced"]})
    fig = light_curve_figure(lc, 5)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.yaxis_inverted() and ax.get_xlabel() == "MJD (TAI)"
    assert ax.xaxis.get_major_formatter().get_offset() == ""  # no "+6e4" offset
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(lab.replace("\u2212", "-").replace(".", "").isdigit() and float(lab) > 60000
                          for lab in labels), labels
    limits = [line for line in ax.get_lines() if line.get_gid() == "limit-g-forced"]
    assert len(limits) == 1 and limits[0].get_marker() == "v" and list(limits[0].get_ydata()) == [25.65]
    top = ax.child_axes[0]  # UTC calendar dates along the top: MJD 60002 is 2023-02-27
    assert "2023" in top.xaxis.get_major_formatter().get_offset()
    assert "Feb-27" in [t.get_text() for t in top.xaxis.get_ticklabels()]
    plt.close(fig)
    flux = light_curve_figure(lc, 5, units="flux")
    assert not flux.axes[0].yaxis_inverted() and "nJy" in flux.axes[0].get_ylabel()
    plt.close(flux)
