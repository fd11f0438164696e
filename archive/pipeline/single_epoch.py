"""Raw frames -> calexps + source rows in the archive, resumable and parallel.

``process_raws`` takes two kinds of input file:

- raw camera frames (:mod:`archive.image.raw`): the master calibrations (per
  detector, and per band for flats) are built from the calibration frames and
  each frame goes through ISR;
- calibrated exposures of other pipelines, multi-extension FITS with
  ``IMAGE``/``MASK``/``VARIANCE`` HDUs
  (:func:`archive.image.foreign.read_calibrated_mef`): no ISR.

Then :func:`archive.process.single_frame.process_exposure` runs on every
exposure in worker processes.  The workers write the calexp FITS files; this
process (the only writer) records each exposure in **one store transaction**:
its ``source`` rows, matched across epochs into ``matched_source`` objects
(LAST's matched sources), the ``exposure`` row (processed or rejected, with its
reason), the ``image_product`` row of the calexp and the ``provenance`` row.
They land together or not at all; an exposure whose transaction fails is
reported as failed, its calexp file removed, and the run goes on.  Exposures
the archive already holds (from the same file name) are skipped, so an
interrupted run resumes where it stopped.

Exposure ids are ``visit * 1000 + detector``, with the visit and detector of
:func:`archive.image.obsheader.exposure_identity`: the ``VISIT`` card, else
``EXPNUM``/``EXPID``/``OBSID``, else derived from the mid-exposure time (TAI
seconds since MJD 0); a frame with neither an id card nor a time card is
refused.  Before anything is processed or written, a run refuses (naming the
files) two input files with the same exposure id, and an input whose id the
archive already holds from a different file.

An exposure processed without any photometric calibration (no reference
catalog, no header zero point) is recorded as processed with its fluxes null,
its sources flagged ``NOT_CALIBRATED``, and on the exposure row a null zero
point, the ``NO_PHOTOCAL`` quality bit and the reason.

When a run processes several exposures, two steps look at them together before
anything is recorded: exposures whose zero point or seeing is far off the others
of their band are rejected (clouds, bad focus:
:mod:`archive.process.epoch_quality`), and the rest are refined against each other
field by field (:mod:`archive.process.astrometry_relative`), which rewrites their
calexps' WCS and their sources' sky positions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from archive.catalog.ids import new_ids
from archive.catalog.store import CatalogStore
from archive.errors import ArchiveError, NotFoundError
from archive.image.exposure import Exposure, ExposureInfo
from archive.image.foreign import is_calibrated_mef, read_calibrated_mef
from archive.image.raw import RawFrame, read_raw
from archive.pipeline.products import image_product_row, product_path, write_product
from archive.pipeline.provenance import provenance_row
from archive.sky.healpix import radec_to_healpix29

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


@dataclass
class ProcessConfig:
    """Pipeline settings; ``single_frame`` is the processing config saved with every product."""

    workers: int = 1
    match_radius_arcsec: float = 1.0  # matching of sources across epochs (matched_source)
    refine_astrometry: bool = True  # the epochs of a field processed together: joint relative astrometry
    relative_astrometry: object = None  # archive.process.astrometry_relative.RelativeAstrometryConfig
    epoch_quality: object = None  # archive.process.epoch_quality.EpochQualityConfig (clouds, bad focus)
    single_frame: object = None  # archive.process.single_frame.SingleFrameConfig (None = defaults)
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


def exposure_id_of(visit: int, detector: int) -> int:
    """The archive's exposure id convention: visit * 1000 + detector."""
    return int(visit) * 1000 + int(detector)


@dataclass
class FrameHead:
    """What the driver knows of one input file before processing it.

    calibrated: an IMAGE/MASK/VARIANCE exposure of another pipeline (no ISR); info: its
    metadata (visit/detector from :func:`archive.image.obsheader.exposure_identity`, the card
    the visit came from in ``info.extras["visit_from"]``); wcs, shape: of the image (trimmed
    data section for a raw frame)."""

    path: pathlib.Path
    calibrated: bool
    info: ExposureInfo
    wcs: object
    shape: tuple[int, int]

    @property
    def exposure_id(self) -> int:
        return exposure_id_of(self.info.visit, self.info.detector)

    @property
    def visit_from(self) -> str:
        return str(self.info.extras.get("visit_from", "VISIT"))


