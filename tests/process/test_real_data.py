"""Real DECam pixels (../shared/data) through background, CR finding, PSF, detection and measurement."""

import glob
import pathlib
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from archive.image import Exposure, ExposureInfo
from archive.process import characterize
from archive.process.psf_estimate import PsfEstimateConfig, estimate_psf
from archive.process.background import estimate_background


def _wcs(header):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        w = WCS(header)
    return w.celestial if w.has_celestial else None


def _legacypipe_exposures(root: pathlib.Path):
    for ooi in sorted(glob.glob(str(root / "real" / "legacypipe" / "*" / "images" / "**" / "*_ooi_*.fits"), recursive=True)):
        oow = ooi.replace("_ooi_", "_oow_")
        ood = ooi.replace("_ooi_", "_ood_")
        with fits.open(ooi) as h, fits.open(oow) as hw, fits.open(ood) as hd:
            img = h[1].data.astype(np.float32)
            ivar = hw[1].data.astype(np.float32)
            dq = hd[1].data
            hdr = h[1].header
            prim = h[0].header
        var = np.where(ivar > 0, 1.0 / np.where(ivar > 0, ivar, 1.0), np.inf).astype(np.float32)
        mask = np.where((dq != 0) | (ivar <= 0), np.int32(1 << 0), np.int32(0))
        fwhm = float(prim.get("FWHM", hdr.get("FWHM", 4.0)) or 4.0)
        yield ooi, Exposure(img, mask, var, wcs=_wcs(hdr), info=ExposureInfo(band=str(prim.get("FILTER", "")[:1]))), fwhm


def test_legacypipe_cutouts_run_through(shared_data):
    n = 0
    for path, exp, fwhm in _legacypipe_exposures(shared_data):
        cfg = characterize.CharacterizeConfig(fallback_fwhm=fwhm)
        cfg.background.mesh_size = 32
        res = characterize.run(exp, cfg)
        s = res.sources
        assert np.isfinite(s.x).all() and np.isfinite(s.y).all(), path
        if len(s) and exp.wcs is not None:
            assert np.isfinite(s.ra).all() and (s.healpix29 > 0).all()
            # sky positions lie on the cutout
            x, y = exp.wcs.all_world2pix(s.ra, s.dec, 0)
            assert np.allclose(x, s.x, atol=1e-3) and np.allclose(y, s.y, atol=1e-3)
        n += 1
    if n == 0:
        pytest.skip("no legacypipe cutouts found")


def test_sfft_decam_frames_psf_and_sources(shared_data):
    files = sorted(glob.glob(str(shared_data / "real" / "sfft" / "**" / "DEC-OBS*.mini.fits"), recursive=True))
    if not files:
        pytest.skip("no sfft frames found")
    for f in files[:1]:
        with fits.open(f) as h:
            img = h[0].data.astype(np.float32)
            hdr = h[0].header
        gain = float(hdr.get("GAIN", 4.0))
        bkg = estimate_background(img, config=None)
        # sky-dominated variance: background noise plus the sources' Poisson noise
        var = (bkg.variance + np.maximum(img - bkg.background, 0) / gain).astype(np.float32)
        sat = float(hdr.get("SATURATE", np.inf))
        mask = np.where(img >= 0.9 * sat, np.int32(1 << 1), np.int32(0))
        psf = estimate_psf(img - bkg.background, var, mask=mask, background_variance=bkg.variance,
                           config=PsfEstimateConfig(initial_fwhm=4.0, min_snr=30.0, degree=0))
        assert 2.0 < psf.fwhm < 10.0 and psf.ellipticity < 0.3
        exp = Exposure(img, mask, var, wcs=_wcs(hdr), psf=psf.psf)
        res = characterize.run(exp)
        s = res.sources
        assert len(s) > 20
        assert np.isfinite(s.psf_flux).all()
        good = s[(s.snr > 50) & ((s["flags"] & 0b111) == 0)]  # no BAD, SAT or CR pixel within 3 px
        assert len(good) >= 3
        # sanity of the measurements on real pixels: the curve of growth rises, the bright
        # point sources share one profile (ap3/ap6 agrees to a few per cent), and the PSF flux
        # is within the range an aperture correction absorbs (the DECam wings reach past r = 12 px)
        assert (good.ap_flux_r3 < good.ap_flux_r6).all()
        c = (good.ap_flux_r3 / good.ap_flux_r6).to_numpy()
        assert 0.3 < np.median(c) < 0.9
        assert np.median(np.abs(c - np.median(c))) < 0.05 * np.median(c)
        assert 0.8 < np.median(good.ap_flux_r12 / good.psf_flux) < 1.4
