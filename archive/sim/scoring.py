"""Score difference-imaging results against a simulation's truth.

What changed in the sky, per visit, is known to the simulator: the variable
stars, transients and moving objects (``truth/sources.parquet`` has each
object's flux on each visit). A template averages some visits, so what a
difference image should show is each changing object's flux on the visit
minus its mean flux on the template's visits (zero before a transient
appears; a moving object is never at the same place, so its template flux is
zero). These functions turn the truth into that table of expected changes,
and match DIASources (and through them DIAObjects) to it: completeness at a
true signal-to-noise ratio, and the detections that no change explains.

Conventions: fluxes in nJy, angles in degrees, ``visit`` as in the truth
tables. Pure pandas/numpy/scipy; imports nothing of the archive.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

#: The kinds of simulated object whose flux or position changes between visits.
CHANGING_KINDS = ("variable", "transient", "moving")


def true_changes(truth_sources: pd.DataFrame, truth_objects: pd.DataFrame, visits, template_visits,
                 kinds=CHANGING_KINDS) -> pd.DataFrame:
    """Expected changes on the difference images of ``visits``.

    Parameters
    ----------
    truth_sources : the simulator's per-visit sources (``visit``, ``object_id``, ``ra``, ``dec``,
        ``flux_njy``).
    truth_objects : the simulator's objects (``object_id``, ``kind``).
    visits : visits that have a difference image.
    template_visits : visits the template combined (equal weights are assumed; a template
        visit on which the object is absent from ``truth_sources`` did not cover its place), or
        a DataFrame of (``object_id``, ``visit``) pairs: the visits combined at each object's
        place (artifact rejection leaves out a visit where a transient stood alone).
    kinds : object kinds taken as changing.

    Returns
    -------
    DataFrame with one row per (visit, changing object on that visit): ``visit``,
    ``object_id``, ``kind``, ``ra``, ``dec`` (deg, where the object is on that visit),
    ``flux`` (nJy on the visit), ``template_flux`` (nJy) and ``delta_flux`` (nJy,
    what the difference image should measure).
    """
    kind = truth_objects.set_index("object_id")["kind"]
    ts = truth_sources[truth_sources["object_id"].map(kind).isin(kinds)].copy()
    ts["kind"] = ts["object_id"].map(kind)
    if isinstance(template_visits, pd.DataFrame):  # per object: the visits combined at its place
        pairs = template_visits[["object_id", "visit"]].astype("int64")
        on_template = ts.merge(pairs, on=["object_id", "visit"])
    else:
        tv = np.asarray(sorted(set(int(v) for v in template_visits)), np.int64)
        if len(tv) == 0:
            raise ValueError("true_changes: no template visits given")
        on_template = ts[ts["visit"].isin(tv)]
    # a visit that did not cover the object's place did not go into the template there
    tflux = on_template.groupby("object_id")["flux_njy"].mean()
    out = ts[ts["visit"].isin(np.asarray(list(visits), np.int64))]
    out = out[["visit", "object_id", "kind", "ra", "dec", "flux_njy"]].rename(columns={"flux_njy": "flux"})
    tf = out["object_id"].map(tflux).fillna(0.0).to_numpy(float)
    out["template_flux"] = np.where(out["kind"].to_numpy() == "moving", 0.0, tf)
    out["delta_flux"] = out["flux"].to_numpy(float) - out["template_flux"].to_numpy(float)
    return out.sort_values(["visit", "object_id"]).reset_index(drop=True)


def _tangent(ra, dec, ra0, dec0) -> np.ndarray:
    """Gnomonic coordinates (arcsec) about (ra0, dec0); all in degrees."""
    ra, dec = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    a0, d0 = np.radians(ra0), np.radians(dec0)
    cosc = np.sin(d0) * np.sin(dec) + np.cos(d0) * np.cos(dec) * np.cos(ra - a0)
    xi = np.cos(dec) * np.sin(ra - a0) / cosc
    eta = (np.cos(d0) * np.sin(dec) - np.sin(d0) * np.cos(dec) * np.cos(ra - a0)) / cosc
    return np.degrees(np.column_stack([xi, eta])) * 3600.0


#: Changes on one visit closer than this (arcsec) are one source on the image: no detection
#: can split two transients 0.2" apart in one host (the simulator does place such pairs).
BLEND_ARCSEC = 0.5


def match_to_changes(dia: pd.DataFrame, changes: pd.DataFrame, radius_arcsec: float = 1.0,
                     blend_arcsec: float = BLEND_ARCSEC):
    """Match DIASources to expected changes on the same visit.

    ``dia`` needs ``visit``, ``ra``, ``dec``; ``changes`` as from :func:`true_changes`.
    Returns (``changes`` with ``found``: a DIASource lies within ``radius_arcsec``, or the
    change is blended (within ``blend_arcsec``, same visit) with a found one, and
    ``blended``: that last case; ``dia`` with ``real``: it lies within ``radius_arcsec`` of
    an expected change, and ``object_id``: the nearest such, or -1).
    """
    from scipy.spatial import cKDTree

    ch = changes.copy()
    ch["found"] = False
    ch["blended"] = False
    d = dia.copy()
    d["real"] = False
    d["object_id"] = np.int64(-1)
    for visit, dv in d.groupby("visit"):
        cv = ch[ch["visit"] == visit]
        if cv.empty or dv.empty:
            continue
        ra0, dec0 = float(np.mean(dv["ra"])), float(np.mean(dv["dec"]))
        pc = _tangent(cv["ra"], cv["dec"], ra0, dec0)
        pd_ = _tangent(dv["ra"], dv["dec"], ra0, dec0)
        dist, idx = cKDTree(pc).query(pd_, distance_upper_bound=radius_arcsec)
        hit = np.isfinite(dist)
        d.loc[dv.index[hit], "real"] = True
        d.loc[dv.index[hit], "object_id"] = cv["object_id"].to_numpy()[idx[hit]]
        found = np.unique(idx[hit])
        ch.loc[cv.index[found], "found"] = True
        if blend_arcsec > 0 and len(found):
            near = cKDTree(pc).query_ball_point(pc[found], r=blend_arcsec)
            partners = np.setdiff1d(np.unique(np.concatenate([np.asarray(n, np.int64) for n in near])), found)
            ch.loc[cv.index[partners], "found"] = True
            ch.loc[cv.index[partners], "blended"] = True
    return ch, d


@dataclasses.dataclass
class ChangeScore:
    """How DIASources and DIAObjects compare with the truth.

    ``completeness``: the fraction of expected changes with a true S/N of at least
    ``snr_min`` (``|delta_flux| / delta_flux_err``) found; ``n_expected``, ``n_found``:
    its terms; ``missed``: those not found; ``changes``: every expected change with
    ``found`` and ``snr_true`` (``delta_flux / delta_flux_err``). ``n_false_sources`` /
    ``n_false_objects``: DIASources / DIAObjects that no change explains, leaving out
    those carrying ``ignore_flags`` (e.g. near a bright star); ``area_deg2``: the
    area they were counted over; ``false_per_4k``: false DIAObjects per
    4096 x 4096 pixels of ``pixel_scale_arcsec``.
    """

    snr_min: float
    n_expected: int
    n_found: int
    completeness: float
    missed: pd.DataFrame
    n_false_sources: int
    n_false_objects: int
    n_objects: int
    n_real_objects: int
    area_deg2: float
    false_per_4k: float
    changes: pd.DataFrame


def score_changes(changes: pd.DataFrame, dia_sources: pd.DataFrame, area_deg2: float,
                  pixel_scale_arcsec: float, snr_min: float = 7.0, radius_arcsec: float = 1.0,
                  ignore_flags: int = 0) -> ChangeScore:
    """Completeness and false detections of ``dia_sources`` against ``changes``.

    ``changes`` needs ``delta_flux_err`` (nJy: the PSF-flux error a difference image
    gives at that place, e.g. forced photometry there) besides :func:`true_changes`'
    columns; ``dia_sources`` needs ``visit``, ``ra``, ``dec``, ``flags`` and
    ``dia_object_id``. ``area_deg2``: the sky area the differences cover (for the rate of
    false DIAObjects).
    """
    if "delta_flux_err" not in changes:
        raise ValueError("score_changes: changes need a delta_flux_err column (nJy)")
    ch, d = match_to_changes(dia_sources, changes, radius_arcsec)
    ch["snr_true"] = ch["delta_flux"].to_numpy(float) / ch["delta_flux_err"].to_numpy(float)
    snr = np.abs(ch["snr_true"].to_numpy())
    want = ch[np.isfinite(snr) & (snr >= snr_min)]
    n_found = int(want["found"].sum())
    flagged = (d["flags"].to_numpy(np.int64) & int(ignore_flags)) != 0
    false_src = ~d["real"].to_numpy() & ~flagged
    by_obj = pd.DataFrame({"o": d["dia_object_id"].to_numpy(), "real": d["real"].to_numpy(),
                           "clean": ~flagged})
    g = by_obj.groupby("o").agg(real=("real", "any"), clean=("clean", "any"))
    n_false_obj = int((~g["real"] & g["clean"]).sum())
    area_4k = (4096 * pixel_scale_arcsec / 3600.0) ** 2
    return ChangeScore(snr_min=snr_min, n_expected=len(want), n_found=n_found,
                       completeness=n_found / len(want) if len(want) else float("nan"),
                       missed=want[~want["found"]].reset_index(drop=True),
                       n_false_sources=int(false_src.sum()), n_false_objects=n_false_obj,
                       n_objects=len(g), n_real_objects=int(g["real"].sum()), area_deg2=float(area_deg2),
                       false_per_4k=n_false_obj * area_4k / area_deg2 if area_deg2 > 0 else float("nan"),
                       changes=ch)
