"""Second moments of stamps: adaptive (Gaussian-weighted) moments and the shape they describe.

Shared by the PSF models (:meth:`archive.image.psf.PSF.ellipticity` of pixelized
models), source measurement (:mod:`archive.process.measure`) and PSF estimation
(:mod:`archive.process.psf_estimate`). Offsets and moments are in pixels (px, px^2).
"""

from __future__ import annotations

import numpy as np


def weighted_sum(I: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``(I * g).sum(axis=(1, 2))`` (float64) for stamps ``I`` (m, S, S) and ``g`` broadcastable
    to them; a ``g`` constant along rows or columns is applied to ``I``'s marginal (no full
    temporary)."""
    if g.ndim == 3 and g.shape[1] == 1:
        return np.einsum("mq,mq->m", I.sum(axis=1, dtype=np.float64), np.broadcast_to(g[:, 0, :], (I.shape[0], I.shape[2])))
    if g.ndim == 3 and g.shape[2] == 1:
        return np.einsum("mp,mp->m", I.sum(axis=2, dtype=np.float64), np.broadcast_to(g[:, :, 0], (I.shape[0], I.shape[1])))
    return np.einsum("mpq,mpq->m", I, np.broadcast_to(g, I.shape), dtype=np.float64)


def adaptive_moments(D, U, ddx, ddy, s2, n_iter, half):
    """Adaptive second moments of stamps ``D`` about their centre offsets (px^2).

    ``D``, ``U``: stamps (m, S, S) and their usable pixels; ``ddx``, ``ddy``: pixel offsets
    from the centre (px), broadcastable to the stamps (e.g. (m, 1, S) and (m, S, 1));
    ``s2``: starting Gaussian variance (px^2); ``n_iter``: iterations; ``half``: the stamp
    half-size (px), which bounds the moments ((half / 2)^2 at most). The Gaussian weight
    follows the moments it measures; the weighted moments ``Q`` of a Gaussian ``C`` under
    the weight ``M`` satisfy ``Q^-1 = C^-1 + M^-1``, so at convergence the returned
    moments are those of the Gaussian that best matches the data. Returns
    ``(ixx, iyy, ixy, ok)`` (float64 arrays of m; ``ok`` False where the iteration failed,
    where the moments are ``(s2, s2, 0)``).
    """
    m = D.shape[0]
    mxx = np.full(m, s2)
    myy = np.full(m, s2)
    mxy = np.zeros(m)
    ok = np.ones(m, dtype=bool)
    lim = (half / 2.0) ** 2
    # the weighted pixels in float32 (their sums, ~1e-7 relative, are far below the noise)
    DU = np.where(U, D, 0).astype(np.float32)
    ddx = np.asarray(ddx, np.float32)
    ddy = np.asarray(ddy, np.float32)
    dxx, dyy, dxy = ddx * ddx, ddy * ddy, ddx * ddy
    q = np.empty(np.broadcast_shapes(DU.shape, dxy.shape), dtype=np.float32)
    for _ in range(max(1, n_iter)):
        det = mxx * myy - mxy * mxy
        ok &= det > 0
        det = np.where(det > 0, det, 1.0)
        ixx_, iyy_, ixy_ = myy / det, mxx / det, -mxy / det
        # Gaussian weight exp(-q / 2) of the current moments, times the usable data
        np.multiply((2.0 * ixy_).astype(np.float32)[:, None, None], dxy, out=q)
        q += ixx_.astype(np.float32)[:, None, None] * dxx
        q += iyy_.astype(np.float32)[:, None, None] * dyy
        # q >= 0 for a positive-definite weight; the clip only guards sources already failed
        np.clip(q, np.float32(0.0), np.float32(50.0), out=q)
        q *= np.float32(-0.5)
        np.exp(q, out=q)
        q *= DU
        s0 = q.sum(axis=(1, 2), dtype=np.float64)
        ok &= s0 > 0
        s0 = np.where(s0 > 0, s0, 1.0)
        qxx = weighted_sum(q, dxx) / s0
        qyy = weighted_sum(q, dyy) / s0
        qxy = weighted_sum(q, dxy) / s0
        # weighted moments Q of a Gaussian C under weight M satisfy Q^-1 = C^-1 + M^-1
        nxx, nyy, nxy = 2 * qxx, 2 * qyy, 2 * qxy
        bad = (nxx <= 0) | (nyy <= 0) | (nxx * nyy - nxy ** 2 <= 0) | (nxx > lim) | (nyy > lim) | ~np.isfinite(nxx + nyy + nxy)
        ok &= ~bad
        mxx = np.where(ok, nxx, mxx)
        myy = np.where(ok, nyy, myy)
        mxy = np.where(ok, nxy, mxy)
    mxx = np.where(ok, mxx, s2)
    myy = np.where(ok, myy, s2)
    mxy = np.where(ok, mxy, 0.0)
    return mxx, myy, mxy, ok


def moments_shape(ixx, iyy, ixy) -> tuple[np.ndarray, np.ndarray]:
    """Ellipticity ``1 - b/a`` and major-axis angle (deg from +x towards +y) of second
    moments ``(ixx, iyy, ixy)`` (px^2; arrays broadcast, scalars give 0-d results)."""
    ixx, iyy, ixy = (np.asarray(v, dtype=np.float64) for v in (ixx, iyy, ixy))
    tr = 0.5 * (ixx + iyy)
    d = np.sqrt(0.25 * (ixx - iyy) ** 2 + ixy ** 2)
    a2, b2 = tr + d, np.maximum(tr - d, 1e-12)
    e = 1.0 - np.sqrt(b2 / a2)
    theta = 0.5 * np.degrees(np.arctan2(2 * ixy, ixx - iyy))
    return e, theta
