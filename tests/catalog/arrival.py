"""Helpers for the arrival-order tests: a crowded simulated field and grouping comparisons."""

from __future__ import annotations

import numpy as np
import pandas as pd

ARCSEC = 1.0 / 3600.0


def crowded_field(seed: int = 0, n_obj: int = 240, n_visits: int = 10, half_arcsec: float = 30.0,
                  ra0: float = 210.0, dec0: float = -30.0, p_detect: float = 0.6,
                  twin_fraction: float = 0.03, n_spurious: int = 8,
                  n_detectors: int = 2, err_range: tuple[float, float] = (0.05, 0.35)) -> pd.DataFrame:
    """dia_source rows of a crowded field seen on ``n_visits`` visits.

    ``n_obj`` objects in a square of +-``half_arcsec`` (240 in 60" x 60": about 0.2
    neighbours within 1" of each), each detected with probability ``p_detect`` per
    visit with ``err_range`` errors (arcsec; positions scattered by them), a fraction of the
    detections measured twice on the same image 0.2" apart (as ZTF does), and a few
    spurious sources per visit.  Every visit spans ``n_detectors`` detectors (split at
    the field's centre in RA, so a visit can arrive in pieces).  Columns: every
    dia_source column the ingest needs; ``truth`` (object index, -1 spurious).
    """
    rng = np.random.default_rng(seed)
    cosd = np.cos(np.radians(dec0))
    ora = ra0 + rng.uniform(-half_arcsec, half_arcsec, n_obj) * ARCSEC / cosd
    odec = dec0 + rng.uniform(-half_arcsec, half_arcsec, n_obj) * ARCSEC
    rows = []
    next_id = 1
    for v in range(n_visits):
        seen = np.flatnonzero(rng.random(n_obj) < p_detect)
        twin = seen[rng.random(seen.size) < twin_fraction]
        idx = np.concatenate([seen, twin, np.full(n_spurious, -1)])
        n = idx.size
        err = rng.uniform(*err_range, n)
        ra = np.where(idx >= 0, ora[np.maximum(idx, 0)],
                      ra0 + rng.uniform(-half_arcsec, half_arcsec, n) * ARCSEC / cosd)
        dec = np.where(idx >= 0, odec[np.maximum(idx, 0)],
                       dec0 + rng.uniform(-half_arcsec, half_arcsec, n) * ARCSEC)
        ra = ra + rng.normal(0, 1, n) * err * ARCSEC / cosd
        dec = dec + rng.normal(0, 1, n) * err * ARCSEC
        shift = np.zeros(n)
        shift[seen.size:seen.size + twin.size] = 0.2  # the twin: 0.2" north of its detection
        dec = dec + shift * ARCSEC
        visit = 1000 + v
        det = (ra > ra0).astype(np.int32) if n_detectors > 1 else np.zeros(n, np.int32)
        rows.append(pd.DataFrame({
            "dia_source_id": np.arange(next_id, next_id + n, dtype=np.int64),
            "exposure_id": visit * 1000 + det, "visit": np.int64(visit), "detector": det,
            "band": "r", "mjd": 60000.0 + 0.7 * v, "ra": ra, "dec": dec,
            "ra_err": (err * ARCSEC).astype(np.float32), "dec_err": (err * ARCSEC).astype(np.float32),
            "psf_flux": rng.normal(2000, 300, n), "psf_flux_err": np.full(n, 50.0),
            "snr": rng.uniform(5, 50, n).astype(np.float32),
            "flags": np.zeros(n, np.int64), "truth": idx}))
        next_id += n
    return pd.concat(rows, ignore_index=True)


def groupings(dia_source: pd.DataFrame) -> set[frozenset[int]]:
    """The objects as sets of dia_source ids (ids of objects themselves do not matter)."""
    g = dia_source.groupby("dia_object_id")["dia_source_id"].apply(lambda s: frozenset(s.tolist()))
    return set(g.tolist())


def n_changed(reference: set[frozenset[int]], other: set[frozenset[int]]) -> int:
    """Reference objects whose exact group of sources the other grouping lacks."""
    return len(reference - other)


def batches(sources: pd.DataFrame, how: str, rng: np.random.Generator) -> list[pd.DataFrame]:
    """Split the rows into ingest batches.

    ``time``: one batch per visit in time order; ``reverse``: the same, newest first;
    ``shuffle``: visits in random order; ``interleave``: two streams (even and odd
    visits) ingested one after the other; ``pieces``: random groups of whole visits
    and of single detectors of visits, in random order.
    """
    visits = np.sort(sources["visit"].unique())
    by = {v: sources[sources["visit"] == v] for v in visits}
    if how == "time":
        return [by[v] for v in visits]
    if how == "reverse":
        return [by[v] for v in visits[::-1]]
    if how == "shuffle":
        return [by[v] for v in rng.permutation(visits)]
    if how == "interleave":
        return [by[v] for v in list(visits[1::2]) + list(visits[0::2])]
    if how == "pieces":
        parts = []
        for v in visits:
            if rng.random() < 0.5:
                parts += [g for _, g in by[v].groupby("detector")]
            else:
                parts.append(by[v])
        order = rng.permutation(len(parts))
        out, cur = [], []
        for i in order:  # random groups of 1-3 pieces per batch
            cur.append(parts[i])
            if rng.random() < 0.5:
                out.append(pd.concat(cur, ignore_index=True))
                cur = []
        if cur:
            out.append(pd.concat(cur, ignore_index=True))
        return out
    raise ValueError(how)
