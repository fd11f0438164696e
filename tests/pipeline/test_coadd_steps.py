"""Warps, coadds and templates as steps of `archive run`: registered per tile, with provenance,
resumable, recomputed when their config changes, readable by astropy; the simulator's
single-epoch transients and moving object clipped, its coadd without their light."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from archive.api import Archive
from archive.cli.main import main
from archive.pipeline.products import sha256_file
from archive.sim.config import SimConfig
from simrun import simulate_and_run, tile_centre

ORDER = 9
CONFIG = {"warp": {"skymap": {"order": ORDER}}, "template": {"select": {"max_inputs": 3}}}


@pytest.fixture(scope="module")
def archive_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("coaddsim")
    # the field centred on a tile's centre: one tile holds it
    ra0, dec0 = tile_centre(ORDER)
    repo, reports = simulate_and_run(root, SimConfig(seed=21, n_epochs=5, size=640, ra0=ra0, dec0=dec0,
                                                     star_density=60, n_transients=3, bad_epochs={}, n_bias=2,
                                                     n_dark=2, n_flat=2, dither_arcsec=8.0), CONFIG)
    return root, repo, reports


def test_warps_coadds_templates_are_registered_per_tile(archive_run):
    root, repo, reports = archive_run
    assert not any(r.failed for r in reports.values()), {k: r.failed for k, r in reports.items()}
    with Archive.open(repo) as arc:
        prods = arc.sql("SELECT * FROM image_product")
        processed = arc.sql("SELECT exposure_id FROM exposure WHERE status = 'processed'")["exposure_id"]
        warps = prods[prods["kind"] == "warp"]
        assert sorted(warps["exposure_id"]) == sorted(processed) and warps["tile_id"].nunique() == 1
        tile = int(warps["tile_id"].iloc[0])
        for kind in ("coadd", "template"):
            row = prods[prods["kind"] == kind]
            assert len(row) == 1 and int(row["tile_id"].iloc[0]) == tile and row["exposure_id"].isna().all()
        for p in prods.itertuples():
            assert sha256_file(arc.products_root() / p.path) == p.sha256
        prov = arc.sql("SELECT * FROM provenance WHERE step IN ('coadd', 'template')")
        coadd_prov = prov[prov["step"] == "coadd"].iloc[0]
        assert len(json.loads(coadd_prov["inputs"])) == len(processed)
        assert json.loads(coadd_prov["config"])["coadd"]["artifacts"]["detect_sigma"] == 7.5
        template_prov = prov[prov["step"] == "template"].iloc[0]
        assert len(json.loads(template_prov["inputs"])) == 3  # the three best-seeing epochs
        units = arc.status(config=CONFIG, units=True)
        assert f"tile:{tile}:r" in set(units[units["step"] == "coadd"]["unit"])
        assert (units["state"] == "done").all()
        coadd_path = arc.products_root() / prods[prods["kind"] == "coadd"]["path"].iloc[0]
    with fits.open(coadd_path) as hdul:
        names = [h.name for h in hdul]
        assert {"IMAGE", "MASK", "VARIANCE", "N_IMAGE", "INPUT_MAP", "INPUTS"} <= set(names)
        assert hdul["MASK"].header["MP_CLIPPED"] == 7 and hdul["MASK"].header["MP_NO_DATA"] == 4
        assert set(hdul["INPUTS"].data["exposure_id"]) == set(processed)
        assert hdul["N_IMAGE"].data.max() == len(processed)


def test_single_epoch_sources_are_clipped_from_the_coadd(archive_run):
    from archive.image.exposure import Exposure

    root, repo, _ = archive_run
    truth = pd.read_parquet(root / "sim" / "truth" / "sources.parquet")
    with Archive.open(repo) as arc:
        row = arc.sql("SELECT path FROM image_product WHERE kind = 'coadd'")
        co = Exposure.read(arc.products_root() / row["path"].iloc[0])
    path = arc.products_root() / row["path"].iloc[0]
    input_map = fits.getdata(path, "INPUT_MAP")
    inputs = list(fits.getdata(path, "INPUTS")["exposure_id"])
    sigma = np.sqrt(co.variance)
    # the moving object, at each epoch's position: left out of the coadd there
    mover = truth[truth["kind"] == "moving"]
    checked = 0
    for _, m in mover.iterrows():
        x, y = (int(round(float(v[0]))) for v in co.wcs.all_world2pix([m["ra"]], [m["dec"]], 0))
        if not (0 <= x < co.shape[1] and 0 <= y < co.shape[0]):
            continue
        eid = int(m["visit"]) * 1000 + int(m["detector"])
        if eid not in inputs:
            continue
        assert not (int(input_map[y, x]) >> inputs.index(eid)) & 1, m["visit"]  # its epoch left out there
        assert co.image[y, x] < 5 * sigma[y, x]
        checked += 1
    assert checked >= 3


def test_rerun_is_a_no_op_and_a_new_config_recomputes(archive_run, capsys):
    root, repo, _ = archive_run
    with Archive.open(repo) as arc:
        again = arc.run(config=CONFIG, progress=False)
        assert all(not r.done for r in again.values())
        changed = {**CONFIG, "coadd": {"coadd": {"artifacts": {"detect_sigma": 9.0}}}}
        status = arc.status(config=changed).set_index("step")
        assert status.loc["coadd", "stale"] == 1 and status.loc["template", "stale"] == 0
        before = arc.sql("SELECT sha256 FROM image_product WHERE kind = 'coadd'")["sha256"].iloc[0]
        rep = arc.run(config=changed, until="coadd", progress=False)
        assert rep["coadd"].done and not rep["warp"].done
        after = arc.sql("SELECT path, sha256 FROM image_product WHERE kind = 'coadd'")
        assert len(after) == 1 and after["sha256"].iloc[0] != before
    # the per-unit status from the command line
    assert main(["status", "--repo", str(repo), "--step", "coadd", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "step,unit,state,reason" and ",tile:" in out
