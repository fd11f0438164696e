"""The steps ``archive run`` knows, in their order, and how to configure them.

A run's configuration is a mapping from step name to that step's settings (a
YAML or JSON file for ``archive run --config``); a step not named keeps its
defaults.  An unknown step name or setting is refused, naming it.
"""

from __future__ import annotations

import json
import pathlib

from archive.errors import ArchiveError
from archive.pipeline.coadd import CoaddStep, TemplateStep, WarpStep
from archive.pipeline.diffim import DifferenceStep, ForcedStep
from archive.pipeline.forced_lists import DiaTemplateStep, ForcedListStep, TemplateCatalogStep, TemplateForcedStep
from archive.pipeline.single_epoch import AstrometryStep, CalexpStep, EpochQualityStep, SourcesStep
from archive.pipeline.steps import Step

#: Every step class, in dependency order.
STEP_CLASSES: tuple[type[Step], ...] = (CalexpStep, EpochQualityStep, AstrometryStep, SourcesStep,
                                        WarpStep, CoaddStep, TemplateStep, DifferenceStep, ForcedStep,
                                        TemplateCatalogStep, TemplateForcedStep, DiaTemplateStep, ForcedListStep)


def build_steps(configs: dict | None = None) -> list[Step]:
    """One configured instance of every step (``configs``: step name -> settings)."""
    configs = dict(configs or {})
    names = [c.name for c in STEP_CLASSES]
    unknown = sorted(set(configs) - set(names))
    if unknown:
        raise ArchiveError(f"run config: unknown step{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(map(repr, unknown))}; steps: {', '.join(names)}")
    return [cls(configs.get(cls.name)) for cls in STEP_CLASSES]


def load_run_config(path) -> dict:
    """A run configuration file (YAML or JSON): step name -> settings."""
    import yaml

    p = pathlib.Path(path)
    if not p.is_file():
        raise ArchiveError(f"{p}: no such config file")
    try:
        data = json.loads(p.read_text()) if p.suffix.lower() == ".json" else yaml.safe_load(p.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise ArchiveError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: "
                           f"{str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArchiveError(f"{p}: expected a mapping of step name -> settings")
    return data
