import math

import numpy as np
import pytest

from archive.image import Exposure
from archive.sim.calexp import make_calexp, simulate_calexps
from archive.sim.config import SimConfig
from archive.sim.render import render_epoch


def test_calexp_truth_and_noise(small, tmp_path):
    cfg, sky, eps = small["config"], small["sky"], small["epochs"]
    model = render_epoch(cfg, sky, eps[1], 0)
    exp = make_calexp(cfg, model, subtract_sky=True, cosmic_rays=True)
    clean = make_calexp(cfg, model, noise=False, subtract_sky=True)
    assert exp.info.visit == eps[1].visit and exp.info.band == "r" and exp.info.mjd == eps[1].mjd
    assert exp.photo_calib.njy_per_count == pytest.approx(model.njy_per_adu)
    # noise level: (image - noiseless) / sqrt(variance) is unit normal away from cosmic rays
    ok = ~exp.mask_of("CR", "SAT")
    pull = (exp.image - clean.image)[ok] / np.sqrt(exp.variance[ok])
    assert abs(pull.mean()) < 0.02 and pull.std() == pytest.approx(1.0, abs=0.02)
    if len(model.cosmic_rays):
        assert exp.mask_of("CR").any()
    # PSF-fit flux of bright, isolated stars, calibrated with the PhotoCalib, is the true flux in nJy
    src = model.sources
    stars = src[(src.kind == "star") & ~src.saturated & (src.flux_e > 5e3)]
    n = 0
    for _, s in stars.iterrows():
        if (np.hypot(src.x - s.x, src.y - s.y) < 25).sum() > 1:
            continue
        size = 21
        x0, y0 = exp.psf.stamp_origin(s.x, s.y, size)
        if x0 < 0 or y0 < 0 or x0 + size > cfg.nx or y0 + size > cfg.ny:
            continue
        p = exp.psf.image(s.x, s.y, size)
        data = clean.image[y0:y0 + size, x0:x0 + size]
        flux = (p * data).sum() / (p * p).sum()
        assert exp.photo_calib.to_njy(flux) == pytest.approx(s.flux_njy, rel=0.01)
        n += 1
    assert n >= 1
    # world coordinates of the truth positions through the exposure's WCS
    ra, dec = exp.wcs.all_pix2world(src.x, src.y, 0)
    np.testing.assert_allclose(ra, src.ra, atol=1e-9)
    # round trip through FITS keeps everything
    back = Exposure.read(exp.writeto(tmp_path / "calexp.fits"))
    assert back.image.tobytes() == exp.image.tobytes() and back.psf == exp.psf
    assert back.photo_calib == exp.photo_calib


def test_simulate_calexps_series():
    cfg = SimConfig(size=128, n_epochs=3, seed=8)
    exps, sources, objects = simulate_calexps(cfg, noise=False)
    assert len(exps) == 3 and sorted(sources.visit.unique()) == [1, 2, 3]
    assert [e.info.visit for e in exps] == [1, 2, 3]
    fwhm = [e.psf.fwhm() for e in exps]
    assert len(set(fwhm)) == 3  # seeing changes from epoch to epoch
    assert set(sources.object_id) <= set(objects.object_id)
    assert all(math.isfinite(e.info.mjd) for e in exps)
