"""Single-epoch processing as pipeline steps: registered inputs -> calexps, sources, matched sources.

Four steps, run by :class:`archive.pipeline.runner.Runner` in this order:

``calexp`` (one unit per exposure)
    A raw frame goes through ISR with the master calibrations of its detector
    and band (:mod:`archive.pipeline.inputs`); another pipeline's calibrated
    IMAGE/MASK/VARIANCE exposure skips ISR.  Then
    :func:`archive.process.single_frame.process_exposure`.  The worker writes
    the calexp (FITS) and its source catalog (``src``, Parquet); the driver
    records the ``exposure`` row (processed or rejected, with its reason), the
    ``image_product`` rows of both files and the ``provenance`` row.
``epoch_quality`` (one unit per processed exposure)
    Each exposure is judged against the other exposures of its band in the
    archive (:func:`archive.process.epoch_quality.check_epochs`: clouds, bad
    focus); a rejected exposure gets its reason and flags, and its calexp and
    ``src`` are removed.
``astrometry`` (one unit per field: processed exposures whose centres lie within one
    detector diagonal of each other, at least ``min_epochs``)
    The epochs of a field are refined jointly
    (:mod:`archive.process.astrometry_relative`); the refined calexp and
    ``src`` are written under new names (``_wcs<hash>``) and replace the
    registered ones.
``sources`` (one unit per processed exposure, recorded in time order)
    The ``src`` rows go into ``source``, matched across epochs into
    ``matched_source`` (LAST's matched sources).

Exposure ids are ``visit * 1000 + detector`` (:func:`archive.image.obsheader.exposure_identity`
gives visit and detector: the ``VISIT`` card, else ``EXPNUM``/``EXPID``/``OBSID``,
else the mid-exposure time).  An exposure processed without any photometric
calibration (no reference catalog, no header zero point) is recorded as
processed with its fluxes null, its sources flagged ``NOT_CALIBRATED``, and
on the exposure row a null zero point, the ``NO_PHOTOCAL`` quality bit and
the reason.

:func:`process_raws` (``archive process``) registers files and runs the four
steps on them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from archive.catalog.ids import new_ids
from archive.errors import ArchiveError, NotFoundError
from archive.image.exposure import Exposure
from archive.pipeline.inputs import (build_masters, calibration_frames, describe_file, master_inputs,
                                     register_inputs, register_refcat, science_inputs, current_refcat)
from archive.pipeline.products import ProductRef, WrittenProduct, exposure_id_of
from archive.pipeline.steps import Recorded, RunContext, Step, Unit
from archive.process.astrometry_relative import RelativeAstrometryConfig
from archive.process.epoch_quality import EpochQualityConfig
from archive.process.single_frame import SingleFrameConfig
from archive.sky.healpix import radec_to_healpix29, radec_to_vec

log = logging.getLogger(__name__)


#: Bits of ``exposure.quality_flags`` (stable: append new names at the end).
QUALITY_BITS = {name: i for i, name in enumerate([
    "WRONG_SHAPE", "EMPTY", "CONSTANT", "MANY_NODATA", "HIGH_BACKGROUND", "HISTOGRAM_ANOMALY",
    "MANY_SATURATED", "STUCK_VALUES", "BAD_PSF", "DOUBLE_PSF", "CHECK_ERROR", "STEP_FAILED",
    "LOW_TRANSPARENCY", "POOR_SEEING", "NO_PHOTOCAL"])}


def quality_bits(flags: list[str], rejected: bool) -> int:
    """Bit mask of quality flag names; a rejection by a later step (PSF, astrometry,
    photometry) without a quality flag sets STEP_FAILED."""
    bits = 0
    for name in flags:
        bits |= 1 << QUALITY_BITS.get(name, QUALITY_BITS["CHECK_ERROR"])
    if rejected and not bits:
        bits = 1 << QUALITY_BITS["STEP_FAILED"]
    return bits


def _quote(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


# -- calexp ---------------------------------------------------------------------------
@dataclass
class CalexpConfig:
    """single_frame: every single-frame processing setting (ISR to photometric calibration)."""

    single_frame: SingleFrameConfig = field(default_factory=SingleFrameConfig)


@dataclass
class CalexpResult:
    """What a worker returns for one exposure (picklable; the images stay on disk)."""

    info: object
    rejected: bool
    reason: str
    quality_flags: int
    sky_level: float
    calibration: str
    calibration_note: str
    wcs: object
    shape: tuple[int, int]
    measured: tuple[float, float, float] = (np.nan, np.nan, np.nan)
    calexp: WrittenProduct | None = None
    src: WrittenProduct | None = None
    n_sources: int = 0


def measured(calexp: Exposure | None, info) -> tuple[float, float, float]:
    """(seeing in arcsec at the centre, zero point = AB mag of 1 count/s, 5-sigma point-source
    limiting magnitude) of a calexp; NaN where it has no PSF or calibration."""
    seeing = zp = lim = np.nan
    if calexp is None:
        return seeing, zp, lim
    ny, nx = calexp.image.shape
    scale = calexp.pixel_scale()
    if calexp.psf is not None:
        seeing = float(calexp.psf.fwhm((nx - 1) / 2.0, (ny - 1) / 2.0)) * scale
    if calexp.photo_calib is not None and info.exp_time > 0:
        zp = float(calexp.photo_calib.zero_point) + 2.5 * np.log10(info.exp_time)
        if calexp.psf is not None:  # the PSF model's own noise-equivalent area, median variance
            from archive.process.quality import limiting_magnitude

            lim = limiting_magnitude(float(calexp.photo_calib.zero_point), float(np.nanmedian(calexp.variance)),
                                     calexp.psf, x=(nx - 1) / 2.0, y=(ny - 1) / 2.0)
    return seeing, zp, lim


class CalexpStep(Step):
    """Raw frame or calibrated exposure -> calexp + source catalog (see the module docstring)."""

    name = "calexp"
    Config = CalexpConfig

    def units(self, ctx: RunContext) -> list[Unit]:
        sci = science_inputs(ctx.store)
        calib = calibration_frames(ctx.store) if (sci["kind"] == "raw").any() else None
        out = []
        for r in sci.itertuples():
            raw = r.kind == "raw"
            masters = master_inputs(calib, r.detector, r.band) if raw else {}
            out.append(Unit(self.name, f"exposure:{int(r.exposure_id)}",
                            inputs={"file": r.sha256, "masters": masters, "refcat": ctx.refcat_sha256},
                            payload={"path": r.path, "calibrated": not raw, "exposure_id": int(r.exposure_id),
                                     "detector": int(r.detector), "band": r.band},
                            visits=(int(r.visit),), bands=(r.band,), order=(float(r.mjd or 0.0),)))
        return out

    def prepare(self, ctx: RunContext, units: list[Unit]):
        raw = {(u.payload["detector"], u.payload["band"]) for u in units if not u.payload["calibrated"]}
        masters = {}
        if raw:
            masters = build_masters(calibration_frames(ctx.store), raw, ctx.products.root)
            if not any(p for m in masters.values() for p in m.values()):
                log.warning("raw frames processed without calibration frames (no bias, dark or flat)")
        return {"masters": masters, "refcat": ctx.refcat()}

    def run(self, unit: Unit, shared, products) -> CalexpResult:
        from astropy.stats import sigma_clipped_stats

        from archive.image.foreign import read_calibrated_mef
        from archive.image.raw import read_raw
        from archive.process import single_frame

        cfg = self.config.single_frame
        p = unit.payload
        if p["calibrated"]:  # another pipeline's calibrated exposure: no ISR
            exp = read_calibrated_mef(p["path"])
        else:
            raw = read_raw(p["path"])
            m = shared["masters"].get((p["detector"], p["band"]), {})
            load = {k: (Exposure.read(v) if v else None) for k, v in m.items()}
            exp = single_frame.isr_exposure(raw, load.get("bias"), load.get("dark"), load.get("flat"), cfg.isr)
        info = exp.info
        good = np.isfinite(exp.image) & (exp.mask == 0)
        sky = float(sigma_clipped_stats(exp.image[good], sigma=3.0, maxiters=5)[1]) if good.any() else np.nan
        res = single_frame.process_exposure(exp, shared["refcat"], cfg)
        out = CalexpResult(info=info, rejected=res.rejected, reason=res.reason,
                           quality_flags=quality_bits(list(res.quality.flags), res.rejected), sky_level=sky,
                           calibration=res.calibration, calibration_note=res.calibration_note,
                           wcs=exp.wcs, shape=exp.shape)
        if not res.rejected and res.calexp is not None:
            eid = p["exposure_id"]
            out.calexp = products.write(ProductRef("calexp", info.band, eid), res.calexp)
            out.src = products.write_table(ProductRef("src", info.band, eid), res.sources, res.calexp)
            out.wcs, out.shape = res.calexp.wcs, res.calexp.shape
            out.measured = measured(res.calexp, info)
            out.n_sources = len(res.sources)
        return out

    def record(self, ctx: RunContext, unit: Unit, result: CalexpResult, tx) -> Recorded:
        from archive.catalog.validate import conform

        eid = unit.payload["exposure_id"]
        prov = self.provenance([unit.payload["path"], *sorted(sum(unit.inputs["masters"].values(), []))])
        old = replace_products(tx, eid, ("calexp", "src"))
        tx.delete("exposure", "exposure_id", [eid])
        rows = {"provenance": [prov], "exposure": [exposure_row(result, eid, unit.payload["path"])]}
        made = [w for w in (result.calexp, result.src) if w is not None]
        rows["image_product"] = [w.row(pid, prov["provenance_id"]) for w, pid in zip(made, new_ids(len(made)))]
        for name, r in rows.items():
            if r:
                tx.append(name, conform(ctx.store.table(name), pd.DataFrame(r), unit.payload["path"]))
        note = ""
        if result.rejected:
            note = f"rejected: {result.reason}"
        elif result.calibration == "none":
            note = f"uncalibrated: {result.calibration_note}"
        keep = {w.rel for w in made}
        return Recorded(note=note, remove=[p for p in old if p not in keep], provenance_id=prov["provenance_id"])

    def discard(self, ctx: RunContext, unit: Unit, result) -> None:
        registered = set(ctx.store.sql(
            f"SELECT path FROM image_product WHERE exposure_id = {unit.payload['exposure_id']}")["path"])
        for w in (result.calexp, result.src):
            if w is not None and w.rel not in registered:  # another writer's file stays
                ctx.products.remove(w.rel)


def replace_products(tx, exposure_id: int, kinds: tuple[str, ...]) -> list[str]:
    """Delete the ``image_product`` rows of ``kinds`` of an exposure in ``tx``; their paths."""
    old = tx.select_in("image_product", "exposure_id", [exposure_id])
    old = old[old["kind"].isin(kinds)]
    if len(old):
        tx.delete("image_product", "product_id", old["product_id"].to_numpy(np.int64))
    return old["path"].tolist()


def exposure_row(result: CalexpResult, exposure_id: int, raw_path: str) -> dict:
    """The ``exposure`` row: pointing of the detector centre, seeing, sky, zero point, depth."""
    info = result.info
    ny, nx = result.shape
    if result.calexp is not None:
        ra, dec = result.calexp.ra, result.calexp.dec
    else:
        ra, dec = (float(v) for v in result.wcs.all_pix2world([[(nx - 1) / 2.0, (ny - 1) / 2.0]], 0)[0])
        ra %= 360.0
    seeing, zp, lim = result.measured
    sky = result.sky_level if result.calexp is not None else np.nan
    flags, reason = (int(result.quality_flags), result.reason) if result.rejected else (0, "")
    if not result.rejected and result.calibration == "none":
        # processed, but nothing in nJy: say so (zero point and depth null, flag, reason)
        zp = lim = None
        flags = 1 << QUALITY_BITS["NO_PHOTOCAL"]
        reason = result.calibration_note or "not photometrically calibrated"
    pc = result.wcs.wcs.get_pc()
    return {
        "exposure_id": exposure_id, "visit": int(info.visit), "detector": int(info.detector),
        "band": info.band, "mjd_mid": float(info.mjd), "exp_time": float(info.exp_time),
        "airmass": float(info.airmass), "ra": ra, "dec": dec,
        "healpix29": int(radec_to_healpix29(np.array([ra]), np.array([dec]))[0]),
        "rot_angle": float(np.degrees(np.arctan2(pc[0, 1], pc[1, 1]))),
        "seeing": seeing, "sky_level": sky, "zero_point": zp, "lim_mag": lim,
        "status": "rejected" if result.rejected else "processed",
        "quality_flags": flags, "quality_reason": reason or None, "raw_path": raw_path,
    }


# -- epoch quality ----------------------------------------------------------------------
@dataclass
class EpochQualityStepConfig:
    """epoch_quality: thresholds of :func:`archive.process.epoch_quality.check_epochs`."""

    epoch_quality: EpochQualityConfig = field(default_factory=EpochQualityConfig)


def _rounded(value, digits: int = 6):
    """A float for a unit's inputs: rounded (None for null or NaN)."""
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


