import numpy as np
import pytest
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from archive.errors import ValidationError
from archive.image import Exposure, ExposureInfo, GaussianPSF, PhotoCalib
from archive.process import characterize
from archive.sky.healpix import radec_to_healpix29
from synthetic import star_field


def _tan_wcs(shape, scale_arcsec=0.26, ra=150.0, dec=2.0):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [shape[1] / 2 + 1, shape[0] / 2 + 1]
    w.wcs.cd = np.array([[-scale_arcsec / 3600, 0], [0, scale_arcsec / 3600]])
    return w


@pytest.fixture(scope="module")
def result():
    f = star_field((512, 512), n_stars=300, seed=21, n_cr=60, fwhm=3.0)
    wcs = _tan_wcs(f.image.shape)
    exp = Exposure(f.image, variance=f.variance, wcs=wcs, psf=GaussianPSF(fwhm=3.0),
                   photo_calib=PhotoCalib(2.5), info=ExposureInfo(visit=7, detector=3, band="r", mjd=60000.5))
    return f, exp, characterize.run(exp)


def test_exposure_step_outputs_source_rows(result):
    f, exp, res = result
    s = res.sources
    for c in ("ra", "dec", "healpix29", "psf_flux", "ap_flux_r12", "flags", "visit", "detector", "band", "mjd"):
        assert c in s.columns
    assert (s.visit == 7).all() and (s.band == "r").all()
    # positions -> sky through the WCS
    ra, dec = exp.wcs.all_pix2world(f.truth.x, f.truth.y, 0)
    d, i = cKDTree(np.c_[s.x, s.y]).query(np.c_[f.truth.x, f.truth.y])
    m = (d < 1.5) & (f.truth.snr > 50).to_numpy() & f.truth.isolated.to_numpy()
    dra = (s.ra.to_numpy()[i[m]] - ra[m]) * np.cos(np.deg2rad(2.0)) * 3600
    ddec = (s.dec.to_numpy()[i[m]] - dec[m]) * 3600
    assert np.sqrt(np.mean(dra ** 2 + ddec ** 2) / 2) < 0.05 * 0.26
    assert np.array_equal(s.healpix29.to_numpy(), radec_to_healpix29(s.ra.to_numpy(), s.dec.to_numpy()))
    # ra_err/dec_err are the pixel errors times the pixel scale
    assert np.allclose(s.dec_err, s.y_err * 0.26 / 3600, rtol=1e-3)
    # fluxes in nJy
    r = s.psf_flux.to_numpy()[i[m]] / (2.5 * f.truth.flux.to_numpy()[m])
    assert abs(np.median(r) - 1) < 0.01


def test_exposure_step_masks_cosmic_rays_and_does_not_touch_input(result):
    f, exp, res = result
    cr = res.exposure.mask_of("CR")
    assert cr[f.cr_mask].mean() >= 0.95
    assert not exp.mask_of("CR").any()  # input untouched
    assert res.exposure.mask_of("DETECTED").sum() > 1000
    # background subtracted
    assert abs(np.median(res.exposure.image)) < 3


def test_exposure_step_requires_variance():
    exp = Exposure(np.zeros((64, 64), np.float32))
    with pytest.raises(ValidationError):
        characterize.run(exp)
