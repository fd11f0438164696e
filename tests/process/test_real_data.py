"""Real DECam pixels (tests/data/real) through background, CR finding, PSF, detection and measurement."""

import glob
import pathlib
import warnings

import numpy as np
import pandas as pd
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


def test_legacypipe_cutouts_run_through(data_dir):
    n = 0
    for path, exp, fwhm in _legacypipe_exposures(data_dir):
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
    assert n >= 2  # testcase6 and testcase8 (tests/data/README.md)


def test_sfft_decam_frames_psf_and_sources(data_dir):
    files = sorted(glob.glob(str(data_dir / "real" / "sfft" / "**" / "DEC-OBS*.mini.fits"), recursive=True))
    assert files
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


def test_legacypipe_astrometry_against_gaia(data_dir):
    """A real DECam cutout (legacypipe testcase8, 375 x 280 px, 8 Gaia stars on it): our
    centroids of the bright Gaia stars sit where the DECam Community Pipeline's WCS puts them,
    and a WCS fitted from the header start against the Gaia chunk has a sane rms."""
    from astropy.table import Table, vstack
    from scipy.spatial import cKDTree

    from archive.process.astrometry import AstrometryConfig, fit_astrometry

    found = [(p, e, f) for p, e, f in _legacypipe_exposures(data_dir) if "testcase8" in p]
    assert found
    path, exp, fwhm = found[0]
    case = pathlib.Path(path.split("/images/")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gaia = vstack([Table.read(f) for f in sorted(case.glob("gaia/*.fits"))])
    ref = pd.DataFrame({"ra": np.asarray(gaia["ra"], float), "dec": np.asarray(gaia["dec"], float),
                        "g": np.asarray(gaia["phot_g_mean_mag"], float)})
    cfg = characterize.CharacterizeConfig(fallback_fwhm=fwhm)
    cfg.background.mesh_size = 32
    s = characterize.run(exp, cfg).sources
    ny, nx = exp.image.shape
    x, y = exp.wcs.all_world2pix(ref.ra, ref.dec, 0)
    on = (x > 5) & (x < nx - 6) & (y > 5) & (y < ny - 6)
    assert on.sum() >= 6
    d, i = cKDTree(np.c_[s.x, s.y]).query(np.c_[x[on], y[on]])
    bright = s.snr.to_numpy()[i] > 100
    # measured here: the 4 stars above S/N 100 lie 0.12-0.19 px (0.03-0.05") from the CP positions
    assert bright.sum() >= 3
    assert (d[bright] < 0.3).all(), d[bright]
    res = fit_astrometry(s, ref, exp.wcs, exp.image.shape, ref_mag="g",
                         config=AstrometryConfig(min_matches=5, max_offset=20.0))
    # 7 matches, rms 0.48 px = 0.13" per axis (the faint Gaia stars, G ~ 21, scatter by ~1 px)
    assert res.n_matches >= 5
    assert res.rms_arcsec < 0.2
    assert abs(res.offset_px[0]) < 2 and abs(res.offset_px[1]) < 2