_EPOCH_BITS = (1 << QUALITY_BITS["LOW_TRANSPARENCY"]) | (1 << QUALITY_BITS["POOR_SEEING"])


class EpochQualityStep(Step):
    """Reject exposures whose zero point or seeing is far off the others of their band."""

    name = "epoch_quality"
    requires = ("calexp",)
    Config = EpochQualityStepConfig
    in_driver = True

    def _judged(self, ctx: RunContext) -> pd.DataFrame:
        """Processed exposures, and those this step rejected (they stay in the comparison)."""
        return ctx.store.sql(
            "SELECT exposure_id, visit, band, mjd_mid, seeing, zero_point, status, quality_flags FROM exposure "
            f"WHERE status = 'processed' OR (status = 'rejected' AND (quality_flags & {_EPOCH_BITS}) <> 0) "
            "ORDER BY exposure_id")

    def units(self, ctx: RunContext) -> list[Unit]:
        rows = self._judged(ctx)
        return [Unit(self.name, f"exposure:{int(r.exposure_id)}",
                     # rounded: the last bits may differ between worker environments (BLAS threads)
                     inputs={"seeing": _rounded(r.seeing), "zero_point": _rounded(r.zero_point)},
                     payload={"exposure_id": int(r.exposure_id)}, visits=(int(r.visit),), bands=(r.band,),
                     order=(float(r.mjd_mid),))
                for r in rows.itertuples()]

    def prepare(self, ctx: RunContext, units: list[Unit]):
        from archive.process.epoch_quality import check_epochs

        rows = self._judged(ctx).set_index("exposure_id")
        verdict = check_epochs(rows[["band", "seeing", "zero_point"]], self.config.epoch_quality)
        return {int(e): (list(f), r) for e, f, r in zip(verdict.index, verdict["flags"], verdict["reason"])}

    def run(self, unit: Unit, shared, products):
        return shared[unit.payload["exposure_id"]]

    def record(self, ctx: RunContext, unit: Unit, result, tx) -> Recorded:
        from archive.catalog.validate import conform

        flags, reason = result
        if not reason:
            return Recorded()
        eid = unit.payload["exposure_id"]
        row = tx.select_in("exposure", "exposure_id", [eid])
        if row.empty or row["status"].iloc[0] == "rejected":
            return Recorded(note=f"rejected: {reason}")
        row = row.copy()
        row["status"], row["quality_reason"] = "rejected", reason
        row["quality_flags"] = quality_bits(flags, True)
        tx.delete("exposure", "exposure_id", [eid])
        tx.append("exposure", conform(ctx.store.table("exposure"), row, f"exposure {eid}"))
        old = replace_products(tx, eid, ("calexp", "src"))
        log.warning("exposure %s rejected: %s", eid, reason)
        return Recorded(note=f"rejected: {reason}", remove=old)


