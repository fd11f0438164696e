"""Read paths of the stores: the narrow association read, current versions, cone fetch paths,
heap order of COPY batches, and recovery from lost Postgres connections."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from archive.api import Archive
from archive.catalog.association import associate
from archive.catalog.dia_ingest import ASSOCIATION_COLUMNS, AssociationConfig, ingest_dia_sources
from archive.sky.regions import Cone, PixelSet

from test_dia_ingest import _field, _summaries_match_recompute, _visit


@pytest.fixture
def pg_store(pg_store_url):
    """An empty Postgres store (the tests below are about its own read and write paths)."""
    from archive.catalog.schema import load_schema
    from archive.catalog.backends import open_store

    engine = sa.create_engine(pg_store_url)
    with engine.begin() as con:
        con.execute(sa.text("TRUNCATE " + ", ".join(f'"{t.name}"' for t in load_schema())))
    engine.dispose()
    s = open_store(pg_store_url)
    yield s
    s.close()


def _two_visits(store, n=200, seed=11):
    ra, dec = _field(n, seed=seed)
    ingest_dia_sources(store, _visit(ra, dec, 1, 1, 1000), ingest_mjd=61000)
    ingest_dia_sources(store, _visit(ra, dec, 2, 2, 5000), ingest_mjd=61001)
    return ra, dec


def test_narrow_region_read_equals_full_read(store):
    """The association columns of the current versions are the same rows and values
    whether read alone (the index-only path on Postgres) or with every column."""
    ra, dec = _two_visits(store)
    region = PixelSet.around(ra, dec, AssociationConfig().order())
    with store.transaction() as tx:
        narrow = tx.query_region("dia_object", region, columns=ASSOCIATION_COLUMNS, current_only=True)
        full = tx.query_region("dia_object", region, current_only=True)
        tx.rollback()
    assert list(narrow.columns) == ASSOCIATION_COLUMNS
    assert len(narrow) == len(full) == 200 and full["validity_end"].isna().all()
    a = narrow.sort_values("dia_object_id").reset_index(drop=True)
    b = full[ASSOCIATION_COLUMNS].sort_values("dia_object_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_current_versions_only_open_ones(store):
    ra, dec = _two_visits(store, n=50)
    cur = store.cone("dia_object", 150.0, 2.0, 3600)
    cur = cur[cur["validity_end"].isna()]
    ids = cur["dia_object_id"].to_numpy()[:20]
    hp = cur["healpix29"].to_numpy()[:20]
    assert store.count("dia_object") == 100  # two versions per object
    with store.transaction() as tx:
        plain = tx.current_versions("dia_object", ids)
        hinted = tx.current_versions("dia_object", ids, healpix29=hp)
        none = tx.current_versions("dia_object", np.empty(0, np.int64))
        tx.rollback()
    for got in (plain, hinted):
        assert sorted(got["dia_object_id"]) == sorted(ids.tolist())
        assert got["validity_end"].isna().all() and (got["validity_start"] == 61001).all()
        assert list(got.columns) == store.table("dia_object").column_names
    assert none.empty


def test_multi_visit_batch_associates_as_with_all_columns(store):
    """Association on the narrow columns (incl. pos_sum_w, used between visits of one
    batch) assigns the stored objects exactly as association on full rows would."""
    ra, dec = _field(150, seed=4)
    ingest_dia_sources(store, _visit(ra, dec, 1, 1, 1000), ingest_mjd=61000)
    batch = pd.concat([_visit(ra, dec, 2, 2, 2000), _visit(ra, dec, 3, 3, 3000)], ignore_index=True)
    region = PixelSet.around(batch["ra"].to_numpy(), batch["dec"].to_numpy(), AssociationConfig().order())
    with store.transaction() as tx:
        full = tx.query_region("dia_object", region, current_only=True)
        tx.rollback()
    from archive.catalog.store import frame_from_arrow
    from archive.catalog.validate import conform

    src = frame_from_arrow(conform(store.table("dia_source"), batch))
    ref = associate(src, full, radius_arcsec=1.0, id_factory=lambda k: -np.arange(1, k + 1, dtype=np.int64))
    rep = ingest_dia_sources(store, batch, ingest_mjd=61001)
    stored = ref.object_index >= 0
    assert stored.sum() == 300  # both visits re-detect every object
    np.testing.assert_array_equal(rep.dia_object_ids[stored], ref.dia_object_id[stored])
    assert rep.n_new_objects == int(ref.is_new.sum()) == 0
    _summaries_match_recompute(store)


def test_replace_of_founding_exposure_founds_new_objects(store):
    """Objects emptied by --replace leave the association pool: the replaced sources
    found new objects, the emptied ones keep no current version."""
    arc = Archive(store, "test")
    ra, dec = _field(40, seed=6)
    first = arc.ingest_dia_sources(_visit(ra, dec, 1, 1, 1000), ingest_mjd=61000)
    again = arc.ingest_dia_sources(_visit(ra, dec, 1, 9, 1000), replace=True, ingest_mjd=61001)
    assert again.n_replaced_sources == 40 and again.n_new_objects == 40
    assert not set(first.dia_object_ids) & set(again.dia_object_ids)
    cur = arc.cone("dia_object", 150.0, 2.0, 3600)
    assert sorted(cur["dia_object_id"]) == sorted(again.dia_object_ids.tolist())
    _summaries_match_recompute(store)


def test_cone_fetch_paths_agree(pg_store, make_dia_sources):
    store = pg_store
    """Small cones (binary rows) and large ones (COPY + CSV) give identical frames:
    dtypes, nulls, NaN, strings, booleans, exact floats, order."""
    from archive.catalog import postgres_store

    rng = np.random.default_rng(8)
    n = 400
    df = make_dia_sources(n, ra=150 + rng.normal(0, 0.01, n), dec=2 + rng.normal(0, 0.01, n))
    df["dia_object_id"] = pd.array(np.where(rng.random(n) < 0.3, None, np.arange(n)), dtype="Int64")
    df["psf_flux"] = np.where(rng.random(n) < 0.2, np.nan, df["psf_flux"])
    df["is_dipole"] = pd.array(np.where(rng.random(n) < 0.2, None, rng.random(n) < 0.5), dtype="boolean")
    df["external_id"] = np.where(rng.random(n) < 0.5, None, 'a,"b" é')
    store.write("dia_source", df)
    r = 90.0
    small = store.cone("dia_source", 150.0, 2.0, r)
    assert r <= postgres_store.SMALL_CONE_ARCSEC and len(small) > 50
    t, region, cols = store._cone_request("dia_source", 150.0, 2.0, r, None)
    large = postgres_store.frame_from_arrow(
        postgres_store.nearest_first(store._region_arrow(t, region, cols), region))
    pd.testing.assert_frame_equal(small, large)
    assert small["dia_object_id"].dtype == "Int64" and small["is_dipole"].dtype == "boolean"
    sub = store.cone("dia_source", 150.0, 2.0, r, columns=["dia_source_id", "external_id"])
    assert list(sub.columns) == ["dia_source_id", "external_id", "distance_arcsec"]
    assert sub["dia_source_id"].tolist() == small["dia_source_id"].tolist()
    empty = store.cone("dia_source", 10.0, 2.0, 2.0)
    assert empty.empty and list(empty.columns) == list(small.columns)
    # the dtypes an empty result always had (no nulls to make integers nullable)
    want = postgres_store.frame_from_arrow(store.table("dia_source").arrow_schema.empty_table())
    assert empty.drop(columns="distance_arcsec").dtypes.equals(want.dtypes)
    assert empty["distance_arcsec"].dtype == np.float64
    empty["ra"] = []  # a caller's change must not leak into the next empty result
    assert list(store.cone("dia_source", 10.0, 2.0, 2.0).columns) == list(small.columns)


def test_copy_batches_are_stored_in_sky_order(pg_store, make_dia_sources):
    store = pg_store
    """A batch's rows land in the heap sorted by healpix29, so a cone reads few pages."""
    store.write("dia_source", make_dia_sources(2000, seed=3))
    engine = sa.create_engine(store.url)
    with engine.connect() as con:
        hp = np.array([r[0] for r in con.execute(sa.text("SELECT healpix29 FROM dia_source ORDER BY ctid"))])
    engine.dispose()
    assert hp.size == 2000 and (np.diff(hp) >= 0).all()


