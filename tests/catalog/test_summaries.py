"""DIAObject summaries: incremental running sums equal the full recompute."""

import numpy as np
import pandas as pd
import pytest

from archive.catalog.schema import load_schema
from archive.catalog.summaries import (apply_forced, apply_sources, empty_objects, finalize,
                                       new_objects, recompute, recompute_extrema)
from archive.errors import ValidationError

ARCSEC = 1 / 3600


def _simulate(seed=0, n_obj=40, n_visits=25):
    rng = np.random.default_rng(seed)
    ora = rng.uniform(0, 360, n_obj)
    odec = rng.uniform(-89.9, 89.9, n_obj)
    ora[0], odec[0] = 359.99999, 0.0     # RA wrap
    ora[1], odec[1] = 10.0, 89.99995     # pole
    bands = np.array(["g", "r", "i"])
    rows, frows = [], []
    for v in range(n_visits):
        mjd = 60000.0 + rng.uniform(0, 300)
        band = bands[v % 3]
        seen = rng.random(n_obj) < 0.5
        for j in np.flatnonzero(seen):
            err = 0.05 + rng.random() * 0.2
            cosd = np.cos(np.radians(odec[j]))
            rows.append(dict(dia_object_id=1000 + j, visit=v, exposure_id=v * 1000, mjd=mjd,
                             band=band,
                             ra=(ora[j] + rng.normal(0, err) * ARCSEC / cosd) % 360,
                             dec=np.clip(odec[j] + rng.normal(0, err) * ARCSEC, -90, 90),
                             ra_err=np.nan if rng.random() < 0.1 else err * ARCSEC,  # on the sky
                             dec_err=err * ARCSEC,
                             psf_flux=rng.normal(1000 * (1 + j % 5), 300),
                             psf_flux_err=np.nan if rng.random() < 0.05 else 20 + 50 * rng.random()))
        for j in range(n_obj):
            frows.append(dict(dia_object_id=1000 + j, visit=v, exposure_id=v * 1000, mjd=mjd,
                              band=band, psf_flux=rng.normal(500, 100),
                              psf_flux_err=10 + 10 * rng.random()))
    return pd.DataFrame(rows), pd.DataFrame(frows)


def _assert_same(a: pd.DataFrame, b: pd.DataFrame, skip=("validity_start", "validity_end")):
    table = load_schema()["dia_object"]
    assert list(a.columns) == table.column_names == list(b.columns)
    a = a.sort_values("dia_object_id").reset_index(drop=True)
    b = b.sort_values("dia_object_id").reset_index(drop=True)
    for c in table.columns:
        if c.name in skip:
            continue
        x, y = a[c.name].to_numpy(), b[c.name].to_numpy()
        if c.name == "ra":
            d = (x - y + 180) % 360 - 180
            assert np.allclose(d[np.isfinite(d)], 0, atol=1e-9), c.name
            assert (np.isnan(x) == np.isnan(y)).all()
        elif c.numpy_kind == "f":
            tol = 1e-5 if c.type == "float32" else 1e-8
            np.testing.assert_allclose(x, y, rtol=tol, atol=1e-9 if "sum" not in c.name else 0,
                                       equal_nan=True, err_msg=c.name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=c.name)


def test_incremental_random_order_equals_recompute():
    src, forced = _simulate(seed=1)
    rng = np.random.default_rng(5)
    visits = rng.permutation(src.visit.unique())
    objs = empty_objects(0)
    for v in visits:  # batches in random time order
        b = src[src.visit == v]
        upd = apply_sources(objs, b, validity_start=float(b.mjd.iloc[0]))
        assert upd.stale.size == 0 and upd.emptied.size == 0
        assert set(upd.touched) == set(b.dia_object_id)
        stamped = upd.objects.set_index("dia_object_id").loc[upd.touched, "validity_start"]
        assert (stamped == float(b.mjd.iloc[0])).all()
        objs = finalize(upd.objects)
    for v in rng.permutation(visits):  # forced photometry, once all objects exist
        objs = finalize(apply_forced(objs, forced[forced.visit == v]).objects)
    full = recompute(src, forced)
    _assert_same(objs, full)
    # finite, sensible values
    objs = objs.sort_values("dia_object_id")
    counts = src.groupby("dia_object_id").size().sort_index().to_numpy()
    assert (objs.n_dia_sources.to_numpy() == counts).all()
    assert objs.g_forced_flux_ndata.gt(0).all()


def test_schema_columns_and_dtypes():
    src, _ = _simulate(seed=2, n_obj=5, n_visits=4)
    out = new_objects(src, validity_start=60500.0)
    table = load_schema()["dia_object"]
    assert list(out.columns) == table.column_names
    dt = {"int16": "int16", "int32": "int32", "int64": "int64", "float32": "float32",
          "float64": "float64"}
    for c in table.columns:
        assert str(out[c.name].dtype) == dt[c.type], c.name
    assert (out.validity_start == 60500.0).all() and out.validity_end.isna().all()


