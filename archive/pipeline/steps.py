"""Pipeline steps: a frozen, validated configuration plus a pure ``run`` over units of work.

A step (a subclass of :class:`Step`) says

* ``name`` and the steps it ``requires`` (run before it);
* ``Config``: a dataclass of its settings.  The step validates it on
  construction (:func:`archive.pipeline.config.config_from_dict`: unknown keys,
  wrong types and out-of-range values are refused, naming the field) and keeps
  a private copy, so a step's configuration cannot change under it; its
  canonical JSON goes into every provenance row, and
  :meth:`Step.from_provenance` rebuilds the identical step from that row;
* :meth:`Step.units`: every unit of work that should exist given what the
  archive holds now (driver side, reads the store), each with a key and a
  description of its inputs (ids, checksums: a change makes the unit pending
  again);
* :meth:`Step.run`: the computation of one unit.  It runs in a worker
  process (local or on a Dask cluster), reads and writes product *files*
  only (through a :class:`~archive.pipeline.products.ProductStore` without a
  catalog) and returns a picklable result;
* :meth:`Step.record`: the driver writes a unit's rows in the open store
  transaction (the runner adds the unit's outcome row in the same
  transaction, so both land or neither does).

Nothing in :mod:`archive.process` knows about steps: steps call its pure
functions.  See ``docs/pipeline.md`` for how to add one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any, ClassVar

import pandas as pd

from archive.errors import ArchiveError
from archive.pipeline.config import config_from_dict, config_hash, config_to_json, plain
from archive.pipeline.provenance import provenance_row


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of work of a step.

    key: what it covers (``exposure:12003``, ``band:r``, ``field:12003``, ``tile:4321:r``);
    inputs: JSON-able description of what it is computed from (its hash decides whether a
    done unit is still current); payload: what the worker needs (paths, ids), not hashed;
    visits, bands: for ``archive run --visits/--bands`` selection; order: units of a
    step whose ``ordered`` is true are recorded in this order (e.g. time)."""

    step: str
    key: str
    inputs: Any = None
    payload: Any = None
    visits: tuple[int, ...] = ()
    bands: tuple[str, ...] = ()
    order: tuple = ()

    @property
    def inputs_hash(self) -> str:
        return hashlib.sha256(json.dumps(plain(self.inputs), sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()

    @property
    def unit_id(self) -> int:
        return unit_id(self.step, self.key)


def unit_id(step: str, key: str) -> int:
    """Stable id of a step's unit: the first 63 bits of SHA-256(step, key)."""
    digest = hashlib.sha256(f"{step}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclasses.dataclass
class Recorded:
    """What recording a unit did: a note for ``archive status`` (e.g. "rejected: ...") and
    product files to delete once the transaction has committed."""

    note: str = ""
    remove: list = dataclasses.field(default_factory=list)
    provenance_id: int | None = None


@dataclasses.dataclass
class RunContext:
    """What the driver's side of a step sees: the catalog store, the product store
    (with that catalog), and run-wide inputs (a reference catalog)."""

    store: Any
    products: Any
    refcat_path: str | None = None
    refcat_sha256: str | None = None
    _refcat: Any = None

    def refcat(self) -> pd.DataFrame | None:
        """The reference catalog as a DataFrame (read once), or None."""
        if self.refcat_path is None:
            return None
        if self._refcat is None:
            from archive.catalog.tablefile import read_table_file

            self._refcat = read_table_file(self.refcat_path).to_pandas()
        return self._refcat


class Step:
    """Base class of pipeline steps (see the module docstring)."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type] = None
    #: record the units in ``Unit.order`` (their results may depend on what was recorded before)
    ordered: ClassVar[bool] = False
    #: run the units in the driver process (cheap units that need no worker)
    in_driver: ClassVar[bool] = False

    def __init__(self, config=None) -> None:
        if self.Config is None or not dataclasses.is_dataclass(self.Config):
            raise TypeError(f"{type(self).__name__}.Config must be a dataclass")
        where = f"{self.name} config"
        if config is None:
            cfg = self.Config()
        elif isinstance(config, self.Config):
            cfg = config_from_dict(self.Config, plain(config), where)  # validated private copy
        else:
            cfg = config_from_dict(self.Config, config, where)
        self._config = cfg
        self._json = config_to_json(cfg)
        self._hash = config_hash(cfg)

    @property
    def config(self):
        """A copy of the step's configuration (changing it does not change the step)."""
        return copy.deepcopy(self._config)

    @property
    def config_json(self) -> str:
        return self._json

    @property
    def config_hash(self) -> str:
        return self._hash

    @classmethod
    def from_provenance(cls, row) -> Step:
        """The step exactly as it was configured when it wrote ``row`` (a provenance row)."""
        if row["step"] != cls.name:
            raise ArchiveError(f"provenance row of step {row['step']!r}, not {cls.name!r}")
        return cls(json.loads(row["config"]))

    def provenance(self, inputs: list) -> dict:
        return provenance_row(self.name, self._config, inputs)

    # -- the three parts every step implements --------------------------------
    def units(self, ctx: RunContext) -> list[Unit]:
        raise NotImplementedError

    def prepare(self, ctx: RunContext, units: list[Unit]) -> Any:
        """Driver-side set-up shared by the units about to run (default: nothing)."""
        return None

    def run(self, unit: Unit, shared: Any, products) -> Any:
        raise NotImplementedError

    def record(self, ctx: RunContext, unit: Unit, result: Any, tx) -> Recorded:
        """Write the unit's rows in the store transaction ``tx`` (driver side)."""
        raise NotImplementedError

    def discard(self, ctx: RunContext, unit: Unit, result: Any) -> None:
        """Remove files a result wrote when its rows could not be recorded (default: none)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(config_hash={self._hash[:12]})"
