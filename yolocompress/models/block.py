"""One `[section]` of a Darknet cfg as plain data; typed getters name the file and line."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import YoloCompressError

__all__ = ["Block"]


@dataclass
class Block:
    """One `[section]`: its type, its key=value options (strings, in file order) and where it came from."""
    type: str
    options: dict[str, str] = field(default_factory=dict)
    line: int = field(default=0, compare=False)     # line of the section header (0 = built in code)
    key_lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    source: str = field(default="<cfg>", compare=False, repr=False)

    def where(self, key: str | None = None) -> str:
        line = self.key_lines.get(key, self.line) if key else self.line
        return f"{self.source}:{line}" if line else self.source

    def has(self, key: str) -> bool:
        return key in self.options

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.options.get(key, default)

    def _required(self, key: str) -> YoloCompressError:
        return YoloCompressError(f"{self.where()}: [{self.type}] is missing '{key}'")

    def _lookup(self, key: str, default) -> str | None:
        """The raw text of `key`; None when absent and a default exists; an error otherwise."""
        raw = self.options.get(key)
        if raw is None and default is None:
            raise self._required(key)
        return raw

    def get_int(self, key: str, default: int | None = None) -> int:
        raw = self._lookup(key, default)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = None
            if value is None or value != int(value):
                raise YoloCompressError(
                    f"{self.where(key)}: '{key}={raw}' is not an integer") from None
            return int(value)

    def get_float(self, key: str, default: float | None = None) -> float:
        raw = self._lookup(key, default)
        if raw is None:
            return default
        try:
            return float(raw)
        except ValueError:
            raise YoloCompressError(f"{self.where(key)}: '{key}={raw}' is not a number") from None

    def get_ints(self, key: str, default: list[int] | None = None) -> list[int]:
        return [int(v) for v in self._list(key, default, int, "integers")]

    def get_floats(self, key: str, default: list[float] | None = None) -> list[float]:
        return [float(v) for v in self._list(key, default, float, "numbers")]

    def _list(self, key, default, conv, what):
        raw = self._lookup(key, default)
        if raw is None:
            return list(default)
        try:
            return [conv(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise YoloCompressError(
                f"{self.where(key)}: '{key}={raw}' is not a list of {what}") from None

    def set(self, key: str, value) -> None:
        self.options[key] = str(value)