# -- joint astrometry -----------------------------------------------------------------------
@dataclass
class AstrometryStepConfig:
    """refine: run the joint relative astrometry at all; relative_astrometry: its settings."""

    refine: bool = True
    relative_astrometry: RelativeAstrometryConfig = field(default_factory=RelativeAstrometryConfig)


@dataclass
class AstrometryResult:
    """Per exposure: the new calexp and src files, and the rms (mas) before and after."""

    refined: dict = field(default_factory=dict)  # exposure_id -> (calexp, src, before, after)
    note: str = ""


class AstrometryStep(Step):
    """Refine the WCS of the processed exposures of each field against each other."""

    name = "astrometry"
    requires = ("epoch_quality",)
    Config = AstrometryStepConfig

    def units(self, ctx: RunContext) -> list[Unit]:
        cfg = self.config
        if not cfg.refine:
            return []
        exp = ctx.store.sql("SELECT e.exposure_id, e.visit, e.detector, e.band, e.mjd_mid, p.path, p.ra, p.dec, "
                            "p.footprint FROM exposure e JOIN image_product p ON p.exposure_id = e.exposure_id "
                            "WHERE e.status = 'processed' AND p.kind = 'calexp' ORDER BY e.exposure_id")
        if len(exp) < cfg.relative_astrometry.min_epochs:
            return []
        src = ctx.store.sql("SELECT exposure_id, path FROM image_product WHERE kind = 'src'")
        src_path = dict(zip(src["exposure_id"].astype("int64"), src["path"]))
        calexp_units = ctx.store.sql("SELECT unit_key, inputs_hash, config_hash FROM pipeline_unit "
                                     "WHERE step = 'calexp' AND status = 'done'")
        made = {k: f"{i}:{c}" for k, i, c in zip(calexp_units["unit_key"], calexp_units["inputs_hash"],
                                                 calexp_units["config_hash"])}
        out = []
        for group in fields_of(exp):
            members = exp.iloc[group]
            if len(members) < cfg.relative_astrometry.min_epochs:
                continue
            eids = [int(e) for e in members["exposure_id"]]
            out.append(Unit(self.name, f"field:{eids[0]}",
                            inputs={"exposures": [[e, made.get(f"exposure:{e}", "")] for e in eids],
                                    "refcat": ctx.refcat_sha256},
                            payload={"exposures": eids, "calexp": members["path"].tolist(),
                                     "src": [src_path.get(e) for e in eids],
                                     "detectors": [int(d) for d in members["detector"]],
                                     "bands": members["band"].tolist()},
                            visits=tuple(int(v) for v in members["visit"]), bands=tuple(set(members["band"])),
                            order=(eids[0],)))
        return out

    def prepare(self, ctx: RunContext, units: list[Unit]):
        return {"refcat": ctx.refcat()}

    def run(self, unit: Unit, shared, products) -> AstrometryResult:
        from archive.errors import ValidationError
        from archive.process.astrometry_relative import refine_epochs
        from archive.process.characterize import add_sky_coordinates

        p = unit.payload
        calexps = [products.read(c) for c in p["calexp"]]
        sources = [products.read_table(s) for s in p["src"]]
        try:
            res = refine_epochs(sources, [c.wcs for c in calexps], [c.shape for c in calexps],
                                refcat=shared["refcat"], config=self.config.relative_astrometry,
                                detectors=p["detectors"])
        except ValidationError as exc:
            return AstrometryResult(note=f"not refined: {exc}")
        tag = "wcs" + unit.inputs_hash[:8]
        out = AstrometryResult()
        for k, eid in enumerate(p["exposures"]):
            if not res.refined[k]:
                continue
            calexp = calexps[k]
            calexp.wcs = res.wcs[k]
            band = p["bands"][k]
            wc = products.write(ProductRef("calexp", band, eid, tag=tag), calexp)
            ws = products.write_table(ProductRef("src", band, eid, tag=tag),
                                      add_sky_coordinates(sources[k].copy(), res.wcs[k]), calexp)
            out.refined[eid] = (wc, ws, float(res.rms_before_mas[k]), float(res.rms_after_mas[k]))
        return out

    def record(self, ctx: RunContext, unit: Unit, result: AstrometryResult, tx) -> Recorded:
        from archive.catalog.validate import conform

        if not result.refined:
            return Recorded(note=result.note)
        prov = self.provenance(unit.payload["calexp"])
        rows, remove = [], []
        for eid, (wc, ws, _, _) in result.refined.items():
            remove += replace_products(tx, eid, ("calexp", "src"))
            rows += [w.row(pid, prov["provenance_id"]) for w, pid in zip((wc, ws), new_ids(2))]
            # the exposure's pointing follows the refined WCS
            exp = tx.select_in("exposure", "exposure_id", [eid]).copy()
            exp["ra"], exp["dec"] = wc.ra, wc.dec
            exp = exp.drop(columns=["healpix29"])
            tx.delete("exposure", "exposure_id", [eid])
            tx.append("exposure", conform(ctx.store.table("exposure"), exp, f"exposure {eid}"))
        tx.append("provenance", conform(ctx.store.table("provenance"), pd.DataFrame([prov])))
        tx.append("image_product", conform(ctx.store.table("image_product"), pd.DataFrame(rows)))
        keep = {w.rel for v in result.refined.values() for w in v[:2]}
        rms = ", ".join(f"{e}: {b:.1f}->{a:.1f} mas" for e, (_, _, b, a) in result.refined.items())
        return Recorded(note=f"refined {rms}", remove=[p for p in remove if p not in keep],
                        provenance_id=prov["provenance_id"])

    def discard(self, ctx: RunContext, unit: Unit, result) -> None:
        for wc, ws, _, _ in getattr(result, "refined", {}).values():
            ctx.products.remove(wc.rel)
            ctx.products.remove(ws.rel)


