"""``archive matched`` end to end, in process, on both backends."""

from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from astropy.table import Table

from archive.catalog.schema import load_schema
from archive.cli.main import main

N_STAR, N_EP = 60, 5
RA0, DEC0 = 45.0, -20.0


@pytest.fixture(params=["parquet", "postgres"])
def repo(request, tmp_path):
    if request.param == "parquet":
        path = str(tmp_path / "arc")
        assert main(["init", path]) == 0
        return path
    url = request.getfixturevalue("pg_store_url")
    engine = sa.create_engine(url)
    with engine.begin() as con:
        con.execute(sa.text("TRUNCATE " + ", ".join(t.name for t in load_schema())))
    engine.dispose()
    return url


def _field(seed=3):
    """Stars on a 20" grid, per-epoch offsets, star 0 variable; every star on every epoch
    except star 1, missing on epoch 2."""
    rng = np.random.default_rng(seed)
    k = np.arange(N_STAR)
    ra = RA0 + (k % 10) * 20 / 3600 / np.cos(np.radians(DEC0))
    dec = DEC0 + (k // 10) * 20 / 3600
    mag0 = np.linspace(15, 18.5, N_STAR)
    zp = np.array([0.0, 0.08, -0.05, 0.12, -0.1])
    epochs = []
    for j in range(N_EP):
        m = mag0 + zp[j] + np.where(k == 0, 0.5 * (j % 2), 0.0)
        flux = 10 ** (-0.4 * (m - 31.4))
        err = 0.002 * flux + 500.0
        keep = ~((k == 1) & (j == 2))
        epochs.append(pd.DataFrame({
            "source_id": 1000 * (j + 1) + k[keep], "exposure_id": 10 + j, "visit": 10 + j,
            "detector": 0, "band": "g", "mjd": 60100.0 + j, "ra": ra[keep], "dec": dec[keep],
            "psf_flux": (flux + rng.normal(0, err))[keep], "psf_flux_err": err[keep], "flags": 0}))
    return epochs, zp


def _write(df, path):
    path = str(path)
    if path.endswith(".parquet"):
        df.to_parquet(path)
    elif path.endswith(".csv"):
        df.to_csv(path, index=False)
    else:
        Table.from_pandas(df).write(path)
    return path


FIELD = ["--ra", str(RA0 + 0.025), "--dec", str(DEC0 + 0.008), "--radius-deg", "0.1", "--band", "g"]


def test_matched_workflow(repo, tmp_path, capsys):
    epochs, zp = _field()
    files = [_write(e, tmp_path / f"e{j}.{['parquet', 'csv', 'fits'][j % 3]}") for j, e in enumerate(epochs)]
    assert main(["matched", "ingest", "--repo", repo, *files[:2]]) == 0
    assert f"{N_STAR} new matched source(s)" in capsys.readouterr().err
    assert main(["matched", "ingest", "--repo", repo, *files[2:]]) == 0
    assert f"0 new matched source(s), {N_STAR} updated" in capsys.readouterr().err
    # re-ingest: one clear line, exit 2; --replace works
    assert main(["matched", "ingest", "--repo", repo, files[3]]) == 2
    err = capsys.readouterr().err
    assert "already ingested" in err and len(err.strip().splitlines()) == 1
    assert main(["matched", "ingest", "--repo", repo, "--replace", files[3]]) == 0
    assert f"{N_STAR} replaced" in capsys.readouterr().err

    assert main(["matched", "zeropoints", "--repo", repo, *FIELD, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    fit = np.array([r["zp"] for r in sorted(rows, key=lambda r: r["exposure_id"])])
    np.testing.assert_allclose(fit - np.median(fit), zp - np.median(zp), atol=0.003)

    png = tmp_path / "rms.png"
    assert main(["matched", "rms", "--repo", repo, *FIELD, "--plot", str(png), "--format", "csv"]) == 0
    out = capsys.readouterr()
    assert "1 above the rms curve" in out.err and png.stat().st_size > 5000
    table = pd.read_csv(io.StringIO(out.out))
    assert len(table) == N_STAR
    var = table[table["outlier"]]  # star 0 (15 mag, alternating by 0.5 mag), at the grid corner
    assert len(var) == 1 and abs(var["ra"].iloc[0] - RA0) < 1e-4 and abs(var["dec"].iloc[0] - DEC0) < 1e-4
    assert var["rms_mag"].iloc[0] > 0.2

    h5 = tmp_path / "m.h5"
    assert main(["matched", "matrix", "--repo", repo, *FIELD, "-o", str(h5)]) == 0
    assert f"{N_EP} epoch(s) x {N_STAR} matched source(s)" in capsys.readouterr().err
    with h5py.File(h5) as f:
        vals = f["values"][...]
        assert vals.shape == (N_EP, N_STAR)
        assert f["exposure_id"][...].tolist() == list(range(10, 10 + N_EP))
    assert np.isnan(vals).sum() == 1 and np.isnan(vals[2]).sum() == 1
    pqf = tmp_path / "m.parquet"
    assert main(["matched", "matrix", "--repo", repo, *FIELD, "--property", "mjd", "-o", str(pqf)]) == 0
    capsys.readouterr()
    mjd = pd.read_parquet(pqf).set_index("exposure_id")
    assert mjd.shape == (N_EP, N_STAR)
    np.testing.assert_allclose(np.nanmax(mjd.to_numpy(), axis=1), 60100.0 + np.arange(N_EP))


def test_matched_errors(repo, tmp_path, capsys):
    assert main(["matched", "ingest", "--repo", repo, str(tmp_path / "missing.parquet")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = _write(_field()[0][0].drop(columns=["exposure_id"]), tmp_path / "bad.parquet")
    assert main(["matched", "ingest", "--repo", repo, bad]) == 2
    assert "exposure_id" in capsys.readouterr().err
    assert main(["matched", "rms", "--repo", repo, *FIELD]) == 2
    assert "no matched sources" in capsys.readouterr().err
    good = _write(_field()[0][0], tmp_path / "good.parquet")
    assert main(["matched", "ingest", "--repo", repo, good]) == 0
    capsys.readouterr()
    assert main(["matched", "matrix", "--repo", repo, *FIELD, "-o", str(tmp_path / "m.txt")]) == 2
    assert "must end in .parquet, .h5 or .hdf5" in capsys.readouterr().err
    assert main(["matched", "matrix", "--repo", repo, *FIELD[:-1], "q", "-o", str(tmp_path / "m.h5")]) == 2
    assert "unknown band" in capsys.readouterr().err
    assert main(["matched", "rms", "--repo", repo, "--ra", "0", "--dec", "95", "--radius-deg", "1",
                 "--band", "g"]) == 2
    assert "dec must be within" in capsys.readouterr().err
