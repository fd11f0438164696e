"""Step configurations: plain JSON out, validated dataclasses back in.

A step's configuration is a dataclass (processing configs from
:mod:`archive.process` nest inside it).  :func:`config_to_json` writes it as
canonical JSON (sorted keys, no spaces: equal configs give equal text and the
same hash); :func:`config_from_dict` rebuilds the dataclass from such JSON or
from a user's partial mapping, refusing, with the dotted name of the field,
an unknown key, a value of the wrong type, a non-finite number, or a value
outside the range a field declares (``field(metadata={"min": ..., "max": ...,
"choices": ...})``) or that a dataclass's own ``validate()`` method rejects.
So a config stored in a provenance row rebuilds exactly the step that made
the product, and a typo in a user's config is an error, not a silent default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing

import numpy as np

from archive.errors import ValidationError


def plain(obj):
    """JSON-able form of configs (dataclasses, numpy scalars, tuples, paths)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def config_to_json(config) -> str:
    """Canonical JSON (sorted keys, no spaces) of a config; equal configs give equal text."""
    return json.dumps(plain(config), sort_keys=True, separators=(",", ":"))


def config_hash(config) -> str:
    """SHA-256 (hex) of the canonical JSON of ``config``."""
    return hashlib.sha256(config_to_json(config).encode()).hexdigest()


def config_from_dict(cls: type, data, where: str = "config"):
    """An instance of dataclass ``cls`` from a (possibly partial) mapping; fields not
    given keep their defaults.  Raises :class:`~archive.errors.ValidationError` naming
    the field for unknown keys, wrong types and out-of-range values."""
    if isinstance(data, cls):
        data = plain(data)
    if not isinstance(data, dict):
        raise ValidationError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValidationError(f"{where}: unknown setting{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(repr(f'{where}.{k}') for k in unknown)}; "
                              f"known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        path = f"{where}.{name}"
        kwargs[name] = _convert(value, hints.get(name, typing.Any), path, f.default)
        _check_range(kwargs[name], f.metadata, path)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{where}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"{where}: {exc}") from None
    return obj


def _check_range(value, meta, path: str) -> None:
    if not meta or value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ValidationError(f"{path}: {value!r} is not one of {', '.join(map(repr, meta['choices']))}")
    if "min" in meta and value < meta["min"]:
        raise ValidationError(f"{path}: {value!r} is below its minimum {meta['min']!r}")
    if "max" in meta and value > meta["max"]:
        raise ValidationError(f"{path}: {value!r} is above its maximum {meta['max']!r}")


def _convert(value, hint, path: str, default=dataclasses.MISSING):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is typing.Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, path)
            except ValidationError as exc:
                errors.append(str(exc))
        raise ValidationError(errors[0] if len(errors) == 1 else
                              f"{path}: {value!r} matches none of {hint}")
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, path)
    if hint is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ValidationError(f"{path}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        raise ValidationError(f"{path}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str) and value in ("inf", "-inf", "nan"):
            value = float(value)  # plain() writes non-finite floats as text
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            v = float(value)
            if math.isnan(v):
                raise ValidationError(f"{path}: NaN is not a setting")
            return v
        raise ValidationError(f"{path}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValidationError(f"{path}: expected text, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValidationError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValidationError(f"{path}: expected {len(args)} values, got {len(value)}")
            items = [_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item = args[0] if args else typing.Any
            items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValidationError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = args if args else (typing.Any, typing.Any)
        return {_convert(k, kt, path): _convert(v, vt, f"{path}[{k!r}]") for k, v in value.items()}
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValidationError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ValidationError(f"{path}: cannot read {value!r} as {getattr(hint, '__name__', hint)}")