def read_head(path: pathlib.Path) -> FrameHead:
    """The :class:`FrameHead` of a raw science frame or a calibrated exposure.

    Raises :class:`~archive.errors.ArchiveError` naming the file for a frame that is not a
    science frame, or whose header gives no visit (no ``VISIT``/``EXPNUM``/``EXPID``/
    ``OBSID`` card and no time card to derive one from)."""
    if is_calibrated_mef(path):
        exp = read_calibrated_mef(path)
        head = FrameHead(path, True, exp.info, exp.wcs, exp.shape)
    else:
        f = read_raw(path)
        if f.imagetyp != "OBJECT":
            raise ArchiveError(f"{path}: IMAGETYP is {f.imagetyp}, expected a science (OBJECT) frame")
        head = FrameHead(path, False, f.info, f.wcs, f.image.shape)
    if not head.visit_from:
        raise ArchiveError(f"{path}: no VISIT card (nor EXPNUM, EXPID, OBSID) and no time card (MJD-OBS, "
                           "DATE-OBS, MJD-AVG) to derive the visit from; add VISIT = <integer>, unique per "
                           "exposure")
    return head


def check_exposure_ids(heads: list[FrameHead]) -> None:
    """Refuse a run in which two input files give the same exposure id.

    The error names every clashing file, the id, and where its visit came from."""
    by_id: dict[int, list[FrameHead]] = defaultdict(list)
    for h in heads:
        by_id[h.exposure_id].append(h)
    clashes = [(eid, hs) for eid, hs in sorted(by_id.items()) if len(hs) > 1]
    if not clashes:
        return
    parts = []
    for eid, hs in clashes[:5]:
        h = hs[0]
        src = "derived from the mid-exposure time" if h.visit_from == "MJD" else f"from {h.visit_from}"
        parts.append(f"{', '.join(str(x.path) for x in hs)} all give exposure id {eid} "
                     f"(visit {h.info.visit} {src}, detector {h.info.detector})")
    more = f" (and {len(clashes) - 5} more ids)" if len(clashes) > 5 else ""
    raise ArchiveError("duplicate exposure ids: " + "; ".join(parts) + more
                       + "; give each exposure a distinct VISIT (or EXPNUM) card and each detector its "
                       "DETECTOR card; nothing was processed or written")


# -- master calibrations ------------------------------------------------------
def _read_frames(paths) -> list[RawFrame]:
    return [read_raw(p) for p in paths]


def build_masters(calib_paths: list[pathlib.Path]) -> dict:
    """Master bias/dark per detector and flat per (detector, band) from calibration frames.

    Frames are grouped by their IMAGETYP, DETECTOR and FILTER header cards.
    """
    from archive.process.masters import make_master_bias, make_master_dark, make_master_flat

    groups: dict[tuple, list[RawFrame]] = defaultdict(list)
    for p in calib_paths:
        f = read_raw(p)
        det = int(f.header.get("DETECTOR", 0))
        kind = f.imagetyp
        band = str(f.header.get("FILTER", f.header.get("BAND", ""))).strip() if kind == "FLAT" else ""
        groups[(kind, det, band)].append(f)
    masters: dict = {}
    for det in sorted({k[1] for k in groups}):
        bias = make_master_bias(groups[("BIAS", det, "")]) if groups.get(("BIAS", det, "")) else None
        dark = make_master_dark(groups[("DARK", det, "")], bias) if groups.get(("DARK", det, "")) else None
        masters[("bias", det)] = bias
        masters[("dark", det)] = dark
        for kind, d, band in list(groups):
            if kind == "FLAT" and d == det:
                masters[("flat", det, band)] = make_master_flat(groups[(kind, d, band)], bias, dark)
    return masters