def fields_of(exposures: pd.DataFrame) -> list[list[int]]:
    """Groups (row positions) of overlapping exposures: friends-of-friends of their centres
    (``ra``, ``dec``) linked within one detector diagonal (from each ``footprint``)."""
    import json

    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    from archive.sky.healpix import angular_separation_deg

    n = len(exposures)
    corners = [np.asarray(json.loads(f), float) for f in exposures["footprint"]]
    diag = max(float(angular_separation_deg(c[0, 0], c[0, 1], c[2, 0], c[2, 1])) for c in corners)
    xyz = radec_to_vec(exposures["ra"].to_numpy(float), exposures["dec"].to_numpy(float))
    pairs = cKDTree(xyz).query_pairs(2 * np.sin(np.radians(diag) / 2), output_type="ndarray")
    _, lab = connected_components(coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)),
                                  directed=False)
    return [list(np.flatnonzero(lab == k)) for k in np.unique(lab)]


# -- sources and matched sources --------------------------------------------------------------
@dataclass
class SourcesConfig:
    """match_radius_arcsec: matching of sources across epochs into ``matched_source``."""

    match_radius_arcsec: float = field(default=1.0, metadata={"min": 0.01, "max": 60.0})


class SourcesStep(Step):
    """Store each processed exposure's sources, matched across epochs (in time order)."""

    name = "sources"
    requires = ("astrometry",)
    Config = SourcesConfig
    ordered = True
    in_driver = True

    def units(self, ctx: RunContext) -> list[Unit]:
        rows = ctx.store.sql("SELECT e.exposure_id, e.visit, e.detector, e.band, e.mjd_mid, p.path, p.sha256 "
                             "FROM exposure e JOIN image_product p ON p.exposure_id = e.exposure_id "
                             "WHERE e.status = 'processed' AND p.kind = 'src'")
        return [Unit(self.name, f"exposure:{int(r.exposure_id)}", inputs={"src": r.sha256},
                     payload={"exposure_id": int(r.exposure_id), "src": r.path, "visit": int(r.visit),
                              "detector": int(r.detector), "band": r.band, "mjd": float(r.mjd_mid)},
                     visits=(int(r.visit),), bands=(r.band,), order=(float(r.mjd_mid), int(r.exposure_id)))
                for r in rows.itertuples()]

    def run(self, unit: Unit, shared, products) -> pd.DataFrame:
        return products.read_table(unit.payload["src"])

    def record(self, ctx: RunContext, unit: Unit, result: pd.DataFrame, tx) -> Recorded:
        from archive.catalog.matched_ingest import ingest_sources
        from archive.catalog.validate import conform

        p = unit.payload
        src = result[[c for c in result.columns if c in ctx.store.table("source")]].copy()
        src = src[np.isfinite(src["ra"].to_numpy(float)) & np.isfinite(src["dec"].to_numpy(float))]
        src["source_id"] = new_ids(len(src))
        src["exposure_id"], src["visit"], src["detector"] = p["exposure_id"], p["visit"], p["detector"]
        src["band"], src["mjd"] = p["band"], p["mjd"]
        src["ra"] = src["ra"] % 360.0
        src = src.drop(columns=["healpix29", "matched_source_id"], errors="ignore")
        conform(ctx.store.table("source"), src, p["src"])  # refused here, naming the file
        if len(src):
            ingest_sources(_InTransaction(ctx.store, tx), src, radius_arcsec=self.config.match_radius_arcsec,
                           replace=True, where=p["src"])
        return Recorded(note=f"{len(src)} sources")


