"""The runner: every pending unit of every step, in dependency order, on local processes or Dask.

For each step in order (``until`` stops after the named step):

1. the step lists the units that should exist now (:meth:`Step.units`), filtered
   by ``visits`` / ``bands``;
2. each unit's last outcome is read from ``pipeline_unit``: *done* units whose
   config hash, code version and inputs hash are unchanged are skipped; units
   never run are *pending*; done units with any of the three changed are
   *stale* and run again; *failed* units run again only when their config or
   inputs changed, or with ``retry_failed``;
3. the units to run go to the executor (worker processes, or a
   ``dask.distributed`` cluster); workers compute and write product files only;
4. the driver (this process, the only writer of the catalog) records each
   result and the unit's outcome row in **one** store transaction, then
   deletes files the step no longer needs.  A unit whose computation or
   recording fails is recorded as failed with its reason, its files are
   removed, and the run goes on.

Killed at any moment, a run leaves each unit either recorded (rows and
files) or not recorded (no rows; at most an unregistered file that the next
run overwrites), so running again finishes the work and ends in the same
state as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone

import pandas as pd

from archive.errors import ArchiveError
from archive.pipeline.products import ProductStore
from archive.pipeline.steps import Recorded, RunContext, Step, Unit
from archive.version import __version__

log = logging.getLogger(__name__)

STATES = ("done", "pending", "stale", "failed")


@dataclasses.dataclass
class Failure:
    """A unit's computation raised: the message (and for a bug, the traceback's last lines)."""

    message: str


def _run_unit(step_path: str, config_json: str, unit: Unit, shared, products_root: str):
    """Worker entry point: rebuild the step from its configuration, run one unit."""
    import json

    from archive.pipeline.runtime import keep_freed_memory

    from threadpoolctl import threadpool_limits

    keep_freed_memory()
    module, _, name = step_path.partition(":")
    step = getattr(importlib.import_module(module), name)(json.loads(config_json))
    try:
        # BLAS/LAPACK on one thread: a threaded reduction rounds differently with the thread
        # count, and a unit must give the same bits in this process, a pool worker or a Dask
        # worker (whose nanny starts it with one thread); units run side by side for speed.
        with threadpool_limits(limits=1):
            return step.run(unit, shared, ProductStore(products_root))
    except ArchiveError as exc:
        return Failure(str(exc))
    except Exception as exc:  # a bug: keep where it happened, and go on with the other units
        tb = traceback.format_exception(exc)
        return Failure(f"{type(exc).__name__}: {exc} ({''.join(tb[-2:]).strip().splitlines()[-2].strip()})")


class LocalExecutor:
    """Units in this process (``jobs`` <= 1) or in a pool of ``jobs`` worker processes."""

    def __init__(self, jobs: int = 1) -> None:
        self.jobs = max(1, int(jobs))

    def map_unordered(self, fn, calls: Sequence[tuple]) -> Iterator[tuple[int, object]]:
        if self.jobs <= 1 or len(calls) <= 1:
            for i, args in enumerate(calls):
                yield i, fn(*args)
            return
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(self.jobs, len(calls))) as pool:
            futures = {pool.submit(fn, *args): i for i, args in enumerate(calls)}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()

    def close(self) -> None:
        pass


class DaskExecutor:
    """Units on a ``dask.distributed`` cluster: a scheduler address, or a Client.

    Workers must see the product directory at the same path (a shared
    filesystem); only the driver writes the catalog."""

    def __init__(self, scheduler: str | None = None, client=None) -> None:
        try:
            from distributed import Client
        except ImportError:  # pragma: no cover - the dask extra is not installed
            raise ArchiveError("--executor dask needs the 'distributed' package: pip install "
                               "'time-domain-archive[dask]'") from None
        if client is None and not scheduler:
            raise ArchiveError("--executor dask needs --scheduler ADDRESS (e.g. tcp://host:8786)")
        self._own = client is None
        try:
            self.client = client or Client(scheduler, timeout="20s")
        except OSError as exc:
            raise ArchiveError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None

    def map_unordered(self, fn, calls: Sequence[tuple]) -> Iterator[tuple[int, object]]:
        from distributed import as_completed

        futures = {self.client.submit(fn, *args, pure=False): i for i, args in enumerate(calls)}
        for fut in as_completed(list(futures)):
            yield futures[fut], fut.result()

    def close(self) -> None:
        if self._own:
            self.client.close()


@dataclasses.dataclass
class StepReport:
    """What one step did in a run."""

    step: str
    done: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    results: dict[str, object] = dataclasses.field(default_factory=dict, repr=False)
    seconds: float = 0.0


def _step_path(step: Step) -> str:
    cls = type(step)
    return f"{cls.__module__}:{cls.__qualname__}"


def order_steps(steps: Iterable[Step]) -> list[Step]:
    """Steps sorted so that each comes after those it requires (a stable topological order)."""
    steps = list(steps)
    by_name = {s.name: s for s in steps}
    if len(by_name) != len(steps):
        raise ArchiveError("two steps share a name")
    done: list[Step] = []
    seen: set[str] = set()

    def visit(s: Step, chain: tuple[str, ...]) -> None:
        if s.name in seen:
            return
        if s.name in chain:
            raise ArchiveError(f"steps require each other in a cycle: {' -> '.join(chain + (s.name,))}")
        for r in s.requires:
            if r in by_name:
                visit(by_name[r], chain + (s.name,))
        seen.add(s.name)
        done.append(s)

    for s in steps:
        visit(s, ())
    return done


class Runner:
    """Runs steps over the units the archive holds (see the module docstring)."""

    def __init__(self, ctx: RunContext, steps: Iterable[Step], executor=None,
                 progress: bool | None = None) -> None:
        self.ctx = ctx
        self.steps = order_steps(steps)
        self.executor = executor or LocalExecutor(1)
        self.progress = sys.stderr.isatty() if progress is None else progress

    # -- unit states ------------------------------------------------------------
    def unit_rows(self, step: str) -> pd.DataFrame:
        """The stored outcome rows of a step's units."""
        q = "SELECT * FROM pipeline_unit WHERE step = '" + step.replace("'", "''") + "'"
        return self.ctx.store.sql(q)

    def states(self, step: Step, units: list[Unit]) -> dict[str, tuple[str, str]]:
        """unit key -> (state, reason) for ``units`` of ``step``."""
        rows = self.unit_rows(step.name)
        by_key = {k: r for k, r in zip(rows["unit_key"], rows.to_dict("records"))}
        out = {}
        for u in units:
            r = by_key.get(u.key)
            if r is None:
                out[u.key] = ("pending", "")
                continue
            same = (r["config_hash"] == step.config_hash and r["inputs_hash"] == u.inputs_hash
                    and r["code_version"] == __version__)
            if r["status"] == "failed":
                out[u.key] = ("failed" if same else "pending", r["reason"] or "")
            else:
                out[u.key] = ("done" if same else "stale", r["reason"] or "")
        return out

    def _select(self, units: list[Unit], visits, bands) -> list[Unit]:
        if visits:
            vs = {int(v) for v in visits}
            units = [u for u in units if not u.visits or vs.intersection(u.visits)]
        if bands:
            bs = set(bands)
            units = [u for u in units if not u.bands or bs.intersection(u.bands)]
        return units

    def _steps_until(self, until: str | None) -> list[Step]:
        if until is None:
            return self.steps
        names = [s.name for s in self.steps]
        if until not in names:
            raise ArchiveError(f"no step {until!r}; steps: {', '.join(names)}")
        return self.steps[: names.index(until) + 1]

    def unit_status(self, step: str | None = None) -> pd.DataFrame:
        """Every unit (of one step, or all) with its state and reason: e.g. the coadds per tile."""
        rows = []
        for s in self.steps:
            if step is not None and s.name != step:
                continue
            for key, (state, why) in self.states(s, s.units(self.ctx)).items():
                rows.append({"step": s.name, "unit": key, "state": state, "reason": why})
        return pd.DataFrame(rows, columns=["step", "unit", "state", "reason"])

    def status(self, until: str | None = None) -> pd.DataFrame:
        """Per step: units registered, done, pending, stale and failed (with the reasons)."""
        rows = []
        for step in self._steps_until(until):
            units = step.units(self.ctx)
            states = self.states(step, units)
            counts = {s: 0 for s in STATES}
            reasons = []
            for key, (state, why) in states.items():
                counts[state] += 1
                if state == "failed":
                    reasons.append(f"{key}: {why}")
            rows.append({"step": step.name, "units": len(units), **counts,
                         "failures": "; ".join(reasons[:20]) + (" ..." if len(reasons) > 20 else "")})
        return pd.DataFrame(rows, columns=["step", "units", *STATES, "failures"])

    # -- running ------------------------------------------------------------------
    def run(self, until: str | None = None, visits=None, bands=None,
            retry_failed: bool = False) -> dict[str, StepReport]:
        reports: dict[str, StepReport] = {}
        for step in self._steps_until(until):
            reports[step.name] = self._run_step(step, visits, bands, retry_failed)
        return reports

    def _run_step(self, step: Step, visits, bands, retry_failed: bool) -> StepReport:
        t0 = time.perf_counter()
        rep = StepReport(step.name)
        units = self._select(step.units(self.ctx), visits, bands)
        states = self.states(step, units)
        todo = [u for u in units if states[u.key][0] in ("pending", "stale")
                or (retry_failed and states[u.key][0] == "failed")]
        rep.skipped = [u.key for u in units if u not in todo]
        if not todo:
            rep.seconds = time.perf_counter() - t0
            return rep
        log.info("%s: %d unit(s) to run, %d up to date", step.name, len(todo), len(rep.skipped))
        shared = step.prepare(self.ctx, todo)
        bar = self._bar(step.name, len(todo))
        root = str(self.ctx.products.root)
        calls = [(_step_path(step), step.config_json, u, shared, root) for u in todo]
        if step.in_driver:
            stream = ((i, _run_unit(*args)) for i, args in enumerate(calls))
        else:
            stream = self.executor.map_unordered(_run_unit, calls)
        if step.ordered:  # results recorded in the units' order, whatever order they finish in
            ready: dict[int, object] = {}
            order = sorted(range(len(todo)), key=lambda i: (todo[i].order, todo[i].key))
            nxt = 0
            for i, result in stream:
                ready[i] = result
                while nxt < len(order) and order[nxt] in ready:
                    k = order[nxt]
                    self._record(step, todo[k], ready.pop(k), rep)
                    nxt += 1
                    bar.update(1)
        else:
            for i, result in stream:
                self._record(step, todo[i], result, rep)
                bar.update(1)
        bar.close()
        rep.seconds = time.perf_counter() - t0
        log.info("%s: %d done, %d failed in %.1f s", step.name, len(rep.done), len(rep.failed), rep.seconds)
        return rep

    def _bar(self, name: str, total: int):
        if not self.progress:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=total, unit="unit", desc=name, leave=True)

    def _outcome_row(self, step: Step, unit: Unit, status: str, reason: str, provenance_id=None) -> dict:
        return {"unit_id": unit.unit_id, "step": step.name, "unit_key": unit.key, "status": status,
                "reason": reason or None, "config_hash": step.config_hash, "code_version": __version__,
                "inputs_hash": unit.inputs_hash, "provenance_id": provenance_id,
                "updated": datetime.now(timezone.utc)}

    def _write_outcome(self, tx, row: dict) -> None:
        from archive.catalog.validate import conform

        tx.delete("pipeline_unit", "unit_id", [row["unit_id"]])
        tx.append("pipeline_unit", conform(self.ctx.store.table("pipeline_unit"), pd.DataFrame([row])))

    def _record(self, step: Step, unit: Unit, result, rep: StepReport) -> None:
        if isinstance(result, Failure):
            self._fail(step, unit, result.message, rep)
            return
        try:
            with self.ctx.store.transaction() as tx:
                rec = step.record(self.ctx, unit, result, tx) or Recorded()
                self._write_outcome(tx, self._outcome_row(step, unit, "done", rec.note,
                                                          getattr(rec, "provenance_id", None)))
        except ArchiveError as exc:
            step.discard(self.ctx, unit, result)
            self._fail(step, unit, f"not recorded: {exc}", rep)
            return
        for path in rec.remove:
            self.ctx.products.remove(path)
        rep.done.append(unit.key)
        rep.results[unit.key] = result
        if rec.note:
            rep.notes[unit.key] = rec.note

    def _fail(self, step: Step, unit: Unit, message: str, rep: StepReport) -> None:
        rep.failed[unit.key] = message
        log.error("%s %s failed: %s", step.name, unit.key, message)
        try:
            with self.ctx.store.transaction() as tx:
                self._write_outcome(tx, self._outcome_row(step, unit, "failed", message))
        except ArchiveError as exc:  # e.g. the store is locked: the failure is reported, not stored
            log.error("%s %s: failure not recorded: %s", step.name, unit.key, exc)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
