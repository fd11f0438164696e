"""``Archive.reassociate`` / ``archive reassociate [REGION]``: rebuild a region's DIAObjects
from its DIASources in time order (issue 15, item 14)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from archive.api import Archive
from archive.cli.main import main
from archive.sky.regions import Cone

from arrival import batches, crowded_field, groupings
from test_association_order import _check_store, _ingest, _time_ordered


def test_rebuild_of_sources_stored_without_objects(store):
    """DIASources loaded as a plain table (no association, any order) become the objects of
    the time-ordered association."""
    src = crowded_field(seed=5, n_obj=100, n_visits=5)
    shuffled = src.sample(frac=1.0, random_state=1).drop(columns=["truth"])
    store.write("dia_source", shuffled)
    arc = Archive(store, "test")
    rep = arc.reassociate(ingest_mjd=61000)
    assert rep.n_reassociated == len(src) and rep.n_closed_objects == 0
    want = _time_ordered(src)
    _check_store(store, want)
    assert rep.n_new_objects == len(want) == arc.count("dia_object")


def test_rebuild_of_a_region_keeps_objects_ids_and_history(store):
    """After a time-ordered ingest a rebuild changes nothing but adds versions: the same
    groups, the same ids; objects outside the region untouched."""
    src = crowded_field(seed=6, n_obj=100, n_visits=5)
    want = _time_ordered(src)
    arc = _ingest(store, batches(src, "time", np.random.default_rng(0)))
    before = store.read_table("dia_source").set_index("dia_source_id")["dia_object_id"]
    n_versions = arc.count("dia_object")
    region = Cone(210.0, -30.0, 15.0 / 3600.0)  # the field's centre, 15" radius
    rep = arc.reassociate(region, ingest_mjd=62000)
    after = store.read_table("dia_source").set_index("dia_source_id")["dia_object_id"]
    _check_store(store, want)
    assert after.reindex(before.index).tolist() == before.tolist()  # ids kept
    assert 0 < rep.n_updated_objects < len(want) and rep.n_new_objects == 0
    assert arc.count("dia_object") == n_versions + rep.n_updated_objects
    rebuilt = arc.get("dia_object", np.unique(after[after.index.isin(
        store.query_region("dia_source", region)["dia_source_id"])]))
    assert (rebuilt["validity_start"] == 62000).all()


def test_cli_reassociate(tmp_path, capsys):
    repo = str(tmp_path / "arc")
    arc = Archive.init(repo)
    src = crowded_field(seed=7, n_obj=60, n_visits=4)
    arc.write("dia_source", src.drop(columns=["truth"]))
    arc.close()
    assert main(["reassociate", "box:209.99,210.01,-30.01,-29.99", "--repo", repo]) == 0
    err = capsys.readouterr().err
    assert "re-associated" in err and "DIAObject" in err
    arc = Archive.open(repo)
    got = groupings(arc.store.read_table("dia_source").dropna(subset=["dia_object_id"]))
    assert got == _time_ordered(src)  # the box holds the whole field
    arc.close()
    assert main(["reassociate", "cone:210,-30,5", "--repo", repo]) == 0
    assert "re-associated" in capsys.readouterr().err
    for bad, why in (("circle:1,2,3", "expected cone"), ("cone:1,2", "expected cone"),
                     ("cone:a,b,c", "must be numbers"), ("cone:1,2,-3", "must be positive"),
                     ("box:1,2,50,40", "dec_min")):
        assert main(["reassociate", bad, "--repo", repo]) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1, err