def test_known_values():
    src = pd.DataFrame(dict(dia_object_id=[7, 7], mjd=[60000.0, 60002.0], band=["r", "r"],
                            ra=[10.0, 10.0 + 2 * ARCSEC / np.cos(np.radians(-20.0))],
                            dec=[-20.0, -20.0], ra_err=[np.nan, np.nan],
                            dec_err=[np.nan, np.nan],
                            psf_flux=[100.0, 200.0], psf_flux_err=[10.0, 20.0]))
    o = new_objects(src, 60003.0).iloc[0]
    assert o.r_psf_flux_mean == pytest.approx(120.0)
    assert o.r_psf_flux_mean_err == pytest.approx(1 / np.sqrt(0.0125))
    assert o.r_psf_flux_chi2 == pytest.approx(20.0)
    assert o.r_psf_flux_sigma == pytest.approx(np.std([100, 200], ddof=1))
    assert (o.r_psf_flux_min, o.r_psf_flux_max, o.r_psf_flux_ndata) == (100.0, 200.0, 2)
    assert o.g_psf_flux_ndata == 0 and np.isnan(o.g_psf_flux_mean)
    # equal (default) weights: the midpoint, 1" east
    assert o.dec == pytest.approx(-20.0, abs=1e-9)
    assert (o.ra - 10.0) * np.cos(np.radians(-20.0)) * 3600 == pytest.approx(1.0, abs=1e-6)
    assert o.dec_err * 3600 == pytest.approx(0.1 / np.sqrt(2), rel=1e-5)
    assert o.radec_mjd == pytest.approx(60001.0)
    assert (o.first_mjd, o.last_mjd, o.n_dia_sources) == (60000.0, 60002.0, 2)
    from archive.sky.healpix import radec_to_healpix29
    assert o.healpix29 == radec_to_healpix29(o.ra, o.dec)


def test_add_then_remove_restores_state_and_replace_equals_recompute():
    src, forced = _simulate(seed=3)
    visits = np.sort(src.visit.unique())
    keep, extra = visits[:-3], visits[-3:]
    base_src = src[src.visit.isin(keep)]
    base_forced = forced[forced.visit.isin(keep)]
    base = finalize(apply_forced(apply_sources(empty_objects(0), base_src).objects,
                                 base_forced).objects)
    objs = base
    for v in extra:
        objs = apply_forced(apply_sources(objs, src[src.visit == v]).objects,
                            forced[forced.visit == v]).objects
    stale_all: set[int] = set()
    emptied: set[int] = set()
    for v in extra[::-1]:
        upd = apply_sources(objs, src[src.visit == v], sign=-1)
        stale_all.update(upd.stale.tolist())
        emptied.update(upd.emptied.tolist())
        upd2 = apply_forced(upd.objects, forced[forced.visit == v], sign=-1)
        stale_all.update(upd2.stale.tolist())
        objs = upd2.objects
    assert stale_all  # removing later visits moves some extremes
    objs = recompute_extrema(objs, base_src, base_forced, ids=np.array(sorted(stale_all)))
    # objects seen only in the removed visits are now empty: drop them as the store would
    objs = objs[~objs.dia_object_id.isin(list(emptied))]
    assert set(objs.dia_object_id) == set(base.dia_object_id)
    _assert_same(finalize(objs), base)
    # --replace: remove a visit, add a modified version of it -> equals recompute
    v = keep[0]
    old = src[src.visit == v]
    new = old.assign(psf_flux=old.psf_flux * 1.1, mjd=old.mjd + 0.001)
    upd = apply_sources(base, old, sign=-1)
    objs = recompute_extrema(upd.objects, base_src[base_src.visit != v], base_forced,
                             ids=upd.stale)
    objs = objs[~objs.dia_object_id.isin(upd.emptied)]
    objs = finalize(apply_sources(objs, new).objects)
    replaced = pd.concat([base_src[base_src.visit != v], new])
    _assert_same(objs, recompute(replaced, base_forced))


def test_bad_input_is_refused():
    src, forced = _simulate(seed=4, n_obj=3, n_visits=3)
    objs = apply_sources(empty_objects(0), src[src.visit == 0]).objects
    with pytest.raises(ValidationError, match="never added|not in the given objects"):
        apply_sources(objs, src[src.visit == 1], sign=-1)
    with pytest.raises(ValidationError, match="band"):
        apply_sources(objs, src.assign(band="q"))
    with pytest.raises(ValidationError, match="dia_object_id"):
        apply_sources(objs, src.assign(dia_object_id=pd.NA))
    with pytest.raises(ValidationError, match="not in the given objects"):
        apply_forced(objs, forced.assign(dia_object_id=99))
    with pytest.raises(ValidationError, match="schema columns"):
        apply_sources(objs.drop(columns=["pos_sum_w"]), src)
