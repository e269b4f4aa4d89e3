"""Config keys set on the command line: ``--set KEY=VALUE`` and Snakemake's ``--config KEY=VALUE``.

Both end up in the resolved config the ``imgproc`` command writes to ``OUTPUT_DIR/imgproc.yaml``,
so that repeating the run with plain Snakemake and that file gives the same result. A dotted key
reaches into a section (``stacking.method``); a value is read as YAML (``3.5``, ``true``,
``null``, ``'{method: median}'``); a mapping is merged into the section it sets.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

#: Config keys the command's own flags set; setting them with --set would fight the flags.
FLAG_KEYS = {
    "input_dir": "INPUT_DIR", "output_dir": "OUTPUT_DIR", "bias_dir": "-B", "dark_dir": "-D",
    "flat_dir": "-F", "bin": "-b", "align": "-a", "stack": "-s", "stack_threshold": "-S",
    "observer": "-o", "filter": "-f", "verbose": "-v", "object": "--object", "clean": "--clean",
}  # fmt: skip


class OverrideError(ValueError):
    """An override that names no config key, fights a flag, or gives a value the schema refuses."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``stacking.method=median`` -> (``['stacking', 'method']``, ``'median'``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise OverrideError(f"{text!r} is not KEY=VALUE (e.g. stacking.method=median)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise OverrideError(f"{text!r}: the value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), parsed


def _merge(target: dict[str, Any], value: Mapping[str, Any]) -> None:
    for key, item in value.items():
        if isinstance(item, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], item)
        else:
            target[key] = copy.deepcopy(item)


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``config`` with every ``KEY=VALUE`` of ``overrides`` set, in order."""
    result = copy.deepcopy(dict(config))
    for text in overrides:
        path, value = parse_override(text)
        if path[0] in FLAG_KEYS:
            raise OverrideError(f"{text!r}: {path[0]} is set by {FLAG_KEYS[path[0]]}; use that instead")
        section = result
        for depth, part in enumerate(path):
            if not isinstance(section, dict) or part not in section:
                known = ", ".join(sorted(section)) if isinstance(section, dict) else "none"
                where = ".".join(path[:depth]) or "the config"
                raise OverrideError(f"{text!r}: {where} has no key {part!r} (keys: {known}; see config.yaml)")
            if depth == len(path) - 1:
                if isinstance(value, Mapping) and isinstance(section[part], dict):
                    _merge(section[part], value)
                else:
                    section[part] = value
            else:
                section = section[part]
    return result


def check_config(config: Mapping[str, Any], schema_path: Path) -> None:
    """OverrideError naming the key and the problem, if ``config`` breaks the schema."""
    schema = yaml.safe_load(schema_path.read_text(encoding="utf-8"))
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        key = ".".join(map(str, error.absolute_path)) or "the config"
        raise OverrideError(f"config {key}: {error.message}")


def take_snakemake_config(extra: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split Snakemake's ``--config KEY=VALUE ...`` (or ``-C``) out of its arguments: (the
    ``KEY=VALUE`` items, the other arguments)."""
    rest: list[str] = []
    items: list[str] = []
    taking = False
    for arg in extra:
        if arg in ("--config", "-C"):
            taking = True
        elif taking and not arg.startswith("-") and "=" in arg:
            items.append(arg)
        else:
            taking = False
            rest.append(arg)
    return items, rest
