"""Progress of long commands: named stages, a bar on a terminal, a summary line that stays.

On a terminal (stderr is a TTY) each stage shows as ``[2/3] associate`` with a
bar when its size is known (tqdm) and stays on screen when done, with its time.
Elsewhere (CI, a pipe, a log file) stages only go to ``logging`` at INFO, so
the output is the command's one-line summary alone.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("archive.cli")


class Stages:
    """``with Stages(["read", "write"]) as st: with st.stage("read", total=n) as bar: bar.update()``."""

    def __init__(self, names, stream=None, enabled: bool | None = None) -> None:
        self.names = list(names)
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else bool(enabled)
        self.t0 = time.perf_counter()

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc) -> None:
        pass

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def stage(self, name: str, total: int | None = None) -> _Stage:
        i = self.names.index(name) + 1 if name in self.names else len(self.names)
        return _Stage(self, f"[{i}/{len(self.names)}] {name}", total)

    def callback(self, name: str, total: int | None = None):
        """A ``progress(done, total, what)`` function driving the named stage (opened on
        first call, closed when done reaches total)."""
        state: dict = {}

        def progress(done: int, tot: int, what: str = "") -> None:
            if "stage" not in state:
                state["stage"] = self.stage(name, tot if total is None else total).__enter__()
            state["stage"].set(done, what)
            if done >= (tot if total is None else total):
                state.pop("stage").__exit__(None, None, None)

        return progress


def _screen(stream) -> tuple[int, int]:
    """(columns, lines) of the terminal ``stream`` writes to; 80 x 24 where it says 0 (a
    pseudo-terminal nobody sized), since tqdm would otherwise hide the bar."""
    try:
        size = os.get_terminal_size(stream.fileno())
        return size.columns or 80, size.lines or 24
    except (OSError, AttributeError, ValueError):
        return 80, 24


class _Stage:
    def __init__(self, owner: Stages, label: str, total: int | None) -> None:
        self.owner, self.label, self.total = owner, label, total
        self.bar = None
        self.done = 0

    def __enter__(self) -> _Stage:
        self.t0 = time.perf_counter()
        log.info("%s ...", self.label)
        if self.owner.enabled:
            from tqdm import tqdm

            cols, lines = _screen(self.owner.stream)
            fmt = ("{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}" if self.total
                   else "{desc} [{elapsed}] {postfix}")
            self.bar = tqdm(total=self.total, desc=self.label, file=self.owner.stream, leave=True,
                            bar_format=fmt, ncols=cols, nrows=lines)
        return self

    def update(self, n: int = 1, what: str = "") -> None:
        self.set(self.done + n, what)

    def set(self, done: int, what: str = "") -> None:
        step, self.done = done - self.done, done
        if self.bar is not None:
            if what:
                self.bar.set_postfix_str(str(what)[-40:], refresh=False)
            self.bar.update(step)

    def __exit__(self, exc_type, *exc) -> None:
        seconds = time.perf_counter() - self.t0
        if self.bar is not None:
            self.bar.set_postfix_str("failed" if exc_type else f"done in {seconds:.1f} s", refresh=False)
            self.bar.close()
        log.info("%s %s in %.1f s", self.label, "failed" if exc_type else "done", seconds)


def read_then(arc, table: str, files, stage: str, write):
    """The ingest commands' two stages: read and validate ``files`` for ``table`` (a bar
    per file), then ``write(rows, where)`` as the named ``stage`` (``where``: the files,
    for error messages).  Returns (what ``write`` returned, seconds)."""
    with Stages(["read", stage]) as st:
        rows = arc.read_files(table, files, progress=st.callback("read"))
        with st.stage(stage):
            result = write(rows, ", ".join(map(os.fspath, files)))
    return result, st.seconds
