"""Write a whole simulated survey to disk: raws, calibration frames, truth, reference catalog, manifest.

Directory layout under ``outdir``::

    raw/visit000001/raw_v000001_d00.fits     science raws (one per visit and detector)
    calib/bias/bias_k00_d00.fits             bias frames (n_bias per detector)
    calib/dark/dark_k00_d00.fits             dark frames (n_dark per detector)
    calib/flat/r/flat_r_k00_d00.fits         flat frames (n_flat per band per detector)
    truth/objects.parquet                    one row per object (archive.sim.skymodel)
    truth/sources.parquet                    per visit/detector/object: x, y, true flux (render_epoch)
    truth/epochs.parquet                     per visit/detector: conditions, PSF, true calibration, WCSs
    truth/cosmic_rays.parquet, truth/streaks.parquet, truth/defects.parquet
    refcat.parquet                           reference catalog (archive.sim.skymodel.make_reference_catalog)
    manifest.json                            config, file lists, counts; written last

``manifest.json`` appearing last means the set is complete.

``truth/epochs.parquet`` columns (one row per visit and detector): ``visit``,
``detector``, ``epoch_index``, ``band``, ``mjd`` (TAI, mid-exposure),
``exp_time`` (s), ``airmass``, ``quality`` (``good``/``clouds``/``focus``),
``transparency``, ``sky_mag`` (mag/arcsec^2), ``sky_e`` (mean sky, electrons
per pixel), ``gain`` (e-/adu), ``psf_fwhm`` (Moffat FWHM at the detector
centre, pixels, before pixel convolution), ``psf_beta``, ``psf_variation``
``psf_bbox``, ``psf_ellipticity`` (1 - b/a), ``psf_theta`` (deg from +x)
(rebuild the PSF with :func:`truth_psf`), ``psf_fwhm_min/max``
(over the detector corners), ``electrons_per_njy``, ``njy_per_adu`` and
``zero_point`` (the true PhotoCalib of the bias/dark/flat-corrected image in
adu), ``ra``/``dec``/``rotation_deg`` (true pointing), ``wcs_dra_arcsec``,
``wcs_ddec_arcsec``, ``wcs_drot_deg`` (error of the header WCS), ``streak``,
``n_cosmic_rays``, ``wcs_true`` and ``wcs_header`` (FITS header text; rebuild
with :func:`wcs_from_text`).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import time

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS

from archive.errors import ValidationError
from archive.image.fitsutil import wcs_from_header, wcs_to_header
from archive.image.psf import MoffatPSF
from archive.image.raw import write_raw
from archive.sim.camera import expose_calibration, expose_object, make_detector
from archive.sim.config import SimConfig
from archive.sim.render import Epoch, plan_epochs, render_epoch
from archive.sim.skymodel import make_reference_catalog, make_sky

log = logging.getLogger(__name__)

#: Manifest format tag.
MANIFEST_FORMAT = "archive-sim/1"


def _wcs_text(w: WCS) -> str:
    return wcs_to_header(w).tostring(sep="\n")


def wcs_from_text(text: str) -> WCS:
    """Rebuild a WCS stored as header text in ``truth/epochs.parquet`` (``wcs_true``/``wcs_header``)."""
    w = wcs_from_header(fits.Header.fromstring(text, sep="\n"))
    if w is None:
        raise ValidationError("WCS text has no CTYPE1 card")
    return w


def truth_psf(row) -> MoffatPSF:
    """The true PSF of one ``truth/epochs.parquet`` row (a mapping or pandas row)."""
    return MoffatPSF(float(row["psf_fwhm"]), float(row["psf_beta"]),
                     variation=np.asarray(row["psf_variation"], dtype=float),
                     bbox=tuple(float(v) for v in row["psf_bbox"]), oversample=3,
                     ellipticity=float(row["psf_ellipticity"]), theta=float(row["psf_theta"]))


def epoch_row(model, config: SimConfig) -> dict:
    """Truth row of one visit/detector (conditions, PSF, calibration, WCSs)."""
    ep: Epoch = model.epoch
    psf = model.psf
    return {
        "visit": ep.visit, "detector": model.detector, "epoch_index": ep.index, "band": ep.band,
        "mjd": ep.mjd, "exp_time": ep.exp_time, "airmass": ep.airmass, "quality": ep.quality,
        "transparency": ep.transparency, "sky_mag": ep.sky_mag,
        "sky_e": float(model.sky_e.mean()), "gain": model.gain,
        "psf_fwhm": psf.fwhm(), "psf_beta": psf.beta, "psf_variation": psf.variation.tolist(),
        "psf_bbox": list(psf.bbox), "psf_ellipticity": psf.ellipticity(), "psf_theta": psf.theta,
        "psf_fwhm_min": float(psf.fwhm(np.array([0, config.nx - 1, 0, config.nx - 1]),
                                       np.array([0, 0, config.ny - 1, config.ny - 1])).min()),
        "psf_fwhm_max": float(psf.fwhm(np.array([0, config.nx - 1, 0, config.nx - 1]),
                                       np.array([0, 0, config.ny - 1, config.ny - 1])).max()),
        "electrons_per_njy": model.electrons_per_njy, "njy_per_adu": model.njy_per_adu,
        "zero_point": 31.4 - 2.5 * np.log10(model.njy_per_adu),
        "ra": ep.ra, "dec": ep.dec, "rotation_deg": ep.rotation_deg,
        "wcs_dra_arcsec": ep.wcs_dra_arcsec, "wcs_ddec_arcsec": ep.wcs_ddec_arcsec, "wcs_drot_deg": ep.wcs_drot_deg,
        "streak": ep.streak, "n_cosmic_rays": len(model.cosmic_rays),
        "wcs_true": _wcs_text(model.wcs), "wcs_header": _wcs_text(model.wcs_header),
    }


def _write_parquet(df: pd.DataFrame, path: pathlib.Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return str(path)


def simulate_survey(outdir: str | os.PathLike, config: SimConfig, overwrite: bool = False,
                    progress=None) -> dict:
    """Simulate ``config`` into ``outdir``; return the manifest (also written as ``manifest.json``).

    ``outdir`` must be absent or empty unless ``overwrite``.  ``progress``, if
    given, is called as ``progress(done, total, what)`` after each frame.
    Paths in the manifest are relative to ``outdir``.
    """
    t_start = time.perf_counter()
    out = pathlib.Path(outdir)
    if out.exists():
        if not out.is_dir():
            raise ValidationError(f"sim output {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ValidationError(f"sim output directory {out} is not empty (use overwrite)")
        # overwrite: remove only what a previous simulation wrote (manifest first: the set is now incomplete)
        for name in ("manifest.json", "refcat.parquet"):
            if (out / name).is_file():
                (out / name).unlink()
        for name in ("raw", "calib", "truth"):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)

    sky = make_sky(config)
    epochs = plan_epochs(config)
    detectors = [make_detector(config, d) for d in range(config.n_detectors)]
    n_cal = config.n_bias + config.n_dark + config.n_flat * len(config.bands)
    total = config.n_detectors * (n_cal + len(epochs))
    done = 0

    def tick(what):
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    rel = lambda p: str(p.relative_to(out))  # noqa: E731
    calib: dict = {"bias": [], "dark": [], "flat": {b: [] for b in config.bands}}
    mjd_cal = config.mjd0 - 0.5
    for det in detectors:
        d = det.detector
        for k in range(config.n_bias):
            p = write_raw(out / "calib" / "bias" / f"bias_k{k:02d}_d{d:02d}.fits",
                          expose_calibration(config, det, "BIAS", k, mjd=mjd_cal))
            calib["bias"].append({"path": rel(p), "detector": d})
            tick(p.name)
        for k in range(config.n_dark):
            p = write_raw(out / "calib" / "dark" / f"dark_k{k:02d}_d{d:02d}.fits",
                          expose_calibration(config, det, "DARK", k, mjd=mjd_cal))
            calib["dark"].append({"path": rel(p), "detector": d, "dark_time": config.dark_exp_time})
            tick(p.name)
        for b in config.bands:
            for k in range(config.n_flat):
                p = write_raw(out / "calib" / "flat" / b / f"flat_{b}_k{k:02d}_d{d:02d}.fits",
                              expose_calibration(config, det, "FLAT", k, band=b, mjd=mjd_cal))
                calib["flat"][b].append({"path": rel(p), "detector": d, "band": b})
                tick(p.name)

    raws = []
    sources, epoch_rows, crs, streaks = [], [], [], []
    for ep in epochs:
        for det in detectors:
            model = render_epoch(config, sky, ep, det.detector)
            frame = expose_object(config, det, model)
            p = write_raw(out / "raw" / f"visit{ep.visit:06d}" / f"raw_v{ep.visit:06d}_d{det.detector:02d}.fits",
                          frame)
            raws.append({"path": rel(p), "visit": ep.visit, "detector": det.detector, "band": ep.band,
                         "mjd": ep.mjd, "quality": ep.quality})
            sources.append(model.sources)
            epoch_rows.append(epoch_row(model, config))
            crs.append(model.cosmic_rays)
            streaks.append(model.streaks)
            tick(p.name)
            log.debug("visit %d detector %d: %d sources on the detector", ep.visit, det.detector, len(model.sources))

    truth = {
        "objects": _write_parquet(sky, out / "truth" / "objects.parquet"),
        "sources": _write_parquet(pd.concat(sources, ignore_index=True), out / "truth" / "sources.parquet"),
        "epochs": _write_parquet(pd.DataFrame(epoch_rows), out / "truth" / "epochs.parquet"),
        "cosmic_rays": _write_parquet(pd.concat(crs, ignore_index=True), out / "truth" / "cosmic_rays.parquet"),
        "streaks": _write_parquet(pd.concat(streaks, ignore_index=True), out / "truth" / "streaks.parquet"),
        "defects": _write_parquet(pd.concat([d.defects for d in detectors], ignore_index=True),
                                  out / "truth" / "defects.parquet"),
    }
    truth = {k: rel(pathlib.Path(v)) for k, v in truth.items()}
    refcat = make_reference_catalog(config, sky)
    _write_parquet(refcat, out / "refcat.parquet")
    kinds = sky["kind"].value_counts().to_dict()
    manifest = {
        "format": MANIFEST_FORMAT,
        "config": config.to_dict(),
        "raws": raws,
        "calib": calib,
        "truth": truth,
        "refcat": "refcat.parquet",
        "counts": {
            "objects": {str(k): int(v) for k, v in kinds.items()},
            "raws": len(raws),
            "calib_frames": len(calib["bias"]) + len(calib["dark"]) + sum(len(v) for v in calib["flat"].values()),
            "refcat": len(refcat),
            "bad_epochs": {str(e.visit): e.quality for e in epochs if e.quality != "good"},
            "streak_visits": [e.visit for e in epochs if e.streak],
        },
        "units": {"flux": "nJy", "time": "MJD TAI", "angles": "deg", "pixels": "0-based, imaging section"},
        "elapsed_s": round(time.perf_counter() - t_start, 3),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    log.info("simulated %d raws and %d calibration frames in %.1f s", len(raws),
             manifest["counts"]["calib_frames"], manifest["elapsed_s"])
    return manifest


def load_manifest(outdir: str | os.PathLike) -> dict:
    """Read ``outdir/manifest.json`` (raises when the set is incomplete or not a simulation)."""
    path = pathlib.Path(outdir) / "manifest.json"
    if not path.is_file():
        raise ValidationError(f"{path} not found: not a (complete) simulated survey")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValidationError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest
