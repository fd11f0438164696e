"""ZOGY proper subtraction (archive.process.diffim.zogy) on pairs made here with numpy.

Science and template: Gaussian or (spatially varying) Moffat PSFs of different widths,
Gaussian noise with the variance each exposure's variance plane states (sky plus source
noise, gain 1 nJy^-1, so the bright stars are source-noise dominated), stars constant
between the two, transients of known flux in the science only, stars that brightened, a
NO_DATA corner in the template, cosmic rays in the science and a bad column in the
template.  Objects sit on a jittered grid (>= 16 px apart) so each is measured alone.
PSF fluxes on the difference: ``f = sum(P D / V) / sum(P^2 / V)``,
``err = sum(P^2 / V)^-1/2`` with P the difference's own PSF (``difference.psf``).

Figures of the current code (seeded; 1024^2; science FWHM 4, template 2.8, sigma 10 / 6):
empty-sky pixels std(D / sqrt(V)) 1.000, apertures r = 3 / 6 px 0.975 / 0.991, score 1.004;
constant stars (300 .. 3e5 nJy) pulls mean -0.02, std 1.07 (score at them 1.05); transients
pulls mean 0.04, std 1.00, score >= 7.1 for all 40 of S/N > 7; no-change pair: 160 / 36 / 3 / 0
peaks of the score above 3.5 / 4 / 4.5 / 5 sigma against 221 / 39 / 5.2 / 0.5 expected (434
above 5 sigma without the source-noise correction); varying Moffat PSFs: corner / middle
pulls 0.96 / 0.94 with 256 px cores, 1.01 / 1.05 with one bilinear 1024 px core, 7.5 / 2.3
with one constant core, 1.53 / 1.55 with constant 256 px cores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from archive.errors import ValidationError
from archive.image import mask as maskmod
from archive.image.exposure import Exposure
from archive.image.psf import GaussianPSF, MoffatPSF, add_point_sources
from archive.process.diffim.result import DifferenceResult
from archive.process.diffim.zogy import ZogyConfig, zogy_difference

SIZE = 1024
SIG_N, SIG_R = 10.0, 6.0  # background sigma of science and template (nJy / px)
GAIN = 1.0  # source-noise variance = flux per pixel / GAIN
CR = 1 << maskmod.CR
BAD = 1 << maskmod.BAD
NO_DATA = 1 << maskmod.NO_DATA


# --------------------------------------------------------------------------- helpers
def grid_positions(rng, size=SIZE, spacing=40, start=32, jitter=10.0):
    g = np.arange(start, size - start + 1, spacing, dtype=float)
    x, y = np.meshgrid(g, g)
    x = x.ravel() + rng.uniform(-jitter, jitter, x.size)
    y = y.ravel() + rng.uniform(-jitter, jitter, y.size)
    order = rng.permutation(x.size)
    return x[order], y[order]


def render(shape, psf, x, y, flux):
    img = np.zeros(shape)
    if len(x):
        add_point_sources(img, psf, x, y, flux)
    return img


def noisy(model, sigma, rng):
    var = sigma ** 2 + np.maximum(model, 0.0) / GAIN
    return model + rng.standard_normal(model.shape) * np.sqrt(var), var


def psf_fit(exp: Exposure, x, y, size=15):
    """PSF flux and error at fixed positions on ``exp`` with its own PSF; ``clean``: no masked
    pixel in the stamp."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    p = exp.psf.stamps(x, y, size)
    h = size // 2
    x0 = np.floor(x + 0.5).astype(int) - h
    y0 = np.floor(y + 0.5).astype(int) - h
    iy = y0[:, None, None] + np.arange(size)[None, :, None]
    ix = x0[:, None, None] + np.arange(size)[None, None, :]
    d = exp.image[iy, ix].astype(float)
    v = exp.variance[iy, ix].astype(float)
    m = exp.mask[iy, ix]
    w = np.where(np.isfinite(v) & (v > 0), 1.0 / np.where(v > 0, v, 1.0), 0.0)
    a = (p * p * w).sum(axis=(1, 2))
    clean = (m == 0).all(axis=(1, 2)) & (a > 0)
    a = np.where(a > 0, a, np.nan)  # a stamp wholly on NO_DATA: NaN flux, not clean
    return (p * d * w).sum(axis=(1, 2)) / a, 1.0 / np.sqrt(a), clean


def score_at(score, x, y, r=1):
    """Largest score within r px of each position."""
    ix = np.rint(x).astype(int)
    iy = np.rint(y).astype(int)
    off = np.arange(-r, r + 1)
    return score[iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]].max(axis=(1, 2))


def peaks(img, threshold, valid):
    """Local maxima (3x3) above threshold inside ``valid``."""
    mx = ndimage.maximum_filter(img, size=3, mode="nearest")
    return int(((img == mx) & (img > threshold) & valid).sum())


# --------------------------------------------------------------------------- the main pair
@pytest.fixture(scope="module")
def static_pair():
    """Constant Gaussian PSFs (science 4.0 px, template 2.8 px): 400 constant stars, 60
    transients, 20 brightened stars, template NO_DATA corner, CRs, a bad template column."""
    rng = np.random.default_rng(18)
    shape = (SIZE, SIZE)
    x, y = grid_positions(rng)
    ns, nt, nb = 400, 60, 20
    sx, sy = x[:ns], y[:ns]
    sf = np.exp(rng.uniform(np.log(300.0), np.log(3e5), ns))
    tx, ty = x[ns:ns + nt], y[ns:ns + nt]
    tf = np.exp(rng.uniform(np.log(200.0), np.log(3000.0), nt))  # S/N ~3..45
    bx, by = x[ns + nt:ns + nt + nb], y[ns + nt:ns + nt + nb]
    bf = np.exp(rng.uniform(np.log(1000.0), np.log(3e4), nb))
    bd = np.exp(rng.uniform(np.log(400.0), np.log(2500.0), nb))  # brightening
    pn, pr = GaussianPSF(fwhm=4.0), GaussianPSF(fwhm=2.8)
    mn = render(shape, pn, np.r_[sx, tx, bx], np.r_[sy, ty, by], np.r_[sf, tf, bf + bd])
    mr = render(shape, pr, np.r_[sx, bx], np.r_[sy, by], np.r_[sf, bf])
    n_img, n_var = noisy(mn, SIG_N, rng)
    r_img, r_var = noisy(mr, SIG_R, rng)
    n_mask = np.zeros(shape, np.int32)
    r_mask = np.zeros(shape, np.int32)
    # cosmic rays: single pixels and 2-px pairs, up to 2e4 nJy, masked CR
    cy, cx = rng.integers(20, SIZE - 20, 150), rng.integers(20, SIZE - 20, 150)
    n_img[cy, cx] += rng.uniform(2e3, 2e4, 150)
    n_img[cy[:50] + 1, cx[:50]] += rng.uniform(2e3, 2e4, 50)
    n_mask[cy, cx] |= CR
    n_mask[cy[:50] + 1, cx[:50]] |= CR
    # and on the cores of bright stars: cosmic rays in the science (one 2 px), hot pixels in the
    # template
    hit = np.argsort(-sf)[:12]
    hy, hx = np.rint(sy[hit]).astype(int), np.rint(sx[hit]).astype(int)
    n_img[hy[:6], hx[:6]] += 1e4
    n_mask[hy[:6], hx[:6]] |= CR
    n_img[hy[0], hx[0] + 1] += 1e4
    n_mask[hy[0], hx[0] + 1] |= CR
    # a hot template column and a NO_DATA corner (image 0, variance inf, as a warp leaves it)
    r_img[100:400, 600] += 1e4
    r_mask[100:400, 600] |= BAD
    r_img[hy[6:], hx[6:]] += 5e3
    r_mask[hy[6:], hx[6:]] |= BAD
    r_img[800:, :200] = 0.0
    r_var[800:, :200] = np.inf
    r_mask[800:, :200] |= NO_DATA
    sci = Exposure(n_img, n_mask, n_var, psf=pn)
    tpl = Exposure(r_img, r_mask, r_var, psf=pr)
    res = zogy_difference(sci, tpl, ZogyConfig(subimage_size=512))
    objects = np.zeros(shape, bool)
    objects[np.rint(np.r_[sy, ty, by]).astype(int), np.rint(np.r_[sx, tx, bx]).astype(int)] = True
    return {"res": res, "sci": sci, "tpl": tpl, "stars": (sx, sy, sf), "hit": (hx, hy), "transients": (tx, ty, tf),
            "brightened": (bx, by, bf, bd), "objects": objects, "masked": (n_mask | r_mask) != 0}


