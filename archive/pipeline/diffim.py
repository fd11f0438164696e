"""Difference imaging and forced photometry as steps of ``archive run``.

``difference`` (one unit per processed exposure; recorded in time order)
    The calexp in nJy minus its template: the templates of every tile it overlaps,
    joined on its grid (:mod:`archive.process.diffim.template`), subtracted by
    Alard-Lupton (default) or ZOGY (``method``).  The difference image is registered
    (kind ``diff``); its DIASources (:mod:`archive.process.diffim.detection`) are
    associated into DIAObjects in the same transaction, visit by visit in time order
    (:func:`archive.catalog.dia_ingest.ingest_dia_sources`; a late visit re-associates
    what it affects).  An exposure no template covers is recorded as failed with that
    reason (``archive status``); when a template appears it is tried again.
``forced`` (one unit per exposure with a difference image)
    PSF fluxes at the position of every DIAObject on the exposure, on the difference
    (``psf_flux``) and on the calexp (``science_flux``), whether or not it was detected
    there, into ``dia_forced_source`` with the objects' forced-flux summaries.  A unit
    is current while the set of objects on its exposure is unchanged; when new objects
    appear (found on later visits) it runs again and adds only the missing rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from archive.catalog.dia_ingest import AssociationConfig
from archive.catalog.ids import new_ids
from archive.pipeline.products import ProductRef, WrittenProduct
from archive.pipeline.steps import Recorded, RunContext, Step, Unit
from archive.process.diffim.alard_lupton import AlardLuptonConfig
from archive.process.diffim.detection import DetectionConfig
from archive.process.forced import ForcedConfig


@dataclasses.dataclass
class DifferenceStepConfig:
    """method: ``"alard_lupton"`` or ``"zogy"``; the settings of each, of DIASource detection
    and of association (match radius: None = 1", see :class:`AssociationConfig`)."""

    method: str = dataclasses.field(default="alard_lupton", metadata={"choices": ("alard_lupton", "zogy")})
    alard_lupton: AlardLuptonConfig = dataclasses.field(default_factory=AlardLuptonConfig)
    detection: DetectionConfig = dataclasses.field(default_factory=DetectionConfig)
    association_radius_arcsec: float | None = None


@dataclasses.dataclass
class DifferenceOutput:
    written: WrittenProduct | None
    sources: pd.DataFrame
    note: str = ""


def _calexps(store) -> pd.DataFrame:
    return store.sql("SELECT e.exposure_id, e.visit, e.detector, e.band, e.mjd_mid, p.path, p.sha256, p.footprint "
                     "FROM exposure e JOIN image_product p ON p.exposure_id = e.exposure_id "
                     "WHERE e.status = 'processed' AND p.kind = 'calexp' ORDER BY e.mjd_mid, e.exposure_id")


def _templates_over(ctx: RunContext, band: str, footprint: str) -> pd.DataFrame:
    import json

    return ctx.products.find("template", band=band, overlapping=np.asarray(json.loads(footprint), float)) \
        .sort_values("tile_id")


class DifferenceStep(Step):
    """calexp - template, DIASources, association (see the module docstring)."""

    name = "difference"
    requires = ("template",)
    Config = DifferenceStepConfig
    ordered = True

    def units(self, ctx: RunContext) -> list[Unit]:
        out = []
        templates = ctx.products.find("template")
        for r in _calexps(ctx.store).itertuples():
            tpl = _templates_over(ctx, r.band, r.footprint) if len(templates) else templates
            out.append(Unit(self.name, f"exposure:{int(r.exposure_id)}",
                            inputs={"calexp": r.sha256, "templates": sorted(tpl["sha256"].tolist())},
                            payload={"exposure_id": int(r.exposure_id), "visit": int(r.visit),
                                     "detector": int(r.detector), "band": r.band, "mjd": float(r.mjd_mid),
                                     "calexp": r.path, "templates": tpl["path"].tolist()},
                            visits=(int(r.visit),), bands=(r.band,), order=(float(r.mjd_mid), int(r.exposure_id))))
        return out

    def run(self, unit: Unit, shared, products):
        from archive.errors import ArchiveError
        from archive.process.diffim.alard_lupton import subtract
        from archive.process.diffim.detection import detect_dia_sources
        from archive.process.diffim.template import join_templates
        from archive.process.warp import in_njy

        cfg = self.config
        p = unit.payload
        if not p["templates"]:
            raise ArchiveError("no template covers this exposure (run the template step, or build templates "
                               "from more epochs of this field and band)")
        science = in_njy(products.read(p["calexp"]))
        joined = join_templates(science, [products.read(t) for t in p["templates"]],
                                fractions=[_own_share(products.path(t), p["exposure_id"]) for t in p["templates"]])
        template = joined.exposure
        if template.info.extras["template"]["coverage"] == 0:
            raise ArchiveError("no template covers this exposure")
        cov = None if joined.fraction is None else joined.fraction * science.variance
        if cfg.method == "zogy":
            from archive.process.diffim.zogy import zogy_difference

            res = zogy_difference(science, template, covariance=cov)
        else:
            res = subtract(science, template, cfg.alard_lupton, covariance=cov)
        src = detect_dia_sources(res.difference, res.score, science, template, cfg.detection)
        written = products.write(ProductRef("diff", p["band"], p["exposure_id"]), res.difference)
        cover = template.info.extras["template"]["coverage"]
        note = f"{len(src)} DIASources" + (f"; template covers {cover:.0%}" if cover < 0.999 else "")
        return DifferenceOutput(written, src, note)

    def record(self, ctx: RunContext, unit: Unit, result: DifferenceOutput, tx) -> Recorded:
        from archive.catalog.dia_ingest import ingest_dia_sources
        from archive.catalog.validate import conform
        from archive.pipeline.single_epoch import _InTransaction, replace_products

        p = unit.payload
        old = replace_products(tx, p["exposure_id"], ("diff",))
        prov = self.provenance([p["calexp"], *p["templates"]])
        tx.append("provenance", conform(ctx.store.table("provenance"), pd.DataFrame([prov])))
        tx.append("image_product", conform(ctx.store.table("image_product"),
                                           pd.DataFrame([result.written.row(int(new_ids(1)[0]), prov["provenance_id"])])))
        src = result.sources
        src = src[np.isfinite(src["ra"]) & np.isfinite(src["dec"]) & np.isfinite(src["psf_flux"])]
        if len(src):
            rows = src.copy()
            rows["dia_source_id"] = new_ids(len(rows))
            rows["exposure_id"], rows["visit"], rows["detector"] = p["exposure_id"], p["visit"], p["detector"]
            rows["band"], rows["mjd"] = p["band"], p["mjd"]
            ingest_dia_sources(_InTransaction(ctx.store, tx), rows,
                               AssociationConfig(radius_arcsec=self.config.association_radius_arcsec),
                               replace=True, where=f"difference of exposure {p['exposure_id']}")
        keep = {result.written.rel}
        return Recorded(note=result.note, remove=[o for o in old if o not in keep],
                        provenance_id=prov["provenance_id"])

    def discard(self, ctx, unit, result) -> None:
        if getattr(result, "written", None) is not None:
            ctx.products.remove(result.written.rel)


# -- forced photometry at DIAObject positions -------------------------------------------------------
@dataclasses.dataclass
class ForcedStepConfig:
    forced: ForcedConfig = dataclasses.field(default_factory=ForcedConfig)


def _own_share(path, exposure_id: int):
    """The share of a template's weight carried by exposure ``exposure_id`` per template pixel
    (:func:`~archive.process.diffim.template.input_fraction`), or None when it is not an input."""
    from astropy.io import fits

    from archive.process.diffim.template import input_fraction

    with fits.open(path, memmap=False) as hdul:
        if "INPUTS" not in hdul or "INPUT_MAP" not in hdul:
            return None
        ids = np.asarray(hdul["INPUTS"].data["exposure_id"], np.int64)
        if int(exposure_id) not in set(ids.tolist()):
            return None
        return input_fraction(hdul["INPUT_MAP"].data, hdul["INPUTS"].data["weight"],
                              int(np.nonzero(ids == int(exposure_id))[0][0]))


def _positions_digest(objs: pd.DataFrame) -> str:
    """A digest of the objects' positions (degrees, rounded to 1e-8), independent of their ids:
    ids are drawn anew by each run, positions follow from the data, so a run resumed after a
    kill finds the same inputs as an uninterrupted one."""
    import hashlib

    pos = np.round(objs[["ra", "dec"]].to_numpy(float), 8)
    pos = pos[np.lexsort((pos[:, 1], pos[:, 0]))] if len(pos) else pos.reshape(0, 2)
    return hashlib.sha256(np.ascontiguousarray(pos).tobytes()).hexdigest()


class ForcedStep(Step):
    """PSF fluxes at every DIAObject on every exposure with a difference image."""

    name = "forced"
    requires = ("difference",)
    Config = ForcedStepConfig

    def units(self, ctx: RunContext) -> list[Unit]:
        import json

        diffs = ctx.store.sql("SELECT d.exposure_id, d.path AS diff, d.sha256 AS diff_sha, c.path AS calexp, "
                              "e.visit, e.detector, e.band, e.mjd_mid FROM image_product d "
                              "JOIN image_product c ON c.exposure_id = d.exposure_id AND c.kind = 'calexp' "
                              "JOIN exposure e ON e.exposure_id = d.exposure_id WHERE d.kind = 'diff'")
        if diffs.empty:
            return []
        foot = ctx.store.sql("SELECT exposure_id, footprint FROM image_product WHERE kind = 'diff'")
        foot = dict(zip(foot["exposure_id"].astype("int64"), foot["footprint"]))
        out = []
        from archive.sky.regions import Polygon

        for r in diffs.itertuples():
            corners = np.asarray(json.loads(foot[int(r.exposure_id)]), float)
            objs = ctx.store.query_region("dia_object", Polygon(corners[:, 0], corners[:, 1]),
                                          ["dia_object_id", "ra", "dec"], current_only=True)
            objs = objs.sort_values("dia_object_id")
            out.append(Unit(self.name, f"exposure:{int(r.exposure_id)}",
                            inputs={"diff": r.diff_sha, "objects": _positions_digest(objs)},
                            payload={"exposure_id": int(r.exposure_id), "visit": int(r.visit),
                                     "detector": int(r.detector), "band": r.band, "mjd": float(r.mjd_mid),
                                     "diff": r.diff, "calexp": r.calexp,
                                     "objects": objs[["dia_object_id", "ra", "dec"]].to_dict("list")},
                            visits=(int(r.visit),), bands=(r.band,), order=(float(r.mjd_mid),)))
        return out

    def run(self, unit: Unit, shared, products) -> pd.DataFrame:
        from archive.process.forced import forced_at_sky
        from archive.process.warp import in_njy

        p = unit.payload
        objs = pd.DataFrame(p["objects"])
        if objs.empty:
            return objs
        diff = products.read(p["diff"])
        science = in_njy(products.read(p["calexp"]))
        cfg = self.config.forced
        d = forced_at_sky(diff, objs["ra"].to_numpy(float), objs["dec"].to_numpy(float), cfg)
        s = forced_at_sky(science, objs["ra"].to_numpy(float), objs["dec"].to_numpy(float), cfg)
        return pd.DataFrame({"dia_object_id": objs["dia_object_id"].astype("int64"), "ra": objs["ra"],
                             "dec": objs["dec"], "x": d["x"], "y": d["y"], "psf_flux": d["psf_flux"],
                             "psf_flux_err": d["psf_flux_err"], "science_flux": s["psf_flux"],
                             "science_flux_err": s["psf_flux_err"],
                             "flags": d["flags"].to_numpy(np.int64) | s["flags"].to_numpy(np.int64)})

    def record(self, ctx: RunContext, unit: Unit, result: pd.DataFrame, tx) -> Recorded:
        from archive.catalog.dia_ingest import ingest_forced_sources
        from archive.pipeline.single_epoch import _InTransaction
        from archive.process.flags import FLAG_OFF_IMAGE

        p = unit.payload
        if result.empty:
            return Recorded(note="no DIAObject on the exposure")
        done = tx.select_in("dia_forced_source", "exposure_id", [p["exposure_id"]])
        rows = result[~result["dia_object_id"].isin(set(done["dia_object_id"].astype("int64")))]
        rows = rows[((rows["flags"].to_numpy(np.int64) & FLAG_OFF_IMAGE) == 0) & np.isfinite(rows["psf_flux"])]
        if rows.empty:
            return Recorded(note="nothing new to measure")
        rows = rows.copy()
        rows["dia_forced_source_id"] = new_ids(len(rows))
        rows["exposure_id"], rows["visit"], rows["detector"] = p["exposure_id"], p["visit"], p["detector"]
        rows["band"], rows["mjd"] = p["band"], p["mjd"]
        n = ingest_forced_sources(_InTransaction(ctx.store, tx), rows, where=f"forced photometry of {p['exposure_id']}")
        return Recorded(note=f"{n} forced sources")
