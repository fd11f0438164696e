"""Identifiers: unique, positive, monotonic within a process, across threads and forks."""

import multiprocessing as mp
import threading
import time

import numpy as np
import pytest

from archive.catalog.ids import EPOCH_MS, id_time_ms, new_ids


def test_unique_positive_monotonic_across_calls():
    chunks = [new_ids(n) for n in (1, 0, 7, 5000, 3, 200_000, 1)]
    ids = np.concatenate(chunks)
    assert ids.dtype == np.int64
    assert ids.size == 1 + 7 + 5000 + 3 + 200_000 + 1
    assert (ids > 0).all()
    assert (np.diff(ids) > 0).all()  # strictly increasing within the process


def test_time_field_is_wall_clock():
    before = time.time_ns() // 1_000_000
    ids = new_ids(10)
    t = id_time_ms(ids)
    # logical clock may run ahead by a few ms after big batches, never behind
    assert (t >= before - 1).all() and (t <= before + 10_000).all()
    assert t.min() > EPOCH_MS


def test_negative_n_rejected():
    with pytest.raises(ValueError):
        new_ids(-1)


def test_threads_do_not_collide():
    out: list[np.ndarray] = []
    lock = threading.Lock()

    def work():
        for _ in range(50):
            ids = new_ids(100)
            with lock:
                out.append(ids)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = np.concatenate(out)
    assert np.unique(ids).size == ids.size == 4 * 50 * 100


def _child(q):
    q.put(new_ids(200))  # same-ms siblings collide with p ~ (k1+k2)/2**22


def test_forked_processes_do_not_collide():
    ctx = mp.get_context("fork")
    new_ids(10)  # parent has state; children must not continue it
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(q,)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    got.append(new_ids(200))
    ids = np.concatenate(got)
    assert np.unique(ids).size == ids.size