def test_result_shape_and_mask(static_pair):
    res: DifferenceResult = static_pair["res"]
    d = res.difference
    assert res.method == "zogy"
    assert d.shape == (SIZE, SIZE) and res.score.shape == (SIZE, SIZE)
    assert d.image.dtype == np.float32 and res.score.dtype == np.float32
    # the mask is the OR of both inputs' masks, not grown, and EDGE on the frame's border
    # where a PSF reaches past it (edge_border_px: x, y)
    bx, by = res.metadata["edge_border_px"]
    assert 1 <= bx <= res.metadata["edge_reach_px"] and 1 <= by <= res.metadata["edge_reach_px"]
    edge = np.zeros(d.shape, bool)
    edge[:by], edge[-by:], edge[:, :bx], edge[:, -bx:] = True, True, True, True
    expected = static_pair["sci"].mask | static_pair["tpl"].mask | np.where(edge, np.int32(d.get_plane_bitmask("EDGE")), 0)
    np.testing.assert_array_equal(d.mask, expected)
    nd = d.mask_of("NO_DATA")
    assert nd.sum() == 224 * 200
    assert np.all(np.isinf(d.variance[nd])) and np.all(d.image[nd] == 0) and np.all(res.score[nd] == 0)
    assert np.all(np.isfinite(d.variance[~nd])) and np.all(np.isfinite(d.image)) and np.all(np.isfinite(res.score))
    meta = res.metadata
    assert meta["flux_ratio"] == 1.0 and meta["n_subimages"] == 4 and len(meta["subimages"]) == 4
    for sub in meta["subimages"]:
        # background sigmas read from the variance planes; difference sigma = sqrt(sn^2 + sr^2)
        assert sub["sigma_science"] == pytest.approx(SIG_N, rel=0.02)
        assert sub["sigma_template"] == pytest.approx(SIG_R, rel=0.02)
        assert sub["sigma_difference"] == pytest.approx(math.hypot(SIG_N, SIG_R), rel=0.02)


