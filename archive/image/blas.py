"""Matrix products in single-threaded BLAS tiles.

Shared by the PSF models (:mod:`archive.image.psf`) and the processing modules
(background splines, matched filters, PSF building), which import it from here.
"""

from __future__ import annotations

import numpy as np

#: largest product (m n k multiply-adds) that :func:`matmul_rows` hands to BLAS at once. OpenBLAS
#: runs products below ~5e5 on the calling thread; larger ones go to its worker threads, which
#: spin while they wait: on a machine whose cores are busy (several pipeline processes, other
#: jobs) a threaded product ran ~10x slower than the same work in single-threaded blocks.
TILE_MNK = 450_000


def matmul_rows(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` (2-D) computed in tiles of at most :data:`TILE_MNK` multiply-adds.

    Tiles are blocks of rows of ``a`` (and of columns of ``b`` when ``b`` is wide); each is one
    single-threaded BLAS product (see :data:`TILE_MNK`). The result equals one product up to
    float rounding and does not depend on thread scheduling.
    """
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=np.result_type(a, b))
    k = max(1, k)
    cols = n if 16 * k * n <= TILE_MNK else max(16, TILE_MNK // (64 * k))
    rows = max(1, TILE_MNK // (k * max(1, cols)))
    for c0 in range(0, n, cols):
        bc = b if cols >= n else b[:, c0:c0 + cols]
        for r0 in range(0, m, rows):
            np.matmul(a[r0:r0 + rows], bc, out=out[r0:r0 + rows, c0:c0 + cols])
    return out