def test_association_read_is_index_only(pg_store):
    store = pg_store
    ra, dec = _two_visits(store)
    engine = sa.create_engine(store.url, isolation_level="AUTOCOMMIT")
    with engine.connect() as con:
        con.execute(sa.text("VACUUM (ANALYZE) dia_object"))
        region = PixelSet.around(ra, dec, AssociationConfig().order())
        t = store.table("dia_object")
        narrow, _ = store._region_sql(t, region, ASSOCIATION_COLUMNS, current_only=True)
        wide, _ = store._region_sql(t, region, t.column_names, current_only=True)
        con.execute(sa.text("SET enable_seqscan = off"))  # a tiny table: make the planner use indexes
        plan_n = "\n".join(r[0] for r in con.execute(sa.text("EXPLAIN " + narrow)))
        plan_w = "\n".join(r[0] for r in con.execute(sa.text("EXPLAIN " + wide)))
    engine.dispose()
    assert "Index Only Scan using ix_dia_object_current" in plan_n
    assert "Index Only Scan" not in plan_w  # columns outside the index: the ordinary region SQL


def test_reads_and_writes_survive_a_server_restart(pg_store, make_dia_sources):
    store = pg_store
    """No pre-ping: pooled connections killed by the server (as by a restart) are
    discarded and the operation retried on a fresh connection."""
    store.sql("SELECT 1 AS one")  # user SQL closes its own connection: not pooled
    store.write("dia_source", make_dia_sources(100))
    assert len(store.cone("dia_source", 150.0, 0.0, 10800)) > 0 and store.count("dia_source") == 100

    def kill_all():
        engine = sa.create_engine(store.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as con:
            killed = con.execute(sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
        engine.dispose()
        return killed

    assert kill_all() >= 2  # the read pool's and the transaction pool's idle connections
    assert store.count("dia_source") == 100
    kill_all()
    got = store.cone("dia_source", 150.0, 0.0, 10800)
    assert len(got) > 0
    kill_all()
    assert len(store.get("dia_source", [1, 2])) == 2
    kill_all()
    assert store.sql("SELECT count(*) AS n FROM dia_source")["n"].iloc[0] == 100
    kill_all()
    store.write("dia_source", make_dia_sources(10, start_id=1000))
    assert store.count("dia_source") == 110
    kill_all()
    with store.transaction() as tx:
        assert len(tx.query_region("dia_source", Cone(150.0, 0.0, 3.0))) == 110
        tx.rollback()


def test_binary_copy_in_chunks_round_trips(pg_store, make_dia_sources, monkeypatch):
    """Binary COPY written in several chunks (sliced Arrow arrays, offsets != 0) stores
    exactly the rows given: nulls, NaN, -0.0, empty and non-ASCII strings, all-null columns."""
    from archive.catalog import postgres_store

    monkeypatch.setattr(postgres_store, "COPY_CHUNK_BYTES", 1)  # 1,024-row chunks
    n = 3000
    rng = np.random.default_rng(2)
    df = make_dia_sources(n, seed=5)
    df["dia_object_id"] = pd.array(np.where(rng.random(n) < 0.5, None, rng.integers(0, 2**62, n)), dtype="Int64")
    df["ap_flux"] = np.where(rng.random(n) < 0.3, np.nan, -0.0)
    df["external_id"] = np.where(rng.random(n) < 0.3, None, np.where(rng.random(n) < 0.5, "", "Ω-ß,\"q\"\n"))
    pg_store.write("dia_source", df)
    got = pg_store.get("dia_source", df["dia_source_id"]).sort_values("dia_source_id").reset_index(drop=True)
    assert len(got) == n
    for col in ["dia_source_id", "dia_object_id", "ra", "dec", "psf_flux", "band", "external_id",
                "flags", "detector"]:
        pd.testing.assert_series_equal(got[col], df[col].astype(got[col].dtype), check_names=False, obj=col)
    assert np.signbit(got["ap_flux"][df["ap_flux"].notna()]).all()
    assert got["external_object_id"].isna().all() and got["is_dipole"].isna().all()
