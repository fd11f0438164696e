"""What an archive found on a simulated survey, against the simulator's truth.

Reads the archive (DIASources, DIAObjects, the templates' inputs, the difference
images) and the simulation's truth tables, and scores the difference imaging with
:mod:`archive.sim.scoring`: the expected change of every variable, transient and
moving object on every difference image, its PSF-flux error measured there by
forced photometry (so "S/N >= 7" means the S/N the difference image allows at
that place), completeness, and the DIASources and DIAObjects no change explains.
Used by ``archive demo`` and by the tests of the whole chain.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas as pd

from archive.sim.scoring import ChangeScore, score_changes, true_changes


def template_visits(arc, products=None, positions: pd.DataFrame | None = None):
    """Visits combined into the templates of the archive (from each template's INPUTS HDU).

    With ``positions`` (``object_id``, ``ra``, ``dec``; ``object_id`` may be any int64 key):
    a DataFrame of (``object_id``, ``visit``) pairs, the visits combined at each place (read from the
    template's INPUT_MAP, so an input clipped there as an artifact is left out; the first
    template tile covering the place is used)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    prods = arc.sql("SELECT path FROM image_product WHERE kind = 'template' ORDER BY tile_id")
    root = pathlib.Path(arc.products_root(products))
    ex = arc.sql("SELECT exposure_id, visit FROM exposure")
    by_id = dict(zip(ex["exposure_id"].astype("int64"), ex["visit"].astype("int64")))
    ids: set[int] = set()
    pairs, placed = [], set()
    for rel in prods["path"]:
        with fits.open(root / rel, memmap=False) as hdul:
            inputs = np.asarray(hdul["INPUTS"].data["exposure_id"], np.int64)
            ids.update(int(e) for e in inputs)
            if positions is None or positions.empty:
                continue
            imap = hdul["INPUT_MAP"].data
            x, y = WCS(hdul["IMAGE"].header).all_world2pix(positions["ra"].to_numpy(float),
                                                           positions["dec"].to_numpy(float), 0)
            ix, iy = np.round(x).astype(np.int64), np.round(y).astype(np.int64)
            ny, nx = imap.shape
            for oid, i, j in zip(positions["object_id"].to_numpy(np.int64), ix, iy):
                if oid in placed or not (0 <= i < nx and 0 <= j < ny):
                    continue
                bits = int(imap[j, i])
                if bits == 0:
                    continue
                placed.add(int(oid))
                pairs += [(int(oid), by_id[int(e)]) for k, e in enumerate(inputs) if bits >> k & 1
                          and int(e) in by_id]
    if positions is not None:
        return pd.DataFrame(pairs, columns=["object_id", "visit"])
    return sorted({by_id[i] for i in ids if i in by_id})


def covered_area_deg2(footprints, order: int = 13) -> float:
    """Sky area (deg^2) of the union of footprint polygons (JSON lists of [ra, dec] corners),
    counted in HEALPix pixels of ``order`` (~26 arcsec at 13)."""
    import healpy as hp

    nside = 1 << order
    pix: set[int] = set()
    for fp in footprints:
        c = np.asarray(json.loads(fp) if isinstance(fp, str) else fp, float)
        vec = hp.ang2vec(c[:, 0], c[:, 1], lonlat=True)
        pix.update(hp.query_polygon(nside, vec, inclusive=False, nest=True).tolist())
    return len(pix) * hp.nside2pixarea(nside, degrees=True)


def score_archive(arc, sim_dir, products=None, snr_min: float = 7.0, radius_arcsec: float = 1.0) -> tuple[ChangeScore, pd.DataFrame]:
    """Score the archive's difference imaging against the simulation in ``sim_dir``.

    ``products``: the image products' directory (needed for a Postgres archive).
    Returns the :class:`~archive.sim.scoring.ChangeScore` (DIASources flagged
    NEAR_BRIGHT_STAR are left out of the false counts, as the difference-imaging issue
    counts them) and the expected changes with their measured ``delta_flux_err`` and
    whether a DIASource found each.
    """
    from archive.process.diffim.detection import FLAG_NEAR_BRIGHT_STAR
    from archive.process.flags import FLAG_OFF_IMAGE
    from archive.process.forced import ForcedConfig, forced_at_sky

    sim = pathlib.Path(sim_dir)
    manifest = json.loads((sim / "manifest.json").read_text())
    truth_sources = pd.read_parquet(sim / manifest["truth"]["sources"])
    truth_objects = pd.read_parquet(sim / manifest["truth"]["objects"])
    diffs = arc.sql("SELECT d.exposure_id, d.path, d.footprint, e.visit FROM image_product d "
                    "JOIN exposure e ON e.exposure_id = d.exposure_id WHERE d.kind = 'diff' ORDER BY e.visit")
    objs = truth_sources.groupby("object_id")[["ra", "dec"]].mean().reset_index()
    changing = truth_objects.loc[truth_objects["kind"].isin(("variable", "transient")), "object_id"]
    placed = template_visits(arc, products, objs[objs["object_id"].isin(changing)])
    changes = true_changes(truth_sources, truth_objects, diffs["visit"].astype("int64"), placed)
    # a moving object is in the template only where its own visit was combined (and not
    # clipped) at the place it had then: with a share 1/n of its flux, n the visits combined
    mv = changes[changes["kind"] == "moving"]
    if len(mv):
        at = template_visits(arc, products, pd.DataFrame({"object_id": mv.index.to_numpy(np.int64),
                                                          "ra": mv["ra"], "dec": mv["dec"]}))
        n = at.groupby("object_id").size()
        own = at.merge(pd.DataFrame({"object_id": mv.index.to_numpy(np.int64), "visit": mv["visit"].to_numpy()}))
        share = pd.Series(0.0, index=mv.index)
        share[own["object_id"].to_numpy()] = 1.0 / n[own["object_id"]].to_numpy()
        changes.loc[mv.index, "template_flux"] = mv["flux"] * share
        changes.loc[mv.index, "delta_flux"] = mv["flux"] - changes.loc[mv.index, "template_flux"]
    err = np.full(len(changes), np.nan)
    root = pathlib.Path(arc.products_root(products))
    from archive.image.exposure import Exposure

    for r in diffs.itertuples():
        sel = np.flatnonzero(changes["visit"].to_numpy() == int(r.visit))
        if len(sel) == 0:
            continue
        diff = Exposure.read(root / r.path)
        f = forced_at_sky(diff, changes["ra"].to_numpy()[sel], changes["dec"].to_numpy()[sel], ForcedConfig())
        e = f["psf_flux_err"].to_numpy(float)
        off = (f["flags"].to_numpy(np.int64) & int(FLAG_OFF_IMAGE)) != 0
        err[sel] = np.where(off, np.nan, e)
    changes["delta_flux_err"] = err
    changes = changes[np.isfinite(err)].reset_index(drop=True)
    dia = arc.sql("SELECT dia_source_id, dia_object_id, visit, ra, dec, psf_flux, psf_flux_err, snr, flags "
                  "FROM dia_source")
    scale = float(manifest["config"].get("pixel_scale", 0.2))
    score = score_changes(changes, dia, covered_area_deg2(diffs["footprint"]), scale, snr_min=snr_min,
                          radius_arcsec=radius_arcsec, ignore_flags=FLAG_NEAR_BRIGHT_STAR)
    return score, score.changes

