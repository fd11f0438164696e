"""Multi-epoch image steps: warps onto sky tiles, coadds and templates (per tile and band).

``warp`` (one unit per processed exposure and tile it overlaps)
    The calexp, put in nJy (:func:`archive.process.warp.in_njy`), resampled onto the tile
    grid (:func:`archive.process.warp.warp_exposure`) over the box its pixels cover;
    registered as kind ``warp`` with its exposure and tile.  Uncalibrated exposures
    make no warp.
``coadd`` (one unit per tile and band)
    All the tile's warps of the band: PSF-matched copies are compared with a static-sky
    model to find artifacts (CLIPPED), backgrounds are matched, and the accepted pixels
    are combined (:mod:`archive.process.coadd`).  The FITS file holds the coadd
    (IMAGE, MASK, VARIANCE, PSF) plus ``N_IMAGE`` (accepted inputs per pixel),
    ``INPUT_MAP`` (bit i: input i used) and ``INPUTS`` (the inputs' exposure ids,
    weights, background offsets and clipped pixel counts).
``template`` (one unit per tile and band)
    The same combination over the inputs chosen by seeing and time
    (:func:`archive.process.coadd.select_inputs`), registered as kind ``template``:
    what difference imaging subtracts.

The skymap (:class:`archive.sky.tiles.SkyMap`) is part of the warp step's
configuration; coadds and templates are made on the grid their warps share.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
from astropy.io import fits

from archive.catalog.ids import new_ids
from archive.pipeline.products import ProductRef, WrittenProduct
from archive.pipeline.steps import Recorded, RunContext, Step, Unit
from archive.process.coadd import CoaddConfig, SelectConfig
from archive.process.warp import WarpConfig
from archive.sky.tiles import SkyMap


@dataclasses.dataclass
class SkyMapConfig:
    """The tiles: HEALPix order of their centres, pixel scale (arcsec) and overlap (arcsec)."""

    order: int = dataclasses.field(default=9, metadata={"min": 0, "max": 16})
    pixel_scale_arcsec: float = dataclasses.field(default=0.2, metadata={"min": 0.001})
    overlap_arcsec: float = dataclasses.field(default=10.0, metadata={"min": 0.0})

    def skymap(self) -> SkyMap:
        return SkyMap(self.order, self.pixel_scale_arcsec, self.overlap_arcsec)


@dataclasses.dataclass
class WarpStepConfig:
    skymap: SkyMapConfig = dataclasses.field(default_factory=SkyMapConfig)
    warp: WarpConfig = dataclasses.field(default_factory=WarpConfig)


def _processed_calexps(store) -> pd.DataFrame:
    return store.sql("SELECT e.exposure_id, e.visit, e.band, e.mjd_mid, e.seeing, p.path, p.sha256, p.footprint "
                     "FROM exposure e JOIN image_product p ON p.exposure_id = e.exposure_id "
                     "WHERE e.status = 'processed' AND p.kind = 'calexp' ORDER BY e.exposure_id")


def _replace_rows(tx, kind: str, exposure_id: int | None, tile_id: int, band: str) -> list[str]:
    """Delete the registered products of ``kind`` for (exposure, tile, band) in ``tx``; their paths."""
    rows = tx.select_in("image_product", "tile_id", [tile_id])
    rows = rows[(rows["kind"] == kind) & (rows["band"] == band)]
    if exposure_id is not None:
        rows = rows[rows["exposure_id"] == exposure_id]
    if len(rows):
        tx.delete("image_product", "product_id", rows["product_id"].to_numpy(np.int64))
    return rows["path"].tolist()


def _append(ctx: RunContext, tx, prov: dict, written: list[WrittenProduct]) -> None:
    from archive.catalog.validate import conform

    tx.append("provenance", conform(ctx.store.table("provenance"), pd.DataFrame([prov])))
    if written:
        rows = [w.row(pid, prov["provenance_id"]) for w, pid in zip(written, new_ids(len(written)))]
        tx.append("image_product", conform(ctx.store.table("image_product"), pd.DataFrame(rows)))


class WarpStep(Step):
    """Each processed calexp resampled onto every sky tile it overlaps."""

    name = "warp"
    requires = ("astrometry",)
    Config = WarpStepConfig

    def units(self, ctx: RunContext) -> list[Unit]:
        cfg = self.config
        sm = cfg.skymap.skymap()
        out = []
        for r in _processed_calexps(ctx.store).itertuples():
            for tid in sm.tiles_for(np.asarray(json.loads(r.footprint), float)):
                out.append(Unit(self.name, f"tile:{tid}:exposure:{int(r.exposure_id)}",
                                inputs={"calexp": r.sha256},
                                payload={"exposure_id": int(r.exposure_id), "tile": int(tid), "band": r.band,
                                         "calexp": r.path},
                                visits=(int(r.visit),), bands=(r.band,), order=(int(tid), int(r.exposure_id))))
        return out

    def run(self, unit: Unit, shared, products) -> WrittenProduct | None:
        from archive.errors import ValidationError
        from archive.process.warp import footprint_bbox, in_njy, warp_exposure

        cfg = self.config
        p = unit.payload
        tile = cfg.skymap.skymap().tile(p["tile"])
        try:  # warps are in nJy, so epochs of any zero point combine
            calexp = in_njy(products.read(p["calexp"]))
        except ValidationError:
            return None  # an uncalibrated exposure has no place in a coadd
        bbox = footprint_bbox(calexp, tile.wcs, tile.shape)
        if bbox is None:
            return None
        warp = warp_exposure(calexp, tile.wcs, tile.shape, bbox, cfg.warp)
        if not (warp.mask & (1 << warp.mask_planes["NO_DATA"]) == 0).any():
            return None  # the calexp only grazes the tile's margin
        return products.write(ProductRef("warp", p["band"], p["exposure_id"], p["tile"]), warp)

    def record(self, ctx: RunContext, unit: Unit, result, tx) -> Recorded:
        p = unit.payload
        old = _replace_rows(tx, "warp", p["exposure_id"], p["tile"], p["band"])
        prov = self.provenance([p["calexp"]])
        _append(ctx, tx, prov, [result] if result is not None else [])
        keep = {result.rel} if result is not None else set()
        return Recorded(note="" if result is not None else "no calibrated pixels on the tile",
                        remove=[o for o in old if o not in keep], provenance_id=prov["provenance_id"])

    def discard(self, ctx, unit, result) -> None:
        if result is not None:
            ctx.products.remove(result.rel)


# -- coadds and templates ------------------------------------------------------------------
@dataclasses.dataclass
class CoaddStepConfig:
    coadd: CoaddConfig = dataclasses.field(default_factory=CoaddConfig)


@dataclasses.dataclass
class TemplateStepConfig:
    """select: which warps; coadd: how they combine; homogenize_psf: combine the warps
    PSF-matched to a common width (the widest input's, +5%) rather than as they are, so that
    the template's PSF does not jump where the inputs' coverage changes (a jump no smooth
    matching kernel follows: bright constant stars then leave residuals in the differences)."""

    select: SelectConfig = dataclasses.field(default_factory=SelectConfig)
    coadd: CoaddConfig = dataclasses.field(default_factory=CoaddConfig)
    homogenize_psf: bool = True


@dataclasses.dataclass
class CoaddOutput:
    """A coadd (or template) written, its inputs and what artifact rejection removed."""

    written: WrittenProduct | None
    inputs: list[int]
    n_clipped: list[int]
    note: str = ""


class CoaddStep(Step):
    """All warps of a tile and band combined, artifacts rejected (kind ``coadd``)."""

    name = "coadd"
    requires = ("warp",)
    Config = CoaddStepConfig
    kind = "coadd"

    def _warps(self, ctx: RunContext) -> pd.DataFrame:
        rows = ctx.store.sql("SELECT w.exposure_id, w.tile_id, w.band, w.path, w.sha256, e.visit, e.seeing, "
                             "e.mjd_mid FROM image_product w JOIN exposure e ON e.exposure_id = w.exposure_id "
                             "WHERE w.kind = 'warp' AND e.status = 'processed' ORDER BY w.tile_id, w.exposure_id")
        return rows

    def _select(self, group: pd.DataFrame) -> pd.DataFrame:
        return group

    def units(self, ctx: RunContext) -> list[Unit]:
        out = []
        for (tid, band), group in self._warps(ctx).groupby(["tile_id", "band"], sort=True):
            chosen = self._select(group)
            if chosen.empty:
                continue
            out.append(Unit(self.name, f"tile:{int(tid)}:{band}",
                            inputs={"warps": [[int(e), s] for e, s in zip(chosen["exposure_id"], chosen["sha256"])]},
                            payload={"tile": int(tid), "band": band, "warps": chosen["path"].tolist(),
                                     "exposures": [int(e) for e in chosen["exposure_id"]]},
                            visits=tuple(int(v) for v in chosen["visit"]), bands=(band,), order=(int(tid), band)))
        return out

    def run(self, unit: Unit, shared, products) -> CoaddOutput:
        import math

        from archive.image.psf import FWHM_PER_SIGMA
        from archive.process.coadd import combine, find_artifacts, target_fwhm
        from archive.process.warp import psf_match

        cfg = self.config.coadd
        p = unit.payload
        warps = [products.read(w) for w in p["warps"]]
        usable = [w.psf is not None for w in warps]
        warps = [w for w, ok in zip(warps, usable) if ok]
        exposures = [e for e, ok in zip(p["exposures"], usable) if ok]
        if not warps:
            return CoaddOutput(None, [], [], note="no warp with a PSF")
        fwhms = [w.psf.fwhm((w.shape[1] - 1) / 2.0, (w.shape[0] - 1) / 2.0) for w in warps]
        target = target_fwhm(fwhms)
        matched = [psf_match(w, f, target) for w, f in zip(warps, fwhms)]
        clipped = find_artifacts(matched, cfg.artifacts)
        if getattr(self.config, "homogenize_psf", False):
            sigmas = [math.sqrt(max(target ** 2 - f ** 2, 0.0)) / FWHM_PER_SIGMA for f in fwhms]
            for m, w in zip(matched, warps):
                # the smoothed pixels' own variance is smaller, but their noise is correlated: a
                # PSF-sized measurement sees about the unsmoothed variance, so the plane keeps it
                m.variance = w.variance
            res = combine(matched, clipped, cfg, psf_smoothing=sigmas)
        else:
            res = combine(warps, clipped, cfg)  # on the tile grid the warps share
        del matched
        extra = coadd_hdus(res, exposures)
        written = products.write(ProductRef(self.kind, p["band"], tile_id=p["tile"]), res.coadd, extra)
        return CoaddOutput(written, exposures, [int(c) for c in res.n_clipped])

    def record(self, ctx: RunContext, unit: Unit, result: CoaddOutput, tx) -> Recorded:
        p = unit.payload
        old = _replace_rows(tx, self.kind, None, p["tile"], p["band"])
        prov = self.provenance([f"warp:{e}:{p['tile']}" for e in result.inputs])
        _append(ctx, tx, prov, [result.written] if result.written is not None else [])
        keep = {result.written.rel} if result.written is not None else set()
        note = result.note or (f"{len(result.inputs)} inputs, clipped px "
                               + ",".join(str(c) for c in result.n_clipped))
        return Recorded(note=note, remove=[o for o in old if o not in keep], provenance_id=prov["provenance_id"])

    def discard(self, ctx, unit, result) -> None:
        if getattr(result, "written", None) is not None:
            ctx.products.remove(result.written.rel)


class TemplateStep(CoaddStep):
    """The best-seeing warps of a tile and band, combined as for a coadd (kind ``template``)."""

    name = "template"
    Config = TemplateStepConfig
    kind = "template"

    def _select(self, group: pd.DataFrame) -> pd.DataFrame:
        from archive.process.coadd import select_inputs

        chosen = select_inputs(group, self.config.select)
        return group[group["exposure_id"].isin(chosen["exposure_id"])]


def coadd_hdus(res, exposures: list[int]) -> list:
    """The N_IMAGE, INPUT_MAP and INPUTS HDUs of a coadd."""
    n_image = fits.ImageHDU(res.n_image.astype(np.int16), name="N_IMAGE")
    n_image.header["COMMENT"] = "number of inputs combined in each pixel"
    imap = fits.ImageHDU(res.input_map.astype(np.int64), name="INPUT_MAP")
    imap.header["COMMENT"] = "bit i set: row i of the INPUTS table was combined in this pixel"
    table = fits.BinTableHDU.from_columns([
        fits.Column("exposure_id", "K", array=np.asarray(exposures, np.int64)),
        fits.Column("weight", "D", array=np.asarray(res.weights, float)),
        fits.Column("background_offset", "D", array=np.asarray(res.offsets, float)),
        fits.Column("n_clipped", "K", array=np.asarray(res.n_clipped, np.int64))], name="INPUTS")
    return [n_image, imap, table]
