"""The association gate (issue 15, item 15): a radius floor, and beyond it a chi^2 distance
with the errors of both sides up to a ceiling; per-survey radii (ZTF 1.5", tested on real
ZTF alerts in test_alerts.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from archive.catalog.alerts import compare_grouping, survey_radius_arcsec
from archive.catalog.association import associate
from archive.catalog.dia_ingest import AssociationConfig

from arrival import ARCSEC, crowded_field

EMPTY = pd.DataFrame({"dia_object_id": np.empty(0, np.int64), "ra": [], "dec": []})


def _pair(sep_arcsec: float, err_arcsec: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    objects = pd.DataFrame({"dia_object_id": [1], "ra": [30.0], "dec": [10.0],
                            "ra_err": [err_arcsec * ARCSEC], "dec_err": [err_arcsec * ARCSEC]})
    sources = pd.DataFrame({"ra": [30.0], "dec": [10.0 + sep_arcsec * ARCSEC], "visit": [1],
                            "ra_err": [err_arcsec * ARCSEC], "dec_err": [err_arcsec * ARCSEC]})
    return sources, objects


@pytest.mark.parametrize("sep,err,match", [
    (0.9, 0.01, True),    # within the radius: always (real positions scatter beyond errors)
    (1.5, 0.01, False),   # beyond it, precise positions: chi^2 = 11250
    (1.5, 0.6, True),     # imprecise: chi^2 = 1.5^2 / 0.72 = 3.1
    (1.9, 0.6, True),     # chi^2 = 5.0, within the 2" ceiling
    (2.1, 0.6, False),    # beyond the ceiling
    (1.5, 0.3, False),    # chi^2 = 12.5 > 9.21
])
def test_gate(sep, err, match):
    sources, objects = _pair(sep, err)
    res = associate(sources, objects, id_factory=lambda n: np.arange(n) + 100)
    assert bool(res.dia_object_id[0] == 1) is match
    # the radius alone (no chi^2 gate): only within 1"
    res = associate(sources, objects, max_chi2=None, id_factory=lambda n: np.arange(n) + 100)
    assert bool(res.dia_object_id[0] == 1) is (sep <= 1.0)


def _exact(src: pd.DataFrame, **kw) -> float:
    res = associate(src, EMPTY, **kw)
    t = src["truth"].to_numpy() >= 0
    return compare_grouping(res.dia_object_id[t], src["truth"].to_numpy()[t])["exact"]


def test_chi2_gate_follows_imprecise_positions():
    """A sparse field of faint sources (0.3-0.8" errors): with the radius alone (as before)
    13 % of the detections were grouped exactly as the truth; with the chi^2 gate 86 %.
    In a crowded field (0.05-0.35" errors, 0.2 neighbours within 1") it costs little."""
    sparse = [_exact(crowded_field(s, n_obj=100, half_arcsec=300.0, n_spurious=0,
                                   twin_fraction=0.0, err_range=(0.3, 0.8))) for s in (0, 1)]
    radius_only = [_exact(crowded_field(s, n_obj=100, half_arcsec=300.0, n_spurious=0,
                                        twin_fraction=0.0, err_range=(0.3, 0.8)), max_chi2=None)
                   for s in (0, 1)]
    print(f"sparse faint field: exact {radius_only} (radius only) -> {sparse} (chi^2 gate)")
    assert min(sparse) > 0.75 and max(radius_only) < 0.4
    crowded = _exact(crowded_field(0))
    crowded_radius_only = _exact(crowded_field(0), max_chi2=None)
    assert crowded > crowded_radius_only - 0.05


def test_survey_radius():
    rows = pd.DataFrame({"external_object_id": pd.array(["ZTF18abxhyqv", "169645854020337671", None],
                                                        dtype="string")})
    assert survey_radius_arcsec(rows, 1.0).tolist() == [1.5, 1.0, 1.0]
    assert AssociationConfig().radii(rows).tolist() == [1.5, 1.0, 1.0]
    assert AssociationConfig(radius_arcsec=0.7).radii(rows).tolist() == [0.7, 0.7, 0.7]
    assert AssociationConfig().reach() == 2.0
    from archive.errors import ValidationError

    with pytest.raises(ValidationError, match="radius_arcsec"):
        AssociationConfig(radius_arcsec=-1.0)
