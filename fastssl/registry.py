"""Name -> builder registries (timm style) for encoders, methods and data backends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from fastssl.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(builder: T) -> T:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._builders[name] = builder
            return builder

        return deco

    def get(self, name: str) -> T:
        if name not in self._builders:
            raise UserError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._builders[name]

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders
