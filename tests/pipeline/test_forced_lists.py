"""Forced photometry at any list of positions as steps of `archive run`, on the simulator: the
templates' own catalogs (primary copies counted once across overlapping tiles) measured on every
difference, the templates measured at DIAObject positions, and a user's list on every epoch
(bad lists refused whole, re-runs without duplicates, resumable)."""

from __future__ import annotations

import shutil

import healpy as hp
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from archive.api import Archive
from archive.cli.main import main
from archive.errors import ValidationError
from archive.sim.config import SimConfig
from simrun import simulate_and_run, tile_centre

ORDER = 9
CONFIG = {"warp": {"skymap": {"order": ORDER}}, "template": {"select": {"max_inputs": 3}}}
#: mask planes that spoil a forced flux (BAD SAT CR EDGE NO_DATA INTRP CLIPPED STREAK SUSPECT) and
#: every forced-measurement bit
SPOILED = np.int64(sum(1 << b for b in (0, 1, 2, 3, 4, 5, 7, 8, 9))) | np.int64(-1 << 32)


def _on_tile_edge() -> tuple[float, float]:
    """A point on the border of two order-9 HEALPix pixels: a field there lies on two tiles' cores."""
    nside = 1 << ORDER
    p = hp.ang2pix(nside, 150.0, 2.0, nest=True, lonlat=True)
    ra0, dec0 = tile_centre(ORDER)
    lo, hi = ra0, ra0
    while hp.ang2pix(nside, hi, dec0, nest=True, lonlat=True) == p:
        hi += 0.001
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if hp.ang2pix(nside, mid, dec0, nest=True, lonlat=True) == p else (lo, mid)
    return lo, dec0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("forcedlists")
    ra0, dec0 = _on_tile_edge()
    repo, reports = simulate_and_run(root, SimConfig(seed=21, n_epochs=6, size=512, ra0=ra0, dec0=dec0,
                                                     star_density=60, n_transients=2, bad_epochs={}, n_bias=2,
                                                     n_dark=2, n_flat=2, dither_arcsec=4.0,
                                                     variable_fraction=0.3), CONFIG)
    return root, repo, reports


def _match(ra, dec, truth: pd.DataFrame, radius_arcsec: float = 0.4) -> np.ndarray:
    c = np.cos(np.radians(float(np.median(truth["dec"]))))
    tree = cKDTree(np.c_[truth["ra"].to_numpy() * c, truth["dec"].to_numpy()])
    d, i = tree.query(np.c_[np.asarray(ra) * c, np.asarray(dec)], distance_upper_bound=radius_arcsec / 3600)
    return np.where(np.isfinite(d), i, -1)


def _truth(root) -> pd.DataFrame:
    truth = pd.read_parquet(root / "sim" / "truth" / "objects.parquet")
    c = np.cos(np.radians(float(np.median(truth["dec"]))))
    xy = np.c_[truth["ra"] * c, truth["dec"]]
    truth["isolated"] = cKDTree(xy).query(xy, k=2)[0][:, 1] * 3600 > 2.5
    return truth


def test_steps_ran_and_template_catalog_counts_each_object_once(run):
    root, repo, reports = run
    for step in ("template_catalog", "template_forced", "dia_template"):
        assert reports[step].done and not reports[step].failed, (step, reports[step].failed)
    truth = _truth(root)
    with Archive.open(repo) as arc:
        ts = arc.sql("SELECT template_source_id, tile_id, ra, dec, is_primary, flags FROM template_source")
    assert ts["tile_id"].nunique() >= 2
    ts["truth"] = _match(ts["ra"], ts["dec"], truth)
    clean = ts[(ts["truth"] >= 0) & ((ts["flags"].to_numpy(np.int64) & 8) == 0)]  # not at a template's EDGE
    per_object = clean.groupby("truth").agg(tiles=("tile_id", "nunique"), primary=("is_primary", "sum"))
    in_two = per_object[per_object["tiles"] >= 2]
    assert len(in_two) >= 5  # objects in the overlap of two tiles...
    assert (per_object["primary"] <= 1).all()  # never counted twice...
    # ...and once, unless the copy in the object's own tile was lost (e.g. at that template's edge)
    assert (in_two["primary"] == 1).mean() > 0.9


