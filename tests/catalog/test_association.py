"""Association: candidate search vs brute force, optimal matching, rounds, edge cases."""

import itertools
import logging

import numpy as np
import pandas as pd
import pytest

from archive.catalog.association import (DUPLICATE_FLAG, associate, candidate_pairs,
                                         optimal_matching, tangent_offsets)
from archive.errors import ValidationError
from archive.sky.healpix import radec_to_vec

ARCSEC = 1.0 / 3600.0


def _counter_ids():
    state = {"next": 10_000}

    def make(n):
        out = np.arange(state["next"], state["next"] + n, dtype=np.int64)
        state["next"] += n
        return out
    return make


def _brute_pairs(sra, sdec, ora, odec, r_arcsec):
    us, uo = radec_to_vec(sra, sdec), radec_to_vec(ora, odec)
    dot = np.clip(us @ uo.T, -1, 1)
    sep = np.degrees(np.arccos(dot)) * 3600
    # arccos is imprecise for tiny angles; use the chord for the decision
    chord = np.linalg.norm(us[:, None, :] - uo[None, :, :], axis=2)
    sep = np.degrees(2 * np.arcsin(chord / 2)) * 3600
    s, o = np.nonzero(sep <= r_arcsec)
    return set(zip(s.tolist(), o.tolist())), sep