class _InTransaction:
    """``store`` seen through an open transaction: its ``transaction()`` joins ``tx``
    instead of opening a second one, and leaves commit or rollback to the owner of ``tx``.

    This lets :func:`archive.catalog.matched_ingest.ingest_sources` (which opens its own
    transaction) write an exposure's sources in the runner's transaction."""

    def __init__(self, store, tx) -> None:
        self._store, self._tx = store, tx

    def __getattr__(self, name):
        return getattr(self._store, name)

    def transaction(self, *args, **kwargs):
        return contextlib.nullcontext(self._tx)


def single_epoch_steps(config: ProcessConfig | None = None) -> list[Step]:
    """The four single-epoch steps configured from a :class:`ProcessConfig`."""
    cfg = config or ProcessConfig()
    return [CalexpStep(CalexpConfig(cfg.single_frame or SingleFrameConfig())),
            EpochQualityStep(EpochQualityStepConfig(cfg.epoch_quality or EpochQualityConfig())),
            AstrometryStep(AstrometryStepConfig(bool(cfg.refine_astrometry),
                                                cfg.relative_astrometry or RelativeAstrometryConfig())),
            SourcesStep(SourcesConfig(cfg.match_radius_arcsec))]


# -- archive process: register + run -------------------------------------------------------
@dataclass
class ProcessConfig:
    """Settings of :func:`process_raws` (``single_frame``: None = defaults)."""

    workers: int = 1
    match_radius_arcsec: float = 1.0
    refine_astrometry: bool = True
    relative_astrometry: RelativeAstrometryConfig | None = None
    epoch_quality: EpochQualityConfig | None = None
    single_frame: SingleFrameConfig | None = None
    progress: bool | None = None  # None: a bar only on a terminal


