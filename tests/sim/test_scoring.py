"""archive.sim.scoring: expected changes from a truth table, matching and the score."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from archive.sim.scoring import match_to_changes, score_changes, true_changes


def _truth():
    objects = pd.DataFrame({"object_id": [1, 2, 3, 4], "kind": ["star", "variable", "transient", "moving"]})
    rows = []
    for v in (1, 2, 3, 4):
        rows.append((v, 1, 150.0, 2.0, 1000.0))                 # constant star
        rows.append((v, 2, 150.01, 2.0, 1000.0 + 100.0 * v))    # variable: 1100, 1200, 1300, 1400
        rows.append((v, 3, 150.02, 2.0, 0.0 if v < 3 else 5000.0))  # transient from visit 3
        if v != 2:                                                # the moving object: off the image on visit 2
            rows.append((v, 4, 150.03 + 0.001 * v, 2.01, 800.0))
    ts = pd.DataFrame(rows, columns=["visit", "object_id", "ra", "dec", "flux_njy"])
    return ts, objects


def test_true_changes_subtract_the_template_mean():
    ts, objects = _truth()
    ch = true_changes(ts, objects, visits=[3, 4], template_visits=[1, 2])
    assert set(ch["kind"]) == {"variable", "transient", "moving"}  # the constant star is no change
    var = ch[ch["object_id"] == 2].set_index("visit")
    assert var.loc[3, "template_flux"] == pytest.approx(1150.0)
    assert var.loc[4, "delta_flux"] == pytest.approx(250.0)
    tr = ch[ch["object_id"] == 3].set_index("visit")
    assert tr.loc[3, "delta_flux"] == pytest.approx(5000.0)
    mv = ch[ch["kind"] == "moving"]
    assert (mv["template_flux"] == 0).all() and (mv["delta_flux"] == 800.0).all()


def test_template_visits_per_object_leave_out_uncovered_and_clipped_visits():
    ts, objects = _truth()
    # the variable's place was covered by visit 1 only (visit 2 clipped or off the image there)
    pairs = pd.DataFrame({"object_id": [2, 3, 3], "visit": [1, 1, 2]})
    ch = true_changes(ts, objects, visits=[4], template_visits=pairs)
    assert ch.set_index("object_id").loc[2, "template_flux"] == pytest.approx(1100.0)
    assert ch.set_index("object_id").loc[3, "template_flux"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no template visits"):
        true_changes(ts, objects, visits=[4], template_visits=[])


def test_matching_and_score_count_found_missed_and_false():
    ts, objects = _truth()
    ch = true_changes(ts, objects, visits=[3, 4], template_visits=[1, 2])
    ch["delta_flux_err"] = 100.0
    v3 = ch[(ch["visit"] == 3)].set_index("object_id")
    dia = pd.DataFrame({
        "dia_object_id": [10, 11, 12, 13],
        "visit": [3, 3, 3, 4],
        # the transient 0.5" off; a detection 5" from everything; a near-bright-star one; the variable on visit 4
        "ra": [v3.loc[3, "ra"] + 0.5 / 3600 / np.cos(np.radians(2.0)), 150.05, 150.0, 150.01],
        "dec": [2.0, 2.0 + 5 / 3600, 2.0, 2.0],
        "flags": [0, 0, 1 << 44, 0],
    })
    found, d = match_to_changes(dia, ch, radius_arcsec=1.0)
    assert d["real"].tolist() == [True, False, False, True]
    assert d["object_id"].tolist() == [3, -1, -1, 2]
    s = score_changes(ch, dia, area_deg2=0.01, pixel_scale_arcsec=0.2, snr_min=7.0, ignore_flags=1 << 44)
    # S/N >= 7: the transient on 3 and 4 (50), the moving object on 3 and 4 (8), the variable on 4 (2.5 -> no)
    assert s.n_expected == 4 and s.n_found == 1 and s.completeness == pytest.approx(0.25)
    assert set(zip(s.missed["visit"], s.missed["object_id"])) == {(4, 3), (3, 4), (4, 4)}
    assert s.n_false_sources == 1 and s.n_false_objects == 1 and s.n_real_objects == 2
    assert int(s.changes["found"].sum()) == 2 and s.changes["snr_true"].max() == pytest.approx(50.0)
    assert s.false_per_4k == pytest.approx(1 * (4096 * 0.2 / 3600) ** 2 / 0.01)
    with pytest.raises(ValueError, match="delta_flux_err"):
        score_changes(ch.drop(columns="delta_flux_err"), dia, 0.01, 0.2)


def test_changes_closer_than_a_blend_are_found_together_but_not_farther_ones():
    changes = pd.DataFrame({"visit": [5, 5, 5], "object_id": [10, 11, 12], "kind": "transient",
                            "ra": [150.0, 150.0 + 0.2 / 3600, 150.0 + 2.0 / 3600], "dec": 2.0,
                            "delta_flux": [60000.0, 4000.0, 3000.0]})
    dia = pd.DataFrame({"visit": [5], "ra": [150.0 + 0.05 / 3600], "dec": [2.0]})  # one detection, at the bright one
    ch, d = match_to_changes(dia, changes)
    assert ch["found"].tolist() == [True, True, False]  # 0.2" away: one source on the image; 2" away: missed
    assert ch["blended"].tolist() == [False, True, False]
    assert d["object_id"].tolist() == [10]
    ch, _ = match_to_changes(dia, changes, blend_arcsec=0.0)
    assert ch["found"].tolist() == [True, False, False]
