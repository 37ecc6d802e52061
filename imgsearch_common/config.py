"""Typed reading of environment variables, for the one config function of each service."""

from collections.abc import Mapping


class ConfigError(ValueError):
    """A setting is missing or has a value that cannot be used."""


class EnvReader:
    """Reads settings named PREFIX + NAME from a mapping such as os.environ."""

    def __init__(self, prefix: str, environ: Mapping[str, str]):
        self._prefix = prefix
        self._environ = environ

    def str(self, name: str, default: str) -> str:
        return self._environ.get(self._prefix + name, default)

    def int(self, name: str, default: int, minimum: int | None = None) -> int:
        raw = self._environ.get(self._prefix + name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{self._prefix}{name} must be an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self._prefix}{name} must be at least {minimum}, got {value}")
        return value

    def float(self, name: str, default: float, minimum: float | None = None) -> float:
        raw = self._environ.get(self._prefix + name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{self._prefix}{name} must be a number, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self._prefix}{name} must be at least {minimum}, got {value}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.str(name, default)
        if value not in choices:
            raise ConfigError(f"{self._prefix}{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        raw = self._environ.get(self._prefix + name)
        if raw is None:
            return default
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{self._prefix}{name} must be true or false, got {raw!r}")