# -- one exposure (runs in a worker) ------------------------------------------
def _process_one(raw_path: str, calibrated: bool, masters: dict, refcat: pd.DataFrame | None,
                 products_root: str, config) -> dict:
    from astropy.stats import sigma_clipped_stats

    from archive.pipeline.runtime import keep_freed_memory
    from archive.process import single_frame

    keep_freed_memory()  # freed full-frame planes are reused, not unmapped (see runtime.py)
    if calibrated:  # another pipeline's calibrated exposure: no ISR
        exp = read_calibrated_mef(raw_path)
        info = exp.info
    else:
        raw = read_raw(raw_path)
        info = raw.info
        det = int(info.detector)
        exp = single_frame.isr_exposure(raw, masters.get(("bias", det)), masters.get(("dark", det)),
                                        masters.get(("flat", det, info.band)), config.isr)
    det = int(info.detector)
    good = np.isfinite(exp.image) & (exp.mask == 0)
    sky = float(sigma_clipped_stats(exp.image[good], sigma=3.0, maxiters=5)[1]) if good.any() else np.nan
    res = single_frame.process_exposure(exp, refcat, config)
    out = {"raw_path": raw_path, "info": info, "rejected": res.rejected, "reason": res.reason,
           "quality_flags": quality_bits(list(res.quality.flags), res.rejected), "sky_level": sky,
           "calibration": res.calibration, "calibration_note": res.calibration_note}
    if not res.rejected and res.calexp is not None:
        rel = product_path("calexp", info.visit, det, info.band)
        _, digest, size = write_product(products_root, rel, res.calexp)
        out.update(rel=rel, sha256=digest, size=size, calexp=res.calexp, sources=res.sources,
                   astrometry_rms=getattr(res.astrometry, "rms_arcsec", np.nan),
                   zero_point=getattr(res.calexp.photo_calib, "zero_point", np.nan))
    return out


def _measured(calexp, info) -> tuple[float, float, float]:
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
        # 5-sigma point source: the PSF model's own noise-equivalent area with the median variance
        if calexp.psf is not None:
            from archive.process.quality import limiting_magnitude

            lim = limiting_magnitude(float(calexp.photo_calib.zero_point), float(np.nanmedian(calexp.variance)),
                                     calexp.psf, x=(nx - 1) / 2.0, y=(ny - 1) / 2.0)
    return seeing, zp, lim


def _exposure_row(out: dict, exposure_id: int) -> dict:
    """The ``exposure`` row: pointing of the detector centre, seeing, sky, zero point, depth."""
    from archive.pipeline.products import footprint

    info = out["info"]
    calexp = out.get("calexp")
    wcs = calexp.wcs if calexp is not None else out.get("calexp_wcs", out["raw_wcs"])
    ny, nx = out.get("calexp_shape", out["shape"])
    if calexp is not None:
        ra, dec, _ = footprint(calexp)
    else:
        ra, dec = (float(v) for v in wcs.all_pix2world([[(nx - 1) / 2.0, (ny - 1) / 2.0]], 0)[0])
        ra %= 360.0
    seeing, zp, lim = out["measured"] if "measured" in out else _measured(calexp, info)
    sky = out.get("sky_level", np.nan) if calexp is not None or "measured" in out else np.nan
    flags, reason = (int(out["quality_flags"]), out["reason"]) if out["rejected"] else (0, "")
    if not out["rejected"] and out.get("calibration") == "none":
        # processed, but nothing in nJy: say so (zero point and depth null, flag, reason)
        zp = lim = None
        flags = 1 << QUALITY_BITS["NO_PHOTOCAL"]
        reason = out.get("calibration_note") or "not photometrically calibrated"
    return {
        "exposure_id": exposure_id, "visit": int(info.visit), "detector": int(info.detector),
        "band": info.band, "mjd_mid": float(info.mjd), "exp_time": float(info.exp_time),
        "airmass": float(info.airmass), "ra": ra, "dec": dec,
        "healpix29": int(radec_to_healpix29(np.array([ra]), np.array([dec]))[0]),
        "rot_angle": float(np.degrees(np.arctan2(wcs.wcs.get_pc()[0, 1], wcs.wcs.get_pc()[1, 1]))),
        "seeing": seeing, "sky_level": sky, "zero_point": zp, "lim_mag": lim,
        "status": "rejected" if out["rejected"] else "processed",
        "quality_flags": flags, "quality_reason": reason or None, "raw_path": out["raw_path"],
    }


def _known_exposures(store: CatalogStore, ids: list[int]) -> dict[int, str]:
    """exposure id -> stored ``raw_path`` ("" when null) of the ids the archive holds."""
    if not ids:
        return {}
    got = store.get("exposure", ids, columns=["exposure_id", "raw_path"])
    return {int(e): ("" if pd.isna(p) else str(p)) for e, p in zip(got["exposure_id"], got["raw_path"])}


