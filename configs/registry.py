"""A registry of named presets that rejects duplicates and suggests the nearest name."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[[], T]] = {}

    def register(self, name: str, factory: Callable[[], T]) -> None:
        if name in self._items:
            raise KeyError(f"{self.kind} preset {name!r} is already registered")
        self._items[name] = factory

    def get(self, name: str) -> T:
        if name not in self._items:
            near = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise KeyError(
                f"unknown {self.kind} preset {name!r}.{hint} Known: {', '.join(self._items)}"
            )
        return self._items[name]()

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