def test_difference_psf(static_pair):
    """difference.psf is P_D = P_r P_n / sqrt(a |P_r|^2 + c |P_n|^2) (unit sum), as computed here."""
    d = static_pair["res"].difference
    ks = static_pair["res"].metadata["kernel_size"]
    g = 128
    a, c = SIG_N ** 2 / (SIG_N ** 2 + SIG_R ** 2), SIG_R ** 2 / (SIG_N ** 2 + SIG_R ** 2)

    def ft(psf):
        k = np.zeros((g, g))
        k[:ks, :ks] = psf.kernel(0, 0, ks)
        return np.fft.fft2(np.roll(k, (-(ks // 2), -(ks // 2)), axis=(0, 1)))

    pn, pr = ft(static_pair["sci"].psf), ft(static_pair["tpl"].psf)
    pd = np.real(np.fft.ifft2(pr * pn / np.sqrt(a * np.abs(pr) ** 2 + c * np.abs(pn) ** 2)))
    pd = np.roll(pd, (ks // 2, ks // 2), axis=(0, 1))[:ks, :ks]
    pd /= pd.sum()
    for x, y in ((100, 100), (512, 512), (900, 300)):
        k = d.psf.kernel(x, y, ks)
        assert k.sum() == pytest.approx(1.0, abs=1e-9)
        assert np.abs(k - pd).max() < 1e-4 * pd.max() + 1e-7
    # close to the broader input's (the science's) effective width, above the template's
    fw = d.psf.fwhm(512, 512)
    assert static_pair["tpl"].psf.effective_fwhm() < fw
    assert fw == pytest.approx(static_pair["sci"].psf.effective_fwhm(), rel=0.05)


def test_noise_matches_variance_in_empty_regions(static_pair):
    """(a) pixel and aperture level: std(D / sqrt(V)) within 10 % of 1 away from objects."""
    res = static_pair["res"]
    d = res.difference
    far = ndimage.distance_transform_edt(~static_pair["objects"]) > 15
    far &= ndimage.distance_transform_edt(~static_pair["masked"]) > 10
    z = d.image[far] / np.sqrt(d.variance[far])
    assert far.sum() > 200_000
    assert abs(np.std(z) - 1.0) < 0.05, np.std(z)
    assert abs(np.mean(z)) < 0.01
    # on empty sky the variance plane is sigma_n^2 + sigma_r^2
    assert np.median(d.variance[far]) == pytest.approx(SIG_N ** 2 + SIG_R ** 2, rel=0.02)
    # apertures: the noise is white, so the summed variance predicts the summed flux's scatter
    rng = np.random.default_rng(7)
    ok = ndimage.distance_transform_edt(far) > 7
    ok[:8] = ok[-8:] = False
    ok[:, :8] = ok[:, -8:] = False
    cand = np.argwhere(ok)
    pick = cand[rng.choice(len(cand), 1500, replace=False)]
    for r in (3, 6):
        off = np.arange(-r, r + 1)
        disk = (off[:, None] ** 2 + off[None, :] ** 2) <= r * r
        oy, ox = np.nonzero(disk)
        iy = pick[:, 0, None] + oy - r
        ix = pick[:, 1, None] + ox - r
        flux = d.image[iy, ix].sum(axis=1)
        err = np.sqrt(d.variance[iy, ix].sum(axis=1))
        ratio = np.std(flux / err)
        assert 0.9 < ratio < 1.1, (r, ratio)
    # the score is unit-variance there
    assert abs(np.std(res.score[far]) - 1.0) < 0.05


def test_constant_stars_leave_noise(static_pair):
    """(b) normalised PSF-flux residuals at the constant stars: mean ~0, sigma in 0.8-1.25,
    from S/N 6 to several thousand (the bright ones dominated by source noise); their score
    has unit scatter too (the source-noise correction)."""
    sx, sy, sf = static_pair["stars"]
    d = static_pair["res"].difference
    f, e, clean = psf_fit(d, sx, sy)
    pull = (f / e)[clean]
    assert clean.sum() > 300
    assert abs(pull.mean()) < 3.0 / math.sqrt(pull.size) + 0.05, pull.mean()
    assert 0.8 < pull.std() < 1.25, pull.std()
    faint = (sf[clean] < 3000)
    assert 0.8 < pull[faint].std() < 1.2
    s = static_pair["res"].score[np.rint(sy).astype(int), np.rint(sx).astype(int)][clean]
    assert 0.8 < s.std() < 1.25 and np.abs(s).max() < 5.0


def test_transients_recovered(static_pair):
    """(c) transients in the science only: PSF flux within errors of the truth, the score
    above 5 for S/N > 7; the stars that brightened show their change."""
    res = static_pair["res"]
    d = res.difference
    tx, ty, tf = static_pair["transients"]
    f, e, clean = psf_fit(d, tx, ty)
    pull = ((f - tf) / e)[clean]
    assert clean.sum() > 50
    assert np.abs(pull).max() < 4.0
    assert abs(pull.mean()) < 0.4 and 0.75 < pull.std() < 1.25, (pull.mean(), pull.std())
    snr = (tf / e)[clean]
    sc = score_at(res.score, tx, ty)[clean]
    bright = snr > 7
    assert bright.sum() > 30
    assert np.all(sc[bright] > 5.0), sc[bright].min()
    # the score is the matched-filter S/N: close to the PSF-fit S/N
    assert np.median(sc[bright] / snr[bright]) == pytest.approx(1.0, abs=0.1)
    # brightened stars: the difference flux is the change
    bx, by, bf, bd = static_pair["brightened"]
    f, e, clean = psf_fit(d, bx, by)
    pull = ((f - bd) / e)[clean]
    assert clean.sum() >= 15 and np.abs(pull).max() < 4.0
    sc = score_at(res.score, bx, by)[clean]
    snr = (bd / e)[clean]
    # their own source noise counts in the score: S/N 7 by the PSF fit is a bit less there
    assert np.all(sc[snr > 9] > 5.0) and (sc[snr > 7] > 5.0).mean() >= 0.8


def test_masked_pixels_do_not_spread(static_pair):
    """(f) cosmic rays of up to 2e4 nJy (some on stars), a hot template column and a NO_DATA
    corner: their neighbours' noise is as predicted and nothing reaches 5 sigma there.  A
    cosmic ray on a star is interpolated over and its value then re-solved so that the
    difference around it is flattest; without that step the interpolation error shows."""
    res = static_pair["res"]
    d = res.difference
    masked = static_pair["masked"]
    far_obj = ndimage.distance_transform_edt(~static_pair["objects"]) > 15
    dist = ndimage.distance_transform_edt(~masked)
    ring = (dist > 0) & (dist <= 12) & far_obj
    assert ring.sum() > 20_000
    z = d.image[ring] / np.sqrt(d.variance[ring])
    assert abs(z.std() - 1.0) < 0.1 and np.abs(z).max() < 5.5, (z.std(), np.abs(z).max())
    assert np.abs(res.score[ring]).max() < 5.5
    # right next to the cosmic rays and the bad column (1-2 px), stars included
    crs = (static_pair["sci"].mask | static_pair["tpl"].mask) & (CR | BAD) != 0
    dcr = ndimage.distance_transform_edt(~crs)
    near = (dcr > 0) & (dcr <= 2) & ~d.mask_of("NO_DATA")
    assert (near & ~far_obj).sum() > 100
    assert np.abs(d.image[near] / np.sqrt(d.variance[near])).max() < 5.0
    hx, hy = static_pair["hit"]
    plain = zogy_difference(static_pair["sci"], static_pair["tpl"], ZogyConfig(refine_masked=False))
    for sl in (slice(0, 6), slice(6, 12)):  # science cosmic rays, template hot pixels on star cores
        hit = np.zeros_like(masked)
        hit[hy[sl], hx[sl]] = True
        around = (ndimage.distance_transform_edt(~hit) <= 6) & ~crs
        assert np.abs(d.image[around] / np.sqrt(d.variance[around])).max() < 5.0
        assert np.abs(res.score[around]).max() < 5.0
        zp = np.abs(plain.difference.image[around] / np.sqrt(plain.difference.variance[around])).max()
        # the template's filter is the wide one: its interpolation error spreads without the step
        assert zp > 8.0 if sl.start == 6 else zp < 5.0, zp
    assert res.metadata["refined_pixels"] >= 7
    # along the NO_DATA edge (away from the stars it cuts)
    edge = np.zeros_like(masked)
    edge[790:800, :200] = True
    edge[800:, 200:210] = True
    edge &= far_obj
    ze = d.image[edge] / np.sqrt(d.variance[edge])
    assert abs(ze.std() - 1.0) < 0.15 and np.abs(ze).max() < 5.0


# --------------------------------------------------------------------------- no change
def test_no_change_pair_false_positives():
    """(d) two noise realisations of one static sky (stars up to 3e5 nJy, source-noise
    dominated): the peaks of the score above 3.5, 4, 4.5 sigma are within 2x of the
    expectation for a Gaussian random field with the score's own smoothness (the Euler
    characteristic of its excursion set, ``A lambda u exp(-u^2 / 2) / (2 pi)^1.5`` per sign,
    lambda = var(dS/dx) from P_D's power spectrum; ~1/3 of a 5-sigma peak over the image),
    and at most 2 above 5 sigma.  Without the source-noise correction the bright stars make
    dozens."""
    rng = np.random.default_rng(5)
    shape = (SIZE, SIZE)
    x, y = grid_positions(rng, spacing=32, jitter=8)
    f = np.exp(rng.uniform(np.log(300.0), np.log(3e5), x.size))
    pn, pr = GaussianPSF(fwhm=3.6), GaussianPSF(fwhm=2.6)
    n_img, n_var = noisy(render(shape, pn, x, y, f), SIG_N, rng)
    r_img, r_var = noisy(render(shape, pr, x, y, f), SIG_R, rng)
    sci = Exposure(n_img, None, n_var, psf=pn)
    tpl = Exposure(r_img, None, r_var, psf=pr)
    res = zogy_difference(sci, tpl)
    valid = np.zeros(shape, bool)
    valid[4:-4, 4:-4] = True
    area = valid.sum()
    # smoothness of the score: S = D * P_D with D white, so its spectrum is |P_D^|^2
    ks = res.metadata["kernel_size"]
    k = np.zeros((256, 256))
    k[:ks, :ks] = res.difference.psf.kernel(512, 512, ks)
    p2 = np.abs(np.fft.fft2(k)) ** 2
    fx = np.fft.fftfreq(256)[None, :]
    lam = float(((2 * np.pi * fx) ** 2 * p2).sum() / p2.sum())

    def expected(u):
        return 2 * area * lam * u * math.exp(-u * u / 2) / (2 * math.pi) ** 1.5  # both signs

    s = res.score
    for u in (3.5, 4.0, 4.5):
        n = peaks(s, u, valid) + peaks(-s, u, valid)
        e = expected(u)
        assert e / 2 <= n <= 2 * e, (u, n, e)
    assert peaks(s, 5.0, valid) + peaks(-s, 5.0, valid) <= 2
    assert expected(5.0) < 1.0
    # the difference itself: normalised pixels Gaussian to 5 sigma
    z = res.difference.image / np.sqrt(res.difference.variance)
    assert abs(z.std() - 1.0) < 0.03
    # without the source-noise correction the bright stars' Poisson noise makes false peaks
    plain = zogy_difference(sci, tpl, ZogyConfig(source_noise=False))
    n5 = peaks(plain.score, 5.0, valid) + peaks(-plain.score, 5.0, valid)
    assert n5 > 20, n5


# --------------------------------------------------------------------------- varying PSF
@pytest.fixture(scope="module")
def varying_pair():
    rng = np.random.default_rng(3)
    shape = (SIZE, SIZE)
    bb = (0.0, 0.0, SIZE - 1.0, SIZE - 1.0)
    pn = MoffatPSF(3.6, beta=3.0, variation=[0.15, 0.10], bbox=bb)  # FWHM 2.7 .. 4.5 px
    pr = MoffatPSF(2.8, beta=3.5, variation=[-0.08, 0.12], bbox=bb)  # 2.4 .. 3.4 px
    x, y = grid_positions(rng, spacing=32, jitter=8)
    f = np.exp(rng.uniform(np.log(1e3), np.log(3e4), x.size))
    n_img, n_var = noisy(render(shape, pn, x, y, f), SIG_N, rng)
    r_img, r_var = noisy(render(shape, pr, x, y, f), SIG_R, rng)
    return Exposure(n_img, None, n_var, psf=pn), Exposure(r_img, None, r_var, psf=pr), (x, y, f)


def _region_pulls(res, x, y):
    f, e, clean = psf_fit(res.difference, x, y, size=21)
    pull = f / e
    corner = (np.minimum(x, SIZE - x) < 200) & (np.minimum(y, SIZE - y) < 200) & clean
    middle = (np.abs(x - SIZE / 2) < 200) & (np.abs(y - SIZE / 2) < 200) & clean
    return pull[corner], pull[middle]


def test_spatially_varying_psf(varying_pair):
    """(e) Moffat PSFs whose FWHM changes by +-25 % (science) and +-20 % (template) over the
    image, differently: with 256 px sub-images the residuals of constant stars in the corners
    are as good as in the middle, and so they are with one 1024 px core whose filters are
    interpolated between its corners' PSFs; one FFT over the whole image with the central
    PSFs only (``psf_interpolation="constant"``) leaves the corners' residuals several times
    the noise, and 256 px cores with constant filters leave the bright stars' twice."""
    sci, tpl, (x, y, f) = varying_pair
    res = zogy_difference(sci, tpl, ZogyConfig(subimage_size=256))
    corner, middle = _region_pulls(res, x, y)
    assert corner.size > 80 and middle.size > 80
    for p in (corner, middle):
        assert abs(p.mean()) < 0.3 and 0.8 < p.std() < 1.25, (p.mean(), p.std())
    assert corner.std() < 1.25 * middle.std()
    sc = res.score[np.rint(y).astype(int), np.rint(x).astype(int)]
    assert np.abs(sc).max() < 5.0
    # the difference's PSF follows the inputs' variation
    fw = res.difference.psf.fwhm(np.array([100.0, 924.0]), np.array([100.0, 924.0]))
    assert fw[1] > fw[0] * 1.2
    one = zogy_difference(sci, tpl, ZogyConfig(subimage_size=SIZE))
    assert one.metadata["n_subimages"] == 1
    corner1, middle1 = _region_pulls(one, x, y)
    assert corner1.std() < 1.25 and middle1.std() < 1.25, (corner1.std(), middle1.std())
    const = zogy_difference(sci, tpl, ZogyConfig(subimage_size=SIZE, psf_interpolation="constant"))
    corner1, _ = _region_pulls(const, x, y)
    assert corner1.std() > 3 * corner.std(), (corner1.std(), corner.std())
    const = zogy_difference(sci, tpl, ZogyConfig(subimage_size=256, psf_interpolation="constant"))
    fl, e, _ = psf_fit(const.difference, x, y, size=21)
    bright = f > 1e4
    assert np.std(fl[bright] / e[bright]) > 1.4


# --------------------------------------------------------------------------- options
def _small_pair(seed, shift=0.0, scale=1.0, offset=0.0, size=512):
    rng = np.random.default_rng(seed)
    shape = (size, size)
    x, y = grid_positions(rng, size=size, spacing=32, jitter=8)
    f = np.exp(rng.uniform(np.log(1e3), np.log(3e5), x.size))
    pn, pr = GaussianPSF(fwhm=3.5), GaussianPSF(fwhm=2.5)
    n_img, n_var = noisy(render(shape, pn, x, y, f * scale), SIG_N, rng)
    r_img, r_var = noisy(render(shape, pr, x + shift, y, f), SIG_R, rng)
    return (Exposure(n_img + offset, None, n_var, psf=pn), Exposure(r_img, None, r_var, psf=pr), (x, y, f))


def test_flux_ratio_and_background_fit():
    """Science 8 % brighter than the template and 5 nJy above it: the fitted flux ratio is
    within 0.5 % (and its error) of 1.08, the background offset is removed and the constant
    stars' residuals are noise again; without the fits they are not."""
    sci, tpl, (x, y, f) = _small_pair(11, scale=1.08, offset=5.0)
    res = zogy_difference(sci, tpl, ZogyConfig(fit_flux_ratio=True, fit_background=True, subimage_size=256))
    m = res.metadata
    assert m["flux_ratio_fitted"] and m["flux_ratio"] == pytest.approx(1.08, rel=0.005)
    assert abs(m["flux_ratio"] - 1.08) < 4 * m["flux_ratio_error"] + 1e-3
    assert np.median([s["background_offset"] for s in m["subimages"]]) == pytest.approx(5.0, abs=1.0)
    fl, e, _ = psf_fit(res.difference, x, y)
    pull = fl / e
    assert abs(pull.mean()) < 0.3 and 0.8 < pull.std() < 1.3, (pull.mean(), pull.std())
    assert abs(np.median(res.difference.image)) < 0.2
    plain = zogy_difference(sci, tpl, ZogyConfig(subimage_size=256))
    fl, e, _ = psf_fit(plain.difference, x, y)
    assert np.std(fl / e) > 5


@pytest.mark.parametrize("fwhm_n, fwhm_r", [(4.0, 2.8), (2.8, 4.0)])
def test_variance_plane_modes(fwhm_n, fwhm_r):
    """Bright constant stars (1e4-2e5 nJy, source-noise dominated), science broader or
    sharper than the template.  variance_plane="psf" (default): PSF-fit pulls have unit
    scatter on every star; "pixel": each pixel's own variance, so D / sqrt(V) has unit scatter
    pixel by pixel on the stars' cores (where its PSF fits are off: the filters correlate the
    source noise).  Both equal sigma_n^2 + sigma_r^2 on empty sky."""
    rng = np.random.default_rng(int(fwhm_n * 10))
    shape = (512, 512)
    x, y = grid_positions(rng, size=512, spacing=32, jitter=8)
    f = np.exp(rng.uniform(np.log(1e4), np.log(2e5), x.size))
    pn, pr = GaussianPSF(fwhm=fwhm_n), GaussianPSF(fwhm=fwhm_r)
    n_img, n_var = noisy(render(shape, pn, x, y, f), SIG_N, rng)
    r_img, r_var = noisy(render(shape, pr, x, y, f), SIG_R, rng)
    sci, tpl = Exposure(n_img, None, n_var, psf=pn), Exposure(r_img, None, r_var, psf=pr)
    stars = np.zeros(shape, bool)
    stars[np.rint(y).astype(int), np.rint(x).astype(int)] = True
    dist = ndimage.distance_transform_edt(~stars)
    psf = zogy_difference(sci, tpl)
    pix = zogy_difference(sci, tpl, ZogyConfig(variance_plane="pixel"))
    np.testing.assert_array_equal(psf.difference.image, pix.difference.image)
    for res in (psf, pix):
        assert np.median(res.difference.variance[dist > 15]) == pytest.approx(SIG_N ** 2 + SIG_R ** 2, rel=0.01)
    fl, e, _ = psf_fit(psf.difference, x, y)
    assert 0.9 < np.std(fl / e) < 1.12 and abs(np.mean(fl / e)) < 0.2, (np.mean(fl / e), np.std(fl / e))
    core = dist <= 3
    z = pix.difference.image[core] / np.sqrt(pix.difference.variance[core])
    assert 0.93 < z.std() < 1.07, z.std()


def test_astrometric_correction():
    """A 0.08 px registration error: bright constant stars leave dipoles that the plain score
    calls significant; with astrometric_rms = 0.08 px the corrected score stays below 5 at
    every star while a transient keeps its score."""
    sci, tpl, (x, y, f) = _small_pair(12, shift=0.08)
    plain = zogy_difference(sci, tpl)
    at = np.abs(score_at(plain.score, x, y, r=3))
    assert (at > 5).sum() > 10
    cor = zogy_difference(sci, tpl, ZogyConfig(astrometric_rms=0.08))
    assert cor.metadata["astrometric_rms_px"] == 0.08
    at = np.abs(score_at(cor.score, x, y, r=3))
    assert at.max() < 5.0, at.max()
    # away from stars the score is unchanged (the correction only acts on gradients)
    stars = np.zeros(sci.shape, bool)
    stars[np.rint(y).astype(int), np.rint(x).astype(int)] = True
    far = ndimage.distance_transform_edt(~stars) > 12
    np.testing.assert_allclose(cor.score[far], plain.score[far], rtol=0.02, atol=0.02)


def test_odd_sizes_and_edges():
    """An image that is not a multiple of the sub-image size, with a transient at its edge:
    cores of unequal size tile it exactly, and the mirrored margins leave no edge artefact."""
    rng = np.random.default_rng(2)
    shape = (301, 437)
    pn, pr = GaussianPSF(fwhm=3.0), GaussianPSF(fwhm=2.2)
    n_img, n_var = noisy(render(shape, pn, [5.0, 200.0], [150.0, 293.0], [3000.0, 3000.0]), SIG_N, rng)
    r_img, r_var = noisy(np.zeros(shape), SIG_R, rng)
    res = zogy_difference(Exposure(n_img, None, n_var, psf=pn), Exposure(r_img, None, r_var, psf=pr),
                          ZogyConfig(subimage_size=128))
    assert res.metadata["n_subimages"] == 3 * 4
    boxes = [s["box"] for s in res.metadata["subimages"]]
    cover = np.zeros(shape, int)
    for x0, y0, x1, y1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert np.all(cover == 1)
    d = res.difference
    f, e, _ = psf_fit(d, [200.0], [293.0], size=11)
    assert abs(f[0] - 3000.0) < 4 * e[0]
    assert score_at(res.score, np.array([5.0, 200.0]), np.array([150.0, 293.0])).min() > 5
    z = d.image / np.sqrt(d.variance)
    z[140:161, :16] = 0
    z[282:, 189:212] = 0
    assert abs(z.std() - 1.0) < 0.05 and np.abs(z).max() < 5.5


def test_config_and_input_errors():
    from archive.pipeline.config import config_from_dict, config_to_json

    cfg = config_from_dict(ZogyConfig, {"subimage_size": 256, "astrometric_rms": 0.05,
                                        "fill_planes": ["NO_DATA", "CR"]})
    assert cfg.subimage_size == 256 and cfg.fill_planes == ("NO_DATA", "CR")
    assert config_from_dict(ZogyConfig, __import__("json").loads(config_to_json(cfg))) == cfg
    with pytest.raises(ValidationError, match="subimage_size"):
        config_from_dict(ZogyConfig, {"subimage_size": 16})
    with pytest.raises(ValidationError, match="astrometric_rms_unit"):
        config_from_dict(ZogyConfig, {"astrometric_rms_unit": "deg"})
    with pytest.raises(ValidationError, match="kernel_size must be odd"):
        config_from_dict(ZogyConfig, {"kernel_size": 20})
    with pytest.raises(ValidationError, match="NO_DATA"):
        config_from_dict(ZogyConfig, {"fill_planes": ["CR"]})
    psf = GaussianPSF(fwhm=3.0)
    a = Exposure(np.zeros((64, 64)), None, np.ones((64, 64)), psf=psf)
    with pytest.raises(ValidationError, match="shape"):
        zogy_difference(a, Exposure(np.zeros((64, 65)), None, np.ones((64, 65)), psf=psf))
    with pytest.raises(ValidationError, match="template exposure has no PSF"):
        zogy_difference(a, Exposure(np.zeros((64, 64)), None, np.ones((64, 64))))
    with pytest.raises(ValidationError, match="science exposure's variance"):
        zogy_difference(Exposure(np.zeros((64, 64)), psf=psf), a)
    nd = Exposure(np.zeros((64, 64)), np.full((64, 64), NO_DATA, np.int32), np.ones((64, 64)), psf=psf)
    with pytest.raises(ValidationError, match="no pixel is covered"):
        zogy_difference(a, nd)
    with pytest.raises(ValidationError, match="WCS"):
        zogy_difference(a, a, ZogyConfig(astrometric_rms=0.1, astrometric_rms_unit="arcsec"))