class _InTransaction:
    """``store`` seen through an open transaction: its ``transaction()`` joins ``tx``
    instead of opening a second one, and leaves commit or rollback to the owner of ``tx``.

    This lets :func:`archive.catalog.matched_ingest.ingest_sources` (which opens its own
    transaction) write an exposure's sources in the same transaction as its exposure,
    product and provenance rows."""

    def __init__(self, store: CatalogStore, tx) -> None:
        self._store, self._tx = store, tx

    def __getattr__(self, name):
        return getattr(self._store, name)

    def transaction(self, *args, **kwargs):
        return contextlib.nullcontext(self._tx)


def _record(store: CatalogStore, out: dict, exposure_id: int, config_dict: dict, masters_used: list,
            match_radius_arcsec: float) -> int:
    """Write one exposure's results in one store transaction; returns the number of sources.

    The ``source`` rows (matched into ``matched_source`` objects), the ``exposure`` row,
    the calexp's ``image_product`` row and the ``provenance`` row commit together or not
    at all: every table is validated first, and a failure anywhere (a clashing key, a
    concurrent writer) rolls all of it back.  Sources of this exposure id already stored
    without an exposure row (left by an older, non-atomic version) are replaced.
    """
    from archive.catalog.matched_ingest import ingest_sources
    from archive.catalog.validate import conform

    where = out["raw_path"]
    prov = provenance_row("single_frame", config_dict, [out["raw_path"], *masters_used])
    batch = {"provenance": pd.DataFrame([prov]), "exposure": pd.DataFrame([_exposure_row(out, exposure_id)])}
    src = None
    if not out["rejected"]:
        calexp = out["calexp"]
        product = image_product_row(int(new_ids(1)[0]), "calexp", out["rel"], out["sha256"], out["size"],
                                    calexp, exposure_id, prov["provenance_id"])
        batch["image_product"] = pd.DataFrame([product])
        src = out["sources"]
        src = src[[c for c in src.columns if c in store.table("source")]].copy()
        src = src[np.isfinite(src["ra"].to_numpy(float)) & np.isfinite(src["dec"].to_numpy(float))]
        info = out["info"]
        src["source_id"] = new_ids(len(src))
        src["exposure_id"] = exposure_id
        src["visit"] = int(info.visit)
        src["detector"] = int(info.detector)
        src["band"] = info.band
        src["mjd"] = float(info.mjd)
        src["ra"] = src["ra"] % 360.0
        src = src.drop(columns=["healpix29", "matched_source_id"], errors="ignore")
        conform(store.table("source"), src, where)  # refused here, before the transaction opens
    arrows = {name: conform(store.table(name), rows, where) for name, rows in batch.items()}
    with store.transaction() as tx:
        if src is not None and len(src):
            ingest_sources(_InTransaction(store, tx), src, radius_arcsec=match_radius_arcsec, replace=True,
                           where=where)
        for name, arrow in arrows.items():
            tx.append(name, arrow)
    return 0 if src is None else len(src)