def test_template_forced_pulls_of_constant_stars(run):
    root, repo, _ = run
    truth = _truth(root)
    with Archive.open(repo) as arc:
        tf = arc.sql("SELECT template_source_id, exposure_id, ra, dec, psf_flux, psf_flux_err, flags "
                     "FROM template_forced_source")
    tf["truth"] = _match(tf["ra"], tf["dec"], truth)
    tf = tf[tf["truth"] >= 0]
    assert tf.groupby(["truth", "exposure_id"]).size().max() == 1  # one row per object and epoch
    row = truth.iloc[tf["truth"].to_numpy()]
    ok = ((tf["flags"].to_numpy(np.int64) & SPOILED) == 0) & (row["kind"].to_numpy() == "star") \
        & row["isolated"].to_numpy() & (row["flux_r"].to_numpy() < 3000)  # calibration mismatch spares these
    pull = (tf["psf_flux"] / tf["psf_flux_err"]).to_numpy()[ok]
    assert len(pull) > 150
    assert 0.9 <= pull.std() <= 1.1, pull.std()
    assert abs(pull.mean()) < 3 * pull.std() / np.sqrt(len(pull)) + PULL_MEAN_TOLERANCE, pull.mean()


#: The difference images of this field leave constant stars (and empty sky) a mean of about
#: -0.3 sigma (the `difference` step, not the forced fit: forced fits at the true positions show
#: the same); the test bounds what this step adds, not that.
PULL_MEAN_TOLERANCE = 0.5


def test_variable_stars_follow_their_truth_light_curves(run):
    root, repo, _ = run
    truth = _truth(root)
    epochs = pd.read_parquet(root / "sim" / "truth" / "sources.parquet")
    epochs["exposure_id"] = epochs["visit"] * 1000 + epochs["detector"]
    flux = epochs.set_index(["object_id", "exposure_id"])["flux_njy"]
    with Archive.open(repo) as arc:
        tf = arc.sql("SELECT f.exposure_id, f.ra, f.dec, f.psf_flux, f.psf_flux_err, f.flags, s.tile_id "
                     "FROM template_forced_source f JOIN template_source s USING (template_source_id)")
        tpl = arc.sql("SELECT tile_id, path FROM image_product WHERE kind = 'template'")
        inputs = {int(t): fits.getdata(arc.products_root() / p, "INPUTS") for t, p in zip(tpl["tile_id"], tpl["path"])}
    tf["truth"] = _match(tf["ra"], tf["dec"], truth)
    tf = tf[(tf["truth"] >= 0) & ((tf["flags"].to_numpy(np.int64) & SPOILED) == 0)]
    tf = tf[(truth["kind"].to_numpy()[tf["truth"]] == "variable") & truth["isolated"].to_numpy()[tf["truth"]]]
    expected = []
    for oid, eid, tile in zip(truth["object_id"].to_numpy()[tf["truth"]], tf["exposure_id"], tf["tile_id"]):
        inp = inputs[int(tile)]  # the template holds the weighted mean of the fluxes of its inputs
        on = [(flux[(oid, int(e))], w) for e, w in zip(inp["exposure_id"], inp["weight"])  # that hold the star
              if (oid, int(e)) in flux.index]
        ref = sum(f * w for f, w in on) / sum(w for _, w in on)
        expected.append(flux[(oid, int(eid))] - ref)
    expected = np.asarray(expected)
    big = np.abs(expected) > 5 * tf["psf_flux_err"].to_numpy()
    assert big.sum() >= 10  # real changes, seen
    # the change recovered: to 25% of itself for most (the template's weighted mean and the epochs'
    # calibrations are not known better here; see the report), and strongly correlated
    resid = tf["psf_flux"].to_numpy() - expected
    assert np.median(np.abs(resid[big]) / np.abs(expected[big])) < 0.25
    assert np.corrcoef(tf["psf_flux"].to_numpy()[big], expected[big])[0, 1] > 0.95


def test_template_flux_at_dia_objects_in_the_light_curve(run):
    _, repo, _ = run
    with Archive.open(repo) as arc:
        dt = arc.sql("SELECT dia_object_id, dia_source_id, band, image, is_primary, psf_flux FROM dia_template_source")
        assert len(dt) and (dt["image"] == "template").all()
        at_obj = dt[dt["dia_source_id"].isna()]
        assert at_obj.groupby(["dia_object_id", "band"])["is_primary"].sum().max() == 1
        assert dt["dia_source_id"].notna().any()  # DIASource positions measured too
        oid = int(at_obj[at_obj["is_primary"]]["dia_object_id"].iloc[0])
        lc = arc.light_curve(oid)
        assert {"template_flux", "template_flux_err", "total_flux", "total_flux_err"} <= set(lc.columns)
        assert np.isfinite(lc["template_flux"]).all()
        assert np.allclose(lc["total_flux"], lc["template_flux"] + lc["flux"], equal_nan=True)


