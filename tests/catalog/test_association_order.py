"""Association in the store does not depend on how visits arrive (issue 15, items 12-14).

* item 14: visits in reverse or random order, two interleaved streams, visits split
  into detector pieces and regrouped at random -- every ingest ends in exactly the
  objects (groups of dia_source ids) of the time-ordered association, on both
  backends, with summaries equal to a recompute and one current version per object.
  Before, of the 174 objects of the time-ordered ingest of the field below, reverse order
  changed 18, two interleaved streams 19, the shuffle 8, the two random piece batchings
  13 and 16 (in a larger field, seed 0 with the defaults of :func:`arrival.crowded_field`:
  102, 59, 80 and 54 of 348).
* item 13: one visit arriving as two batches (detectors separately) gives an object
  one detection of that visit, not two.
* item 12: a second detection of one object on the same image joins that object as a
  duplicate of the visit instead of founding a twin that splits the light curve.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from archive.api import Archive
from archive.catalog.association import DUPLICATE_FLAG, associate
from archive.catalog.dia_ingest import AssociationConfig

from arrival import ARCSEC, batches, crowded_field, groupings
from test_dia_ingest import _summaries_match_recompute

EMPTY = pd.DataFrame({"dia_object_id": np.empty(0, np.int64), "ra": [], "dec": []})


def _time_ordered(src: pd.DataFrame) -> set[frozenset[int]]:
    """Objects of the time-ordered association of every row (pure: no store)."""
    res = AssociationConfig().associate(src, EMPTY)
    return groupings(src.assign(dia_object_id=res.dia_object_id))


def _ingest(store, parts: list[pd.DataFrame]) -> Archive:
    arc = Archive(store, "test")
    for k, b in enumerate(parts):
        arc.ingest_dia_sources(b.drop(columns=["truth"]), ingest_mjd=61000 + k)
    return arc


def _check_store(store, want: set[frozenset[int]]) -> pd.DataFrame:
    rows = store.read_table("dia_source")
    got = groupings(rows)
    assert len(got - want) == 0 and len(want - got) == 0, (len(got - want), len(want))
    _summaries_match_recompute(store)
    # no object has two primary (non-duplicate) detections of one visit
    prim = rows[(rows["flags"].to_numpy() & DUPLICATE_FLAG) == 0]
    assert not prim.duplicated(["dia_object_id", "visit"]).any()
    return rows


def test_time_ordered_store_ingest_equals_pure_association(store):
    src = crowded_field(seed=3, n_obj=120, n_visits=6)
    want = _time_ordered(src)
    _ingest(store, batches(src, "time", np.random.default_rng(0)))
    rows = _check_store(store, want)
    assert (rows["flags"].to_numpy() & DUPLICATE_FLAG != 0).sum() > 5  # twins were attached


@pytest.mark.parametrize("how,seed", [("reverse", 0), ("interleave", 0), ("shuffle", 1),
                                      ("pieces", 2), ("pieces", 3)])
def test_arrival_order_gives_the_time_ordered_objects(store, how, seed):
    src = crowded_field(seed=3, n_obj=120, n_visits=6)
    want = _time_ordered(src)
    arc = _ingest(store, batches(src, how, np.random.default_rng(seed)))
    _check_store(store, want)
    # history kept: objects re-associated by a late batch have several versions
    assert arc.count("dia_object") > len(want)


def test_one_visit_in_two_batches_gives_one_detection_per_object(store):
    """Object A founded on visit 4; visit 5 sees it on detector 0 (0.1" off) and on
    detector 1 (0.4" off, overlapping detectors), ingested as two batches in either
    order: A keeps the nearer detection of visit 5, the other is its duplicate.
    Before, the second batch gave A both (3 detections for 2 visits)."""
    dec0 = -30.0

    def row(i, visit, det, north):
        return {"dia_source_id": i, "exposure_id": visit * 10 + det, "visit": visit, "detector": det,
                "band": "r", "mjd": 60000.0 + visit, "ra": 150.0, "dec": dec0 + north * ARCSEC,
                "ra_err": 0.1 * ARCSEC, "dec_err": 0.1 * ARCSEC, "psf_flux": 1000.0,
                "psf_flux_err": 10.0, "flags": 0, "truth": 0}

    v4 = pd.DataFrame([row(1, 4, 0, 0.0)])
    d0 = pd.DataFrame([row(2, 5, 0, 0.1)])
    d1 = pd.DataFrame([row(3, 5, 1, 0.4)])
    arc = _ingest(store, [v4, d1, d0])  # the farther one first
    obj = arc.cone("dia_object", 150.0, dec0, 5.0)
    assert len(obj) == 1 and obj["n_dia_sources"].iloc[0] == 2
    src = store.read_table("dia_source").set_index("dia_source_id")
    assert src["dia_object_id"].nunique() == 1
    dup = (src["flags"].to_numpy() & DUPLICATE_FLAG) != 0
    assert dict(zip(src.index, dup)) == {1: False, 2: False, 3: True}


def test_same_image_twin_does_not_split_the_light_curve(store):
    """A new object seen twice on its first image (0.2" apart, as ZTF alerts have it) and
    once on each of 5 later visits: one object with 6 detections in its summaries (the
    twin attached as a duplicate).  Before: two objects, the later detections shared
    between them by distance."""
    rng = np.random.default_rng(4)
    dec0 = 20.0
    rows = []
    for v in range(6):
        n = 2 if v == 0 else 1
        north = np.array([0.0, 0.2])[:n] + rng.normal(0, 0.08, n)
        rows.append(pd.DataFrame({
            "dia_source_id": 10 * v + np.arange(n), "exposure_id": v, "visit": v, "detector": 0,
            "band": "g", "mjd": 60000.0 + v, "ra": 40.0, "dec": dec0 + north * ARCSEC,
            "psf_flux": 500.0, "psf_flux_err": 20.0, "flags": 0, "truth": 0,
            "snr": [20.0, 8.0][:n]}))
    arc = _ingest(store, rows)
    obj = arc.cone("dia_object", 40.0, dec0, 5.0)
    assert len(obj) == 1 and obj["n_dia_sources"].iloc[0] == 6
    assert obj["g_psf_flux_ndata"].iloc[0] == 6
    lc = arc.light_curve(int(obj["dia_object_id"].iloc[0]))
    assert len(lc) == 7  # the duplicate stays in the light curve
    src = store.read_table("dia_source").set_index("dia_source_id")
    assert (src.loc[1, "flags"] & DUPLICATE_FLAG) != 0 and (src.loc[0, "flags"] & DUPLICATE_FLAG) == 0


def test_matched_sources_keep_same_epoch_neighbours_apart():
    """Direct-image matching (two sources of one epoch are two stars) is unchanged."""
    from archive.catalog.matched import match_sources

    src = pd.DataFrame({"ra": [10.0, 10.0], "dec": [0.0, 0.3 * ARCSEC], "exposure_id": [1, 1]})
    res = match_sources(src, pd.DataFrame(columns=["matched_source_id", "ra", "dec"]))
    assert res.is_new.all() and np.unique(res.dia_object_id).size == 2
    res = associate(src, EMPTY)
    assert res.duplicate.tolist() == [False, True]


def test_replacing_an_old_visit_re_associates_what_follows(store):
    """``--replace`` of a visit older than others stored: the new rows of that visit and the
    later ones end in the objects of the time-ordered association of the final rows."""
    src = crowded_field(seed=8, n_obj=100, n_visits=5)
    _ingest(store, batches(src, "time", np.random.default_rng(0)))
    v = int(np.sort(src["visit"].unique())[1])
    redo = src[src["visit"] == v].copy()
    rng = np.random.default_rng(1)
    redo["dia_source_id"] += 100_000  # new ids, positions measured again
    redo["dec"] += rng.normal(0, 0.1, len(redo)) * ARCSEC
    arc = Archive(store, "test")
    rep = arc.ingest_dia_sources(redo.drop(columns=["truth"]), replace=True, ingest_mjd=62000)
    assert rep.n_replaced_sources == len(redo) and rep.n_reassociated > 0
    final = pd.concat([src[src["visit"] != v], redo], ignore_index=True)
    _check_store(store, _time_ordered(final))