def _fields(outs: list[dict], link_deg: float) -> list[list[int]]:
    """Groups of overlapping exposures: friends-of-friends of their centres within ``link_deg``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    centres = np.array([o["calexp_centre"] for o in outs])
    ra, dec = np.radians(centres[:, 0]), np.radians(centres[:, 1])
    xyz = np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])
    pairs = cKDTree(xyz).query_pairs(2 * np.sin(np.radians(link_deg) / 2), output_type="ndarray")
    n = len(outs)
    _, lab = connected_components(coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)),
                                  directed=False)
    return [list(np.flatnonzero(lab == k)) for k in np.unique(lab)]


def reject_outlier_epochs(outs: list[dict], products_root: os.PathLike, config=None) -> None:
    """Reject, in place, processed exposures whose zero point or seeing is far off the
    others of their band in this run (:func:`archive.process.epoch_quality.check_epochs`):
    they are recorded as rejected with the reason, their calexp file is removed and their
    sources are not stored."""
    from archive.process.epoch_quality import check_epochs

    table = pd.DataFrame({"band": [o["info"].band for o in outs],
                          "seeing": [o["measured"][0] for o in outs],
                          "zero_point": [o["measured"][1] for o in outs]})
    verdict = check_epochs(table, config)
    for o, flags, reason in zip(outs, verdict["flags"], verdict["reason"]):
        if not reason:
            continue
        o["rejected"], o["reason"] = True, reason
        o["quality_flags"] = quality_bits(list(flags), True)
        with contextlib.suppress(FileNotFoundError):
            (pathlib.Path(products_root) / o["rel"]).unlink()
        log.warning("exposure %s rejected: %s", o["exposure_id"], reason)


def refine_field_astrometry(outs: list[dict], refcat: pd.DataFrame | None, products_root: os.PathLike,
                            config=None) -> None:
    """Refine the WCS of processed exposures of one run field by field, in place.

    Exposures whose centres lie within one detector diagonal of each other form a
    field; a field of three or more is fitted jointly
    (:func:`archive.process.astrometry_relative.refine_epochs`); each refined
    exposure's calexp FITS is rewritten with its new WCS (new checksum) and its
    sources get new sky coordinates. A field that cannot be refined (too few common
    stars) keeps its reference-catalog fits, with a warning.
    """
    from archive.errors import ValidationError
    from archive.image.exposure import Exposure
    from archive.process.astrometry_relative import RelativeAstrometryConfig, refine_epochs
    from archive.process.characterize import add_sky_coordinates

    cfg = config or RelativeAstrometryConfig()
    if len(outs) < cfg.min_epochs:
        return
    diag = max(o["calexp_diag_deg"] for o in outs)
    for group in _fields(outs, diag):
        if len(group) < cfg.min_epochs:
            continue
        members = [outs[k] for k in group]
        try:
            res = refine_epochs([o["sources"] for o in members], [o["calexp_wcs"] for o in members],
                                [o["calexp_shape"] for o in members], refcat=refcat, config=cfg,
                                detectors=[int(o["info"].detector) for o in members])
        except ValidationError as exc:
            log.warning("relative astrometry of %d exposures skipped: %s", len(members), exc)
            continue
        for o, wcs, done, before, after in zip(members, res.wcs, res.refined, res.rms_before_mas,
                                               res.rms_after_mas):
            if not done:
                continue
            path = pathlib.Path(products_root) / o["rel"]
            calexp = Exposure.read(path)
            calexp.wcs = wcs
            _, o["sha256"], o["size"] = write_product(products_root, o["rel"], calexp)
            o["calexp"] = calexp
            o["calexp_wcs"] = wcs
            o["sources"] = add_sky_coordinates(o["sources"].copy(), wcs)
            o["relative_rms_mas"] = (float(before), float(after))


def process_raws(store: CatalogStore, raw_paths: list, calib_paths: list, refcat: pd.DataFrame | None,
                 products_root: os.PathLike, config: ProcessConfig | None = None) -> RunReport:
    """Process raw frames or calibrated exposures into calexps (FITS under ``products_root``)
    and archive rows (see the module doc).

    Before anything is processed or written, every input's header is read: a file that
    is not a science frame, gives no visit, shares its exposure id with another input, or
    gives an id the archive holds from a different file is refused
    (:class:`~archive.errors.ArchiveError` naming the files).  Inputs whose exposure the
    archive already holds (same file name) are skipped (resumable).  Errors of one
    exposure, in processing or recording, are recorded as ``failed`` and do not stop the run.
    """
    from archive.process.single_frame import SingleFrameConfig
    from archive.pipeline.provenance import _plain

    cfg = config or ProcessConfig()
    sf_config = cfg.single_frame or SingleFrameConfig()
    t0 = time.perf_counter()
    report = RunReport()
    raws: list[pathlib.Path] = []
    seen: set[pathlib.Path] = set()
    for p in (pathlib.Path(p) for p in raw_paths):
        if not p.is_file():
            raise NotFoundError(f"{p}: no such raw file")
        if p.resolve() not in seen:  # the same file named twice is one input
            seen.add(p.resolve())
            raws.append(p)
    heads = {str(p): read_head(p) for p in raws}
    check_exposure_ids(list(heads.values()))
    headers = {k: (h.exposure_id, h.wcs, h.shape) for k, h in heads.items()}
    known = _known_exposures(store, [e for e, _, _ in headers.values()])
    for p in raws:
        eid = headers[str(p)][0]
        stored = known.get(eid)
        if stored and pathlib.Path(stored).name != p.name:
            raise ArchiveError(f"{p} gives exposure id {eid}, which the archive already holds from {stored}; "
                               "give the exposure a distinct VISIT (or EXPNUM) card; nothing was processed")
    todo = [p for p in raws if headers[str(p)][0] not in known]
    report.skipped = sorted(headers[str(p)][0] for p in raws if headers[str(p)][0] in known)
    if not todo:
        report.seconds = time.perf_counter() - t0
        return report
    masters = build_masters([pathlib.Path(c) for c in calib_paths])
    masters_used = [str(c) for c in calib_paths]
    if not calib_paths and any(not heads[str(p)].calibrated for p in todo):
        log.warning("raw frames processed without calibration frames (no bias, dark or flat)")
    config_dict = _plain(sf_config)
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="exposure", desc="process")

    held: list[dict] = []  # processed exposures waiting for the run-level steps
    hold = len(todo) > 1  # epochs judged against each other, then refined together
    refine = bool(cfg.refine_astrometry) and hold
    if hold:
        from archive.process.epoch_quality import EpochQualityConfig

        # the run-level steps decide too: their configs go into every exposure's provenance
        config_dict = {**config_dict, "epoch_quality": _plain(cfg.epoch_quality or EpochQualityConfig())}
    if refine:
        from archive.process.astrometry_relative import RelativeAstrometryConfig

        config_dict = {**config_dict,
                       "relative_astrometry": _plain(cfg.relative_astrometry or RelativeAstrometryConfig())}

    def record(out: dict) -> None:
        eid = out["exposure_id"]
        try:
            if not out["rejected"] and out.get("calexp") is None:
                out["calexp"] = Exposure.read(pathlib.Path(products_root) / out["rel"])
            report.n_sources += _record(store, out, eid, config_dict, masters_used, cfg.match_radius_arcsec)
        except ArchiveError as exc:  # nothing of this exposure was written: no file left either
            report.failed[eid] = f"not recorded: {exc}"
            log.error("%s: not recorded: %s", out["raw_path"], exc)
            # the calexp goes too, unless another writer registered this exposure (and its file)
            if out.get("rel") is not None and eid not in _known_exposures(store, [eid]):
                with contextlib.suppress(FileNotFoundError):
                    (pathlib.Path(products_root) / out["rel"]).unlink()
            return
        finally:
            out["calexp"] = None
        (report.rejected.__setitem__(eid, out["reason"]) if out["rejected"] else report.processed.append(eid))
        if not out["rejected"] and out.get("calibration") == "none":
            report.uncalibrated[eid] = out.get("calibration_note", "")

    def handle(path: str, out: dict | None, error: str | None) -> None:
        eid, wcs, shape = headers[path]
        if error is not None:
            report.failed[eid] = error
            log.error("%s: %s", path, error)
        else:
            out["raw_wcs"], out["shape"], out["exposure_id"] = wcs, shape, eid
            if hold and not out["rejected"]:
                calexp = out["calexp"]
                ny, nx = calexp.image.shape
                out["calexp_wcs"], out["calexp_shape"] = calexp.wcs, (ny, nx)
                out["calexp_centre"] = calexp.center_sky()
                out["calexp_diag_deg"] = float(np.hypot(nx, ny) * calexp.pixel_scale() / 3600.0)
                out["measured"] = _measured(calexp, out["info"])
                out["calexp"] = None  # on disk; read again when recorded, so a run's memory stays flat
                held.append(out)
            else:
                record(out)
        if bar is not None:
            bar.update(1)

    if cfg.workers <= 1:
        for p in todo:
            try:
                out = _process_one(str(p), heads[str(p)].calibrated, masters, refcat, str(products_root),
                                   sf_config)
            except ArchiveError as exc:
                handle(str(p), None, str(exc))
                continue
            handle(str(p), out, None)
    else:
        with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
            futures = {pool.submit(_process_one, str(p), heads[str(p)].calibrated, masters, refcat,
                                   str(products_root), sf_config): str(p)
                       for p in todo}
            for fut in as_completed(futures):
                path = futures[fut]
                try:
                    out = fut.result()
                except ArchiveError as exc:
                    handle(path, None, str(exc))
                    continue
                handle(path, out, None)
    if held:
        reject_outlier_epochs(held, products_root, cfg.epoch_quality)
        if refine:
            refine_field_astrometry([o for o in held if not o["rejected"]], refcat, products_root,
                                    cfg.relative_astrometry)
        for out in sorted(held, key=lambda o: o["exposure_id"]):
            if "relative_rms_mas" in out:
                report.refined[out["exposure_id"]] = out["relative_rms_mas"]
            record(out)
    if bar is not None:
        bar.close()
    report.seconds = time.perf_counter() - t0
    return report
