"""Typed configuration: dataclass schemas merged with a YAML file and ``key=value`` overrides.

Every command of the project loads its configuration through :func:`load_config`, so every command
rejects an unknown or mistyped key the same way, before doing any work, and names the key.
Schemas raise :class:`ConfigError` from ``__post_init__`` for values that type-check but make no
sense (a negative size, an empty topic list); those messages name the key too.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override that does not fit its schema."""


def load_config(schema: type[T], config_file: str | Path | None = None,
                overrides: Sequence[str] = (), values: Mapping[str, Any] | None = None) -> T:
    """Return ``schema`` filled from its defaults, then ``config_file``, then ``overrides``, then
    ``values``.

    ``overrides`` are ``dotted.key=value`` strings, as typed on a command line; ``values`` are typed
    values a program sets (nested mappings for nested keys, e.g. ``{"data": {"seed": 3}}``), checked
    against the schema like everything else.
    """
    try:
        # Dataclass nodes are closed (unknown keys fail); dict-typed fields stay open.
        merged = OmegaConf.structured(schema)
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [item for item in overrides if "=" not in item or item.startswith("=")]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        if values:
            merged = OmegaConf.merge(merged, OmegaConf.create(_plain(values)))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"required config key(s) not set: {', '.join(missing)}")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error, config_file)) from None


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` as nested plain dicts: a dotted key (``"landing.dir"``) becomes nested mappings,
    paths become strings (OmegaConf holds primitive values only)."""
    plain: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = plain
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = _plain(value) if isinstance(value, Mapping) else str(value) if isinstance(value, Path) else value
    return plain


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, JSON-serialisable dict of a loaded config (for manifests and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def require(condition: bool, key: str, message: str) -> None:
    """For ``__post_init__`` checks: fail naming the key."""
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def _describe(error: OmegaConfBaseException, config_file: str | Path | None) -> str:
    key = getattr(error, "full_key", None) or getattr(error, "key", None)
    where = f" (in {config_file} or an override)" if config_file else ""
    text = str(error).splitlines()[0]
    if key:
        return f"config key '{key}'{where}: {text}"
    return f"invalid configuration{where}: {text}"


def field_names(schema: type) -> list[str]:
    return [field.name for field in dataclasses.fields(schema)]


def add_config_arguments(parser: "argparse.ArgumentParser") -> None:
    """The options every command shares: ``--config FILE``, ``--print-config`` and trailing
    ``key=value`` overrides."""
    parser.add_argument("--config", metavar="FILE", help="YAML config file (defaults are built in)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override any config key, e.g. spec.context_len=64")


def config_from_args(schema: type[T], args: "argparse.Namespace", **cli_values: Any) -> T:
    """Load ``schema`` from ``--config`` and overrides; explicit options (``cli_values`` that are not
    ``None``) win over both. With ``--print-config``, write the loaded configuration to stdout as
    YAML and exit 0 (:class:`SystemExit`), before the command does any work; a bad configuration
    still raises :class:`ConfigError`."""
    values = {key: value for key, value in cli_values.items() if value is not None}
    config = load_config(schema, args.config, args.overrides, values)
    if args.print_config:
        sys.stdout.write(to_yaml(config))
        raise SystemExit(0)
    return config
