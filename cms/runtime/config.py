"""Reading service configuration files (YAML) with errors an operator can act on.

Each service declares its own dataclasses; this module supplies the loading and
the typed accessors so every bad value is reported as ``file: key: problem``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration file or value that cannot be used."""


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {p}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return data


class Section:
    """Typed access to one mapping of a config file, naming the path in errors."""

    def __init__(self, data: Mapping[str, Any], where: str, base_dir: Path | None = None):
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping")
        self.data = data
        self.where = where
        self.base_dir = base_dir

    def _get(self, key: str, typ: type[T] | tuple[type, ...], default: Any, required: bool) -> Any:
        if key not in self.data or self.data[key] is None:
            if required:
                raise ConfigError(f"{self.where}.{key}: required")
            return default
        value = self.data[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise ConfigError(f"{self.where}.{key}: expected {name}, got {type(value).__name__}")
        return value

    def str(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        return self._get(key, str, default, required)

    def int(self, key: str, default: int | None = None, *, required: bool = False,
            minimum: int | None = None, maximum: int | None = None) -> int:
        value = self._get(key, int, default, required)
        if value is not None:
            if minimum is not None and value < minimum:
                raise ConfigError(f"{self.where}.{key}: must be at least {minimum}")
            if maximum is not None and value > maximum:
                raise ConfigError(f"{self.where}.{key}: must be at most {maximum}")
        return value

    def float(self, key: str, default: float | None = None, *, required: bool = False) -> float:
        return self._get(key, float, default, required)

    def bool(self, key: str, default: bool | None = None, *, required: bool = False) -> bool:
        return self._get(key, bool, default, required)

    def list(self, key: str, default: list | None = None, *, required: bool = False) -> list:
        return self._get(key, list, default if default is not None else [], required)

    def path(self, key: str, default: str | None = None, *, required: bool = False) -> Path | None:
        value = self.str(key, default, required=required)
        if value is None:
            return None
        p = Path(os.path.expandvars(os.path.expanduser(value)))
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        return p

    def section(self, key: str, *, required: bool = False) -> Section:
        value = self._get(key, Mapping, {}, required)
        return Section(value, f"{self.where}.{key}", self.base_dir)

    def mapping(self, key: str) -> dict[str, Any]:
        return dict(self._get(key, Mapping, {}, False))


def read_secret(*, file: Path | None = None, env: str | None = None, what: str) -> str:
    """Read a PIN or password from a file or an environment variable.

    The value is never echoed in errors: only where it was looked for.
    """
    if file is not None:
        try:
            value = Path(file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} from {file}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"{what} file {file} is empty")
        return value
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            raise ConfigError(f"{what}: environment variable {env} is not set")
        return value
    raise ConfigError(f"{what}: configure a file or an environment variable")