def _field(rng, n, ra0, dec0, half_deg):
    """Uniform points on the sphere within a cap of radius half_deg around (ra0, dec0)."""
    # sample on the cap, then rotate: simple rejection in a local frame
    cosr = np.cos(np.radians(half_deg))
    z = rng.uniform(cosr, 1.0, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    s = np.sqrt(1 - z * z)
    v = np.stack([s * np.cos(phi), s * np.sin(phi), z], axis=1)  # around +z
    # rotate +z to (ra0, dec0)
    a, d = np.radians(ra0), np.radians(dec0)
    north = np.array([np.cos(a) * np.cos(d), np.sin(a) * np.cos(d), np.sin(d)])
    east = np.array([-np.sin(a), np.cos(a), 0.0])
    up = np.cross(north, east)
    w = v[:, 0:1] * east + v[:, 1:2] * up + v[:, 2:3] * north
    ra = np.degrees(np.arctan2(w[:, 1], w[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(w[:, 2], -1, 1)))
    return ra, dec


@pytest.mark.parametrize("ra0,dec0", [(150.0, 2.0), (0.0, -30.0), (359.999, 60.0),
                                      (0.0, 90.0), (123.0, -89.99), (45.0, 41.8103),
                                      (90.0, 0.0), (0.0, 41.8103), (270.0, -41.8103),
                                      (10.0, 89.9)])
# 1.0737" is exactly a third of an order-16 pixel: the smallest cell/radius ratio used
@pytest.mark.parametrize("radius", [1.0, 1.0737, 4.0])
def test_candidate_pairs_equal_brute_force(ra0, dec0, radius):
    rng = np.random.default_rng(int(ra0 * 10 + dec0 * 100 + radius) % 2**32)
    half = 60 * radius * ARCSEC  # dense enough for many pairs
    ora, odec = _field(rng, 1500, ra0, dec0, half)
    sra, sdec = _field(rng, 600, ra0, dec0, half)
    # some sources exactly on top of / right next to objects
    sra[:100], sdec[:100] = ora[:100], odec[:100]
    s, o, sep = candidate_pairs(sra, sdec, ora, odec, radius)
    truth, sepm = _brute_pairs(sra, sdec, ora, odec, radius)
    assert len(truth) > 150
    got = set(zip(s.tolist(), o.tolist()))
    assert got == truth
    np.testing.assert_allclose(sep, sepm[s, o], atol=1e-6)
    # given sorted healpix29 of the objects gives the same answer
    from archive.sky.healpix import radec_to_healpix29
    hp = radec_to_healpix29(ora, odec)
    srt = np.argsort(hp)
    s2, o2, _ = candidate_pairs(sra, sdec, ora[srt], odec[srt], radius, obj_healpix29=hp[srt])
    assert set(zip(s2.tolist(), srt[o2].tolist())) == truth


def test_radius_edge():
    ora, odec = np.array([10.0]), np.array([20.0])
    # sources due north at 0.999" and 1.001"
    sdec = odec[0] + np.array([0.999, 1.001, 1.0 - 1e-6]) * ARCSEC
    s, o, sep = candidate_pairs(np.full(3, 10.0), sdec, ora, odec, 1.0)
    assert s.tolist() == [0, 2]
    np.testing.assert_allclose(sep, [0.999, 1.0 - 1e-6], atol=1e-7)


def _brute_matching(ns, no, edges):
    """Max-cardinality then min-cost matching by enumeration; returns (card, cost)."""
    cost = {(s, o): c for s, o, c in edges}
    best = (-1, np.inf)
    for choice in itertools.product(range(-1, no), repeat=ns):
        used = [o for o in choice if o >= 0]
        if len(used) != len(set(used)):
            continue
        if any(o >= 0 and (s, o) not in cost for s, o in enumerate(choice)):
            continue
        card = len(used)
        tot = sum(cost[(s, o)] for s, o in enumerate(choice) if o >= 0)
        if card > best[0] or (card == best[0] and tot < best[1] - 1e-12):
            best = (card, tot)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_optimal_matching_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    ns, no = rng.integers(1, 6), rng.integers(1, 6)
    mask = rng.random((ns, no)) < 0.5
    s, o = np.nonzero(mask)
    c = rng.normal(0, 2, s.size)
    # shift labels to make sure arbitrary labels work
    pick = optimal_matching(s * 7 + 3, o * 11 - 5, c)
    assert np.unique(s[pick]).size == pick.sum() and np.unique(o[pick]).size == pick.sum()
    card, tot = _brute_matching(ns, no, list(zip(s.tolist(), o.tolist(), c.tolist())))
    assert pick.sum() == card
    assert np.isclose(c[pick].sum(), tot if card else 0.0)


def test_greedy_wrong_optimal_right():
    # objects A at 0", B at +1.5" east; source 1 at +0.6" (0.6 from A, 0.9 from B),
    # source 2 at -0.5" (0.5 from A, 2.0 from B). Greedy (closest first or first come)
    # gives s1->A and leaves s2 unmatched; optimal: s1->B, s2->A.
    dec0 = 0.0
    objects = pd.DataFrame({"dia_object_id": [1, 2], "ra": [10.0, 10.0 + 1.5 * ARCSEC],
                            "dec": [dec0, dec0]})
    sources = pd.DataFrame({"ra": [10.0 + 0.6 * ARCSEC, 10.0 - 0.5 * ARCSEC],
                            "dec": [dec0, dec0], "visit": [7, 7]})
    res = associate(sources, objects, radius_arcsec=1.0, id_factory=_counter_ids())
    assert res.dia_object_id.tolist() == [2, 1]
    assert not res.is_new.any()
    np.testing.assert_allclose(res.distance_arcsec, [0.9, 0.5], atol=1e-6)
    assert res.scoring == "distance"


def test_same_visit_competes_other_visit_does_not():
    objects = pd.DataFrame({"dia_object_id": [5], "ra": [200.0], "dec": [-10.0]})
    sources = pd.DataFrame({"ra": [200.0, 200.0, 200.0], "dec": [-10.0 + 0.2 * ARCSEC,
                                                                 -10.0 - 0.5 * ARCSEC,
                                                                 -10.0 + 0.1 * ARCSEC],
                            "visit": [1, 1, 2], "mjd": [60000.1, 60000.1, 60001.0]})
    # matched sources (same_visit="found"): visit 1: the closest takes the object, the other
    # founds a new object; visit 2 also matches 5
    res = associate(sources, objects, same_visit="found", id_factory=_counter_ids())
    assert res.dia_object_id[0] == 5 and res.dia_object_id[2] == 5
    assert res.is_new.tolist() == [False, True, False]
    assert res.dia_object_id[1] == 10_000
    assert res.object_index.tolist() == [0, -1, 0]
    assert not res.duplicate.any()
    # DIASources (default "attach"): the second source of visit 1 is a duplicate of 5
    res = associate(sources, objects, id_factory=_counter_ids())
    assert res.dia_object_id.tolist() == [5, 5, 5]
    assert res.is_new.tolist() == [False, False, False]
    assert res.duplicate.tolist() == [False, True, False]
    assert res.object_index.tolist() == [0, 0, 0]


def test_new_objects_are_matched_by_later_visits_in_time_order():
    # a transient seen on 3 visits given out of time order, no prior objects
    rng = np.random.default_rng(3)
    ra = 0.0 + rng.normal(0, 0.1, 3) * ARCSEC  # straddles RA 0/360
    ra = ra % 360.0
    dec = 5.0 + rng.normal(0, 0.1, 3) * ARCSEC
    sources = pd.DataFrame({"ra": ra, "dec": dec, "visit": [30, 10, 20],
                            "mjd": [3.0, 1.0, 2.0]})
    res = associate(sources, pd.DataFrame(columns=["dia_object_id", "ra", "dec"]),
                    id_factory=_counter_ids())
    assert res.is_new.tolist() == [False, True, False]  # the earliest visit founds it
    assert np.unique(res.dia_object_id).size == 1


def test_likelihood_prefers_consistent_errors():
    # object A precise (0.05"), object B uncertain (1"); source 0.4" from A, 0.6" from B
    objects = pd.DataFrame({"dia_object_id": [1, 2], "ra": [0.0, 0.0],
                            "dec": [0.0, 1.0 * ARCSEC],
                            "ra_err": [0.05 * ARCSEC, 1.0 * ARCSEC],
                            "dec_err": [0.05 * ARCSEC, 1.0 * ARCSEC]})
    sources = pd.DataFrame({"ra": [0.0], "dec": [0.4 * ARCSEC], "ra_err": [0.05 * ARCSEC],
                            "dec_err": [0.05 * ARCSEC], "visit": [1]})
    by_lik = associate(sources, objects, id_factory=_counter_ids())
    by_dist = associate(sources, objects, use_errors=False, id_factory=_counter_ids())
    assert by_lik.scoring == "likelihood" and by_dist.scoring == "distance"
    assert by_dist.dia_object_id.tolist() == [1]
    assert by_lik.dia_object_id.tolist() == [2]  # 0.4" is 5.7 sigma from A, 0.6 sigma from B


def test_tangent_offsets_at_pole_and_wrap():
    dx, dy = tangent_offsets(np.array([0.0 + 1e-4]), np.array([0.0]), np.array([359.9999]),
                             np.array([0.0]))
    np.testing.assert_allclose([dx[0], dy[0]], [0.72, 0.0], atol=1e-6)
    # near the pole: 1" north of an object at dec 89.9999 towards RA 0
    dx, dy = tangent_offsets(np.array([0.0]), np.array([90.0 - 0.5 * ARCSEC]),
                             np.array([0.0]), np.array([90.0 - 1.5 * ARCSEC]))
    np.testing.assert_allclose([dx[0], dy[0]], [0.0, 1.0], atol=1e-6)


def _random_batch(rng, n_obj, ra0, dec0, half_deg):
    ora, odec = _field(rng, n_obj, ra0, dec0, half_deg)
    objects = pd.DataFrame({"dia_object_id": np.arange(n_obj, dtype=np.int64) + 1,
                            "ra": ora, "dec": odec})
    # sources: 60 % of objects re-detected with 0.15" scatter, plus 30 % new
    det = rng.random(n_obj) < 0.6
    cosd = np.cos(np.radians(odec[det]))
    sra = (ora[det] + rng.normal(0, 0.15, det.sum()) * ARCSEC / np.maximum(cosd, 1e-6)) % 360
    sdec = np.clip(odec[det] + rng.normal(0, 0.15, det.sum()) * ARCSEC, -90, 90)
    nra, ndec = _field(rng, int(0.3 * n_obj), ra0, dec0, half_deg)
    sources = pd.DataFrame({"ra": np.r_[sra, nra], "dec": np.r_[sdec, ndec], "visit": 1})
    truth = np.r_[objects.dia_object_id.to_numpy()[det], np.full(nra.size, -1)]
    return objects, sources, truth


@pytest.mark.parametrize("ra0,dec0", [(0.0, 0.0), (180.0, 89.995), (300.0, -45.0)])
def test_associate_random_field_is_optimal_and_mostly_right(ra0, dec0):
    rng = np.random.default_rng(11)
    objects, sources, truth = _random_batch(rng, 1500, ra0, dec0, 0.03)
    res = associate(sources, objects, radius_arcsec=1.0, id_factory=_counter_ids())
    # every source within 1" of a free object is matched: check optimality by brute force
    s, o, sep = candidate_pairs(sources.ra, sources.dec, objects.ra, objects.dec, 1.0)
    # one object per source and per visit (duplicates aside: attached to an object that took
    # a source of the visit, within the radius of it)
    dup = res.duplicate
    matched = ~res.is_new & ~dup
    assert np.unique(res.dia_object_id[matched]).size == matched.sum()
    assert np.isin(res.dia_object_id[dup], res.dia_object_id[matched | res.is_new]).all()
    assert (res.distance_arcsec[dup] <= 1.0).all()
    # matched pairs are real candidate pairs with the reported distance
    cand = {(a, b): d for a, b, d in zip(s.tolist(), o.tolist(), sep.tolist())}
    for i in np.flatnonzero(matched):
        assert np.isclose(cand[(i, int(res.object_index[i]))], res.distance_arcsec[i])
    # maximum cardinality: equals scipy's maximum bipartite matching size
    from scipy import sparse
    from scipy.sparse.csgraph import maximum_bipartite_matching
    g = sparse.csr_array((np.ones(s.size), (s, o)), shape=(len(sources), len(objects)))
    mm = maximum_bipartite_matching(g, perm_type="column")
    assert matched.sum() == (mm >= 0).sum()
    # recovers the simulated truth for most re-detections
    redet = truth > 0
    agree = (res.dia_object_id[redet] == truth[redet]).mean()
    assert agree > 0.98  # crowded: ~0.13 other objects within 1"
    # a truly new source lands within 1" of one of the ~600 undetected objects with
    # p = 600/(pi*108"^2)*pi*1" ~ 0.05 and is then (rightly, by the rule) matched to it,
    # or within 1" of one of the ~900 detected ones or of another new source (p ~ 0.08 + 0.04:
    # attached as a duplicate of that visit)
    assert res.is_new[~redet].mean() > 0.8
    assert 0.05 < dup[~redet].mean() < 0.18 and not dup[redet & matched].any()


def test_bad_input_is_named():
    objects = pd.DataFrame({"dia_object_id": [1], "ra": [0.0], "dec": [0.0]})
    with pytest.raises(ValidationError, match="dec"):
        associate(pd.DataFrame({"ra": [1.0], "dec": [95.0]}), objects)
    with pytest.raises(ValidationError, match="'ra'"):
        associate(pd.DataFrame({"dec": [1.0]}), objects)
    with pytest.raises(ValidationError, match="radius"):
        associate(pd.DataFrame({"ra": [1.0], "dec": [1.0]}), objects, radius_arcsec=0)


def test_empty_inputs():
    res = associate(pd.DataFrame({"ra": [], "dec": []}),
                    pd.DataFrame({"dia_object_id": [1], "ra": [0.0], "dec": [0.0]}))
    assert res.dia_object_id.size == 0
    res = associate(pd.DataFrame({"ra": [1.0, 1.0], "dec": [2.0, 2.0]}),
                    pd.DataFrame(columns=["dia_object_id", "ra", "dec"]),
                    id_factory=_counter_ids())
    # without visit the batch is one visit: the coincident sources are one detection and
    # its duplicate (DIASources), or two objects (matched sources: two stars)
    assert res.is_new.tolist() == [True, False] and res.duplicate.tolist() == [False, True]
    assert np.unique(res.dia_object_id).size == 1
    res = associate(pd.DataFrame({"ra": [1.0, 1.0], "dec": [2.0, 2.0]}),
                    pd.DataFrame(columns=["dia_object_id", "ra", "dec"]), same_visit="found",
                    id_factory=_counter_ids())
    assert res.is_new.all() and np.unique(res.dia_object_id).size == 2


def _same_partition(a, b) -> bool:
    a = pd.factorize(pd.Series(a))[0]
    b = pd.factorize(pd.Series(b))[0]
    pairs = pd.DataFrame({"a": a, "b": b}).drop_duplicates()
    return not pairs.a.duplicated().any() and not pairs.b.duplicated().any()


@pytest.mark.parametrize("use_errors", [True, False])
def test_batch_of_visits_equals_visits_one_at_a_time(use_errors):
    """Positions move between visits exactly as the stored summaries would."""
    from archive.catalog.summaries import apply_sources, empty_objects, finalize

    rng = np.random.default_rng(21)
    n = 300
    ra0, dec0 = _field(rng, n, 359.99, 30.0, 0.02)  # dense, across RA 0/360
    rows = []
    for v in range(6):
        seen = rng.random(n) < 0.7
        err = rng.uniform(0.1, 0.4, seen.sum())
        cosd = np.cos(np.radians(dec0[seen]))
        rows.append(pd.DataFrame({
            "ra": (ra0[seen] + rng.normal(0, 1, seen.sum()) * err * ARCSEC / cosd) % 360,
            "dec": dec0[seen] + rng.normal(0, 1, seen.sum()) * err * ARCSEC,
            "ra_err": err * ARCSEC, "dec_err": err * ARCSEC,  # on the sky
            "visit": 100 - v, "mjd": 60000.0 + v, "band": "r",
            "psf_flux": 1000.0, "psf_flux_err": 10.0, "flags": np.int64(0)}))
    # one prior visit stored as objects with their running sums
    first = rows[0]
    ids = _counter_ids()
    r0 = associate(first, empty_objects(0), id_factory=ids)
    stored = finalize(apply_sources(empty_objects(0), first.assign(
        dia_object_id=r0.dia_object_id, flags=np.where(r0.duplicate, DUPLICATE_FLAG, 0))).objects)
    batch = pd.concat(rows[1:], ignore_index=True)
    res_batch = associate(batch, stored, radius_arcsec=1.0, use_errors=use_errors,
                          id_factory=ids)
    objs = stored
    seq_ids = []
    for part in rows[1:]:
        r = associate(part, objs, radius_arcsec=1.0, use_errors=use_errors, id_factory=ids)
        seq_ids.append(r.dia_object_id)
        objs = finalize(apply_sources(objs, part.assign(
            dia_object_id=r.dia_object_id, flags=np.where(r.duplicate, DUPLICATE_FLAG, 0))).objects)
    seq = np.concatenate(seq_ids)
    assert _same_partition(res_batch.dia_object_id, seq)
    existing = set(stored.dia_object_id)
    assert (np.isin(res_batch.dia_object_id, list(existing))
            == np.isin(seq, list(existing))).all()
    # dense enough that some sources are ambiguous and some found objects
    assert 0 < res_batch.n_new < len(batch) // 3


def test_drifting_object_is_followed_across_pool_rebuilds(caplog):
    """A target that moves farther than the radius within a batch is still followed.

    The object's own position is poor (10") and each visit's source precise
    (0.01"), so the object moves to the mean of its sources: sources at
    0.9, 1.8, 2.2, 2.5, 2.8" east are each < 1" from the mean of the earlier
    ones, but the later ones lie beyond the initial candidate pool (2") of the
    object's original position: the pool must be rebuilt after it drifts.
    """
    from archive.catalog.summaries import apply_sources, empty_objects, finalize

    dec0 = 10.0
    objects = pd.DataFrame({"dia_object_id": [77], "ra": [50.0], "dec": [dec0],
                            "ra_err": [10 * ARCSEC], "dec_err": [10 * ARCSEC]})
    east = np.array([0.9, 1.8, 2.2, 2.5, 2.8])
    n = east.size
    batch = pd.DataFrame({"ra": 50.0 + east * ARCSEC / np.cos(np.radians(dec0)), "dec": dec0,
                          "ra_err": 0.01 * ARCSEC, "dec_err": 0.01 * ARCSEC,
                          "visit": np.arange(n), "mjd": 60000.0 + np.arange(n)})
    with caplog.at_level(logging.DEBUG, logger="archive.catalog.association"):
        # (ceiling = radius: the pool is then 2", which the later sources lie beyond)
        res = associate(batch, objects, radius_arcsec=1.0, max_radius_arcsec=1.0,
                        id_factory=_counter_ids())
    assert (res.dia_object_id == 77).all()
    assert "pool rebuilt" in caplog.text
    # same answer visit by visit through the stored summaries
    stored = empty_objects(1)
    stored["dia_object_id"] = 77
    stored = apply_sources(stored.iloc[:0], pd.DataFrame({
        "dia_object_id": [77], "ra": [50.0], "dec": [dec0], "ra_err": [10 * ARCSEC],
        "dec_err": [10 * ARCSEC], "mjd": [59999.0], "band": ["r"]})).objects
    stored = finalize(stored)
    for i in range(n):
        r = associate(batch.iloc[[i]], stored, radius_arcsec=1.0, max_radius_arcsec=1.0,
                      id_factory=_counter_ids())
        assert r.dia_object_id[0] == 77
        stored = finalize(apply_sources(stored, batch.iloc[[i]].assign(
            dia_object_id=77, band="r")).objects)