@dataclass
class RunReport:
    processed: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    n_sources: int = 0
    seconds: float = 0.0
    #: exposure id -> (rms before, after) in mas of its stars against the other epochs' mean,
    #: for the exposures whose WCS the joint relative astrometry refined
    refined: dict[int, tuple[float, float]] = field(default_factory=dict)
    #: processed exposures without photometric calibration (fluxes null): id -> reason
    uncalibrated: dict[int, str] = field(default_factory=dict)


def process_raws(store, raw_paths: list, calib_paths: list, refcat, products_root: os.PathLike,
                 config: ProcessConfig | None = None) -> RunReport:
    """Register raw frames (or calibrated exposures) and calibration frames, then run the
    single-epoch steps on them (see the module doc).

    Every file is checked before anything is registered or processed: a missing file, a
    file in ``raw_paths`` that is not a science frame, two inputs with one exposure id, or
    an id the archive holds from other contents is refused
    (:class:`~archive.errors.ArchiveError` naming the files).  Exposures already done are
    skipped (resumable); errors of one exposure are recorded as failed and do not stop the run.
    """
    from archive.pipeline.products import ProductStore
    from archive.pipeline.runner import LocalExecutor, Runner

    cfg = config or ProcessConfig()
    t0 = time.perf_counter()
    raws = [pathlib.Path(p) for p in raw_paths]
    for p in raws:
        if not p.is_file():
            raise NotFoundError(f"{p}: no such raw file")
    science = {}
    for p in raws:
        row = describe_file(p)
        if row["imagetyp"] != "OBJECT":
            raise ArchiveError(f"{p}: IMAGETYP is {row['imagetyp']}, expected a science (OBJECT) frame")
        science[row["exposure_id"]] = row
    register_inputs(store, [*raws, *calib_paths])
    if refcat is not None:
        refcat_path, sha = register_refcat(store, refcat, products_root)
    else:  # the reference catalog registered last, if any
        refcat_path, sha = current_refcat(store)
    ctx = RunContext(store, ProductStore(products_root, store), refcat_path, sha)
    runner = Runner(ctx, single_epoch_steps(cfg), LocalExecutor(cfg.workers), progress=cfg.progress)
    visits = sorted({int(r["visit"]) for r in science.values()})
    before = runner.states(runner.steps[0], [u for u in runner.steps[0].units(ctx)
                                             if u.payload["exposure_id"] in science])
    reports = runner.run(visits=visits)
    report = RunReport()
    report.skipped = sorted(int(k.split(":")[1]) for k, (s, _) in before.items() if s == "done")
    for step, rep in reports.items():
        for key, why in rep.failed.items():
            if key.startswith("exposure:"):
                report.failed[int(key.split(":")[1])] = why
    for res in reports["astrometry"].results.values():
        for eid, (_, _, b, a) in res.refined.items():
            report.refined[eid] = (b, a)
    report.n_sources = sum(len(r) for r in reports["sources"].results.values())
    exp = store.get("exposure", list(science), columns=["exposure_id", "status", "quality_reason"])
    done_now = {int(k.split(":")[1]) for k in reports["calexp"].done}
    for eid, status, why in zip(exp["exposure_id"].astype(int), exp["status"], exp["quality_reason"]):
        if eid not in done_now:
            continue
        if status == "rejected":
            report.rejected[eid] = why
        else:
            report.processed.append(eid)
            note = reports["calexp"].notes.get(f"exposure:{eid}", "")
            if note.startswith("uncalibrated: "):
                report.uncalibrated[eid] = note.removeprefix("uncalibrated: ")
    report.processed.sort()
    report.seconds = time.perf_counter() - t0
    return report
