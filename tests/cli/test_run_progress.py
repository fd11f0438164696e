"""`archive run` shows each step by name with a bar on a terminal and ends with a summary that
stays; off a terminal only the per-step summaries and the one-line total."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest

from archive.api import Archive
from archive.sim.config import SimConfig
from archive.sim.survey import simulate_survey


def _on_terminal(args, cwd):
    """Run the command with stderr on a pseudo-terminal; (exit status, what the terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "archive", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


@pytest.fixture()
def registered(tmp_path):
    simulate_survey(tmp_path / "sim", SimConfig(seed=9, n_epochs=2, size=256, star_density=80, bad_epochs={},
                                                streak_epochs=(), n_bias=2, n_dark=2, n_flat=2))
    repo = tmp_path / "arc"
    with Archive.init(repo) as arc:
        arc.ingest_images([*sorted((tmp_path / "sim" / "raw").rglob("*.fits")),
                           *sorted((tmp_path / "sim" / "calib").rglob("*.fits"))])
        arc.ingest_refcat(tmp_path / "sim" / "refcat.parquet")
    return repo


def test_run_stages_on_a_terminal(registered, tmp_path):
    rc, shown = _on_terminal(["run", "--repo", registered, "--until", "calexp"], tmp_path)
    assert rc == 0, shown
    assert "calexp" in shown and "2/2" in shown and "unit" in shown  # the step's bar, by name
    last = [line for line in shown.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.startswith("run: 1 step(s), 2 unit(s) done"), shown


def test_run_off_a_terminal_prints_only_summaries(registered):
    done = subprocess.run([sys.executable, "-m", "archive", "run", "--repo", str(registered), "--until", "calexp"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("WARNING")]  # logging
    assert lines[0].startswith("calexp: 2 done") and lines[-1].startswith("run: 1 step(s), 2 unit(s) done")
    assert "unit/s" not in done.stderr and "\r" not in done.stderr
