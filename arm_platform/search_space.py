"""Tune search spaces as data: {dotted TrainConfig key: ("loguniform", lo, hi) | ("choice", [...]) | value}.

`build_param_space` turns a spec (`recipes.SEARCH_SPACES`, edited by `--space` flags via `parse_space_args`) into a
Ray Tune `param_space`, checking every key and example value against the base TrainConfig before any trial runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray.tune

from arm_platform.config import TrainConfig, apply_overrides

_SAMPLERS = {
    "loguniform": lambda lo, hi: ray.tune.loguniform(lo, hi),
    "uniform": lambda lo, hi: ray.tune.uniform(lo, hi),
    "randint": lambda lo, hi: ray.tune.randint(lo, hi),
    "choice": lambda values: ray.tune.choice(list(values)),
    "grid": lambda values: ray.tune.grid_search(list(values)),
}


def build_param_space(space: Mapping[str, Any], base: TrainConfig | None = None) -> dict[str, Any]:
    """Tune param_space {dotted key: sampler} from ("loguniform", lo, hi)-style specs; plain values stay fixed.

    Raises ValueError for an unknown sampler or a key that is not a TrainConfig field (checked against `base`).
    """
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if base is not None:
            apply_overrides(base, {key: _example_value(spec)})  # raises on unknown keys / wrong types
        if isinstance(spec, tuple) and spec and isinstance(spec[0], str) and spec[0] in _SAMPLERS:
            out[key] = _SAMPLERS[spec[0]](*spec[1:])
        elif isinstance(spec, tuple) and spec and isinstance(spec[0], str):
            raise ValueError(f"search space {key!r}: unknown sampler {spec[0]!r}; valid: {', '.join(_SAMPLERS)}")
        else:
            out[key] = spec
    return out


def _example_value(spec: Any) -> Any:
    if not (isinstance(spec, tuple) and spec and isinstance(spec[0], str)):
        return spec
    kind, *args = spec
    if kind in ("choice", "grid"):
        return list(args[0])[0]
    return args[0] if args else None


def parse_space_args(items: list[str]) -> dict[str, Any]:
    """CLI search-space edits: "optim.blr=loguniform:1e-4:2e-3", "data.mixup=choice:0,0.8", "optim.epochs=5".

    A value without a sampler prefix fixes the key (removing it from the search).
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--space {item!r} is not key=sampler:args (e.g. optim.blr=loguniform:1e-4:2e-3)")
        key, text = item.split("=", 1)
        kind, _, rest = text.partition(":")
        if kind in ("choice", "grid"):
            out[key] = (kind, [_number(v) for v in rest.split(",")])
        elif kind in _SAMPLERS:
            out[key] = (kind, *(_number(v) for v in rest.split(":")))
        else:
            out[key] = _number(text)
    return out


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return None if text.lower() in ("none", "null") else text
