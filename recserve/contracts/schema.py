"""Small helpers for strict validation of JSON-like documents.

Manifests, plans and configs are parsed with these so every error names the exact field
(``tables[3].dim``) and unknown keys are rejected instead of silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from recserve.contracts.errors import ConfigError, RecserveError

T = TypeVar("T")
_MISSING = object()


class Doc:
    """A mapping being validated, with its path for error messages.

    ``error`` is the error class raised; callers pick the kind (``ConfigError`` for configs,
    ``BadRequest`` for requests, an ``ArtifactError`` factory for manifests).
    """

    def __init__(
        self,
        value: Any,
        path: str,
        error: Callable[[str, str], RecserveError] | None = None,
    ) -> None:
        self.error = error or (lambda msg, field: ConfigError(msg, field=field))
        if not isinstance(value, Mapping):
            raise self.error(f"{path or 'document'} must be an object", path)
        self.value = value
        self.path = path

    def _field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> RecserveError:
        field = self._field(key)
        return self.error(f"{field}: {message}", field)

    def get(self, key: str, kind: type[T] | tuple[type, ...], default: Any = _MISSING) -> Any:
        if key not in self.value:
            if default is _MISSING:
                raise self.fail(key, "is required")
            return default
        val = self.value[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a JSON true must not pass as a count.
        if isinstance(val, bool) and bool not in kinds:
            raise self.fail(key, f"must be {_names(kinds)}, got a boolean")
        if float in kinds and isinstance(val, int) and not isinstance(val, bool):
            val = float(val)
        if not isinstance(val, kinds):
            raise self.fail(key, f"must be {_names(kinds)}, got {type(val).__name__}")
        return val

    def int(self, key: str, default: Any = _MISSING, *, minimum: int | None = None) -> Any:
        val = self.get(key, int, default)
        if isinstance(val, int) and minimum is not None and val < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {val}")
        return val

    def choice(self, key: str, options: tuple[str, ...], default: Any = _MISSING) -> Any:
        val = self.get(key, str, default)
        if val not in options and val is not default:
            raise self.fail(key, f"must be one of {', '.join(options)}; got {val!r}")
        return val

    def sub(self, key: str) -> Doc:
        return Doc(self.get(key, Mapping), self._field(key), self.error)

    def items(self, key: str, default: Any = _MISSING) -> list[Any]:
        return list(self.get(key, list, default))

    def subs(self, key: str) -> list[Doc]:
        return [
            Doc(v, f"{self._field(key)}[{i}]", self.error) for i, v in enumerate(self.items(key))
        ]

    def only(self, *allowed: str) -> None:
        unknown = sorted(set(self.value) - set(allowed))
        if unknown:
            raise self.fail(unknown[0], f"unknown key (allowed: {', '.join(allowed)})")


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)
