"""Stable 64-bit identifiers, unique across backends, processes and runs.

Layout of an id (a positive int64, 63 usable bits)::

    | 41 bits: milliseconds since 2025-01-01T00:00:00Z | 22 bits: sequence |

* The time field makes ids roughly time ordered and confines any possible
  collision to ids minted in the *same millisecond* (41 bits last until 2094).
* The sequence field starts, for every new millisecond a process mints in, at
  a cryptographically random offset (``secrets``) and then counts up.  Within
  one process the ids are therefore strictly increasing (monotonic), and a
  batch that does not fit in the rest of the millisecond's sequence space
  borrows the following milliseconds (a logical clock that never runs
  backwards, also when the wall clock does).
* No coordination between processes is needed.  State is per process, guarded
  by a lock (thread safe) and reset in a forked child (``os.register_at_fork``)
  so a child never continues its parent's sequence.

Collision odds.  Two ids can only collide when two processes mint in the same
millisecond and their random sequence intervals overlap: for batches of k1 and
k2 ids that probability is about (k1 + k2) / 2**22.  For two writers each
minting 10 000 ids per visit every 30 s, the chance that their calls share a
millisecond is ~1/30 000 per visit, so the expected number of colliding events
is ~ 1/30 000 * 20 000 / 4.2e6 = 1.6e-7 per visit, or ~0.2 per million visits
(years of survey operations for a few writers).  That is comparable to or
better than a purely random 63-bit id (birthday bound N**2 / 2**64: 3 % at
1e9 ids) and, unlike it, does not grow with the size of the archive.  The
stores' primary keys reject a duplicate, so a collision is an error, never a
silent merge.
"""

from __future__ import annotations

import os
import secrets
import threading
import time

import numpy as np

#: Epoch of the time field: 2025-01-01T00:00:00Z, in Unix milliseconds.
EPOCH_MS = 1_735_689_600_000
SEQ_BITS = 22
TIME_BITS = 41
_SEQ_SPACE = 1 << SEQ_BITS
_SEQ_MASK = _SEQ_SPACE - 1
_MAX_TIME = (1 << TIME_BITS) - 1

_lock = threading.Lock()
_state = {"ms": -1, "seq": 0}  # logical millisecond and next free sequence number


def _reset_state() -> None:
    _state["ms"] = -1
    _state["seq"] = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_state)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000 - EPOCH_MS


def new_ids(n: int) -> np.ndarray:
    """Return ``n`` new unique, positive int64 ids, increasing within this process.

    Parameters
    ----------
    n : number of ids wanted (>= 0).

    Returns
    -------
    np.ndarray of dtype int64 and length ``n``; all values > 0 and strictly
    increasing within one process (also across calls).
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"new_ids: n must be >= 0, got {n}")
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    with _lock:
        now = _now_ms()
        if now < 0:
            raise RuntimeError("new_ids: the system clock is before 2025-01-01")
        if now > _state["ms"]:
            # a new millisecond: start at a random offset, leaving room for the
            # batch when it fits in one millisecond
            room = _SEQ_SPACE - min(n, _SEQ_SPACE // 2)
            _state["ms"] = now
            _state["seq"] = secrets.randbelow(room)
        filled = 0
        while filled < n:
            ms, seq = _state["ms"], _state["seq"]
            if ms > _MAX_TIME:
                raise RuntimeError("new_ids: the 41-bit time field is exhausted (year 2094)")
            take = min(n - filled, _SEQ_SPACE - seq)
            if take > 0:
                base = (ms << SEQ_BITS) | seq
                out[filled:filled + take] = np.arange(base, base + take, dtype=np.int64)
                filled += take
                _state["seq"] = seq + take
            if _state["seq"] >= _SEQ_SPACE:
                # borrow the next millisecond (logical clock); random start again
                # but low enough to keep going
                _state["ms"] = ms + 1
                _state["seq"] = secrets.randbelow(1 << 10)
    return out


def id_time_ms(ids: np.ndarray) -> np.ndarray:
    """Unix time in milliseconds encoded in ids made by :func:`new_ids` (logical clock)."""
    ids = np.asarray(ids, dtype=np.int64)
    return (ids >> SEQ_BITS) + EPOCH_MS


#: Exposure ids are ``visit * EXPOSURE_ID_DETECTORS + detector`` (detectors 0..999).
EXPOSURE_ID_DETECTORS = 1000


def exposure_id_of(visit, detector):
    """The archive's exposure id convention: ``visit * 1000 + detector``.

    Python ints in, a Python int out; arrays in, an int64 array out."""
    if np.ndim(visit) == 0 and np.ndim(detector) == 0:
        return int(visit) * EXPOSURE_ID_DETECTORS + int(detector)
    return (np.asarray(visit, dtype=np.int64) * EXPOSURE_ID_DETECTORS
            + np.asarray(detector, dtype=np.int64))


def visit_detector_of(exposure_id: int) -> tuple[int, int]:
    """(visit, detector) of an exposure id (the inverse of :func:`exposure_id_of`)."""
    return divmod(int(exposure_id), EXPOSURE_ID_DETECTORS)