def _list_frame(root, n_bad: int = 0) -> pd.DataFrame:
    truth = _truth(root)
    stars = truth[truth["kind"].isin(["star", "variable"])].head(200)
    return pd.DataFrame({"id": np.arange(1000, 1000 + len(stars)), "ra": stars["ra"].to_numpy(),
                         "dec": stars["dec"].to_numpy(), "mag": stars["mag_r"].to_numpy()})


def test_bad_lists_are_refused_whole(run, tmp_path, capsys):
    root, repo, _ = run
    good = _list_frame(root)
    bad = good.copy()
    bad.loc[3, "ra"] = np.nan
    bad.loc[7, "dec"] = 95.0
    bad.loc[9, "id"] = bad.loc[8, "id"]
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    with Archive.open(repo) as arc:
        before = (arc.count("forced_list"), arc.count("list_forced_source"))
    assert main(["forced", "--repo", str(repo), "--list", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "row 3 (id 1003): ra/dec not finite" in err[0] and "row 7 (id 1007): dec outside" in err[0]
    assert "rows 8 (id 1008), 9 (id 1008): duplicate id" in err[0] and "bad.csv" in err[0]
    good[["ra", "dec"]].to_parquet(tmp_path / "noid.parquet")
    with pytest.raises(ValidationError, match=r"noid.parquet: no an id"):
        Archive.open(repo).forced_list(tmp_path / "noid.parquet")
    with Archive.open(repo) as arc:
        assert (arc.count("forced_list"), arc.count("list_forced_source")) == before
        assert not (arc.products_root() / "lists").exists() or not list((arc.products_root() / "lists").iterdir())


def test_user_list_on_every_epoch_without_duplicates(run, tmp_path, capsys):
    root, repo, _ = run
    frame = _list_frame(root)
    # a FITS table as astropy writes it (units on the columns), and a CSV with extra columns
    t = Table.from_pandas(frame)
    t["ra"].unit, t["dec"].unit = "deg", "deg"
    t.write(tmp_path / "list.fits")
    frame.assign(note="x").to_csv(tmp_path / "list.csv", index=False)
    copy = tmp_path / "arc"
    shutil.copytree(repo, copy)
    with Archive.open(copy) as arc:
        lid, new, rep = arc.forced_list(tmp_path / "list.fits", images="both", recenter=True,
                                        products=arc.products_root())
        assert new and rep.done and not rep.failed
        rows = arc.sql(f"SELECT * FROM list_forced_source WHERE list_id = {lid}")
        n_exp = arc.sql("SELECT count(*) AS n FROM exposure WHERE status = 'processed'")["n"].iloc[0]
        assert set(rows["image"]) == {"calexp", "diff"} and rows["forced"].all()
        assert rows["exposure_id"].nunique() == n_exp
        assert set(rows["list_object_id"]) <= set(frame["id"])
        assert not rows.duplicated(["list_object_id", "exposure_id", "image"]).any()
        # LAST's rule: a moved position moved at most 0.2 px (checked on the calexp's grid)
        assert rows["moved"].any()
        # the same list again (here its CSV twin): nothing new, nothing duplicated
        lid2, new2, rep2 = arc.forced_list(tmp_path / "list.fits", images="both", recenter=True)
        assert lid2 == lid and not new2 and not rep2.done
        assert arc.count("list_forced_source") == len(rows)
        lid3, new3, _ = arc.forced_list(tmp_path / "list.csv")  # calexp only, fixed: another list
        assert new3 and lid3 != lid
        fixed = arc.sql(f"SELECT moved FROM list_forced_source WHERE list_id = {lid3}")
        assert len(fixed) and not fixed["moved"].any()
        # a list id's light curve
        oid = int(rows["list_object_id"].iloc[0])
        lc = arc.list_light_curve(oid, list_id=lid)
        assert len(lc) == len(rows[rows["list_object_id"] == oid]) and set(lc["image"]) <= {"calexp", "diff"}
        # a new epoch arriving: only its units run (simulated by forgetting one exposure's units)
        eid = int(rows["exposure_id"].iloc[0])
        from archive.pipeline.steps import unit_id

        with arc.store.transaction() as tx:
            tx.delete("pipeline_unit", "unit_id", [unit_id("forced_list", f"list:{lid}:exposure:{eid}")])
        again = arc.run(config=CONFIG, progress=False)
        assert again["forced_list"].done == [f"list:{lid}:exposure:{eid}"]
        assert arc.count("list_forced_source") == len(rows) + len(fixed)  # replaced, not added
    assert main(["lightcurve", "--repo", str(copy), str(oid), "--list", str(lid), "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("mjd,band,image,flux") and len(out) == len(lc) + 1


def test_recentring_moves_at_most_a_fifth_of_a_pixel(run):
    from archive.image.exposure import Exposure
    from archive.pipeline.forced_lists import ForcedListConfig, measure_list
    from archive.pipeline.products import ProductStore

    root, repo, _ = run
    truth = _truth(root)
    with Archive.open(repo) as arc:
        row = arc.sql("SELECT path FROM image_product WHERE kind = 'calexp' ORDER BY exposure_id LIMIT 1")
        products = ProductStore(arc.products_root())
    stars = truth[(truth["kind"] == "star") & (truth["flux_r"] > 5000)].head(100)
    # positions off by 0.1 px and by 2 px in x (0.2"/px), each set its own list: in one list a
    # star's two probes, 1.9 px apart, would be fitted jointly, the near one taking the star's
    # light and leaving the far one faint (below recenter_min_snr: neither moved nor flagged)
    lists = products.root / "lists"
    lists.mkdir(exist_ok=True)
    calexp = Exposure.read(products.path(row["path"].iloc[0]))
    res = {}
    for name, dra in (("near", 0.02), ("far", 0.4)):
        off = pd.DataFrame({"list_object_id": np.arange(len(stars)), "ra": stars["ra"] + dra / 3600,
                            "dec": stars["dec"]})
        off.to_parquet(lists / f"probe_{name}.parquet")
        r = measure_list({"list": f"lists/probe_{name}.parquet", "calexp": row["path"].iloc[0], "diff": None,
                          "recenter": True}, products, ForcedListConfig())
        x0, y0 = calexp.wcs.all_world2pix(off["ra"].to_numpy()[r["list_object_id"]],
                                          off["dec"].to_numpy()[r["list_object_id"]], 0)
        assert np.hypot(r["x"] - x0, r["y"] - y0).max() <= 0.2 + 1e-6
        res[name] = r
    assert res["near"]["moved"].mean() > 0.3  # 0.1 px off (plus the WCS's own error): moved back
    centroid = (res["far"]["flags"].to_numpy(np.int64) & (np.int64(1) << 33)) != 0
    assert centroid.mean() > 0.8  # 2 px off: kept, CENTROID set


def test_resume_does_not_redo_done_units(run):
    from archive.pipeline.steps import unit_id

    _, repo, _ = run
    steps = ("template_catalog", "template_forced", "dia_template")
    with Archive.open(repo) as arc:
        units = arc.sql("SELECT step, unit_key FROM pipeline_unit WHERE step IN "
                        "('template_catalog', 'template_forced', 'dia_template') ORDER BY step, unit_key")
        gone = units.groupby("step").head(1)  # one unit of each, as if killed before it was recorded
        with arc.store.transaction() as tx:
            tx.delete("pipeline_unit", "unit_id", [unit_id(s, k) for s, k in zip(gone["step"], gone["unit_key"])])
        tables = ("template_source", "template_forced_source", "dia_template_source")
        before = {t: arc.count(t) for t in tables}
        rep = arc.run(config=CONFIG, progress=False)
        for step in steps:  # only the forgotten unit runs again
            assert rep[step].done == gone[gone["step"] == step]["unit_key"].tolist(), (step, rep[step].done)
        assert {t: arc.count(t) for t in tables} == before  # replaced, not duplicated
        orphans = arc.sql("SELECT count(*) AS n FROM template_forced_source f LEFT JOIN template_source s "
                          "USING (template_source_id) WHERE s.template_source_id IS NULL")["n"].iloc[0]
        assert orphans == 0
