"""Registries for the things users add: merge methods, metrics, compare rows, splitters, stages.

An entry is an object with a ``name``, registered by the module that defines it. A registry knows
the package of its built-in entries and imports every module in it on first use, so adding a
built-in is adding one file; code outside merit (a plugin, a test) registers its own entries by
importing a module that calls :meth:`Registry.register`. ``MERIT_PLUGINS`` (comma-separated module
names) is imported by the CLI before a command runs.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Generic, TypeVar

from merit.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, built-ins loaded lazily from ``package``."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._loaded = package is None

    def register(self, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` under ``entry.name``; a second entry of one name is refused unless
        ``replace`` (a test or plugin overriding a built-in says so)."""
        name = entry.name  # type: ignore[attr-defined]
        if name in self._entries and not replace and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def _load(self) -> None:
        # Built-ins are found by walking their package, so a new one needs no registry line.
        # The import is dynamic on purpose: the registry sits below the packages it lists.
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{self.package}.{mod.name}")

    def get(self, name: str) -> T:
        """The entry ``name``; an unknown name is a :class:`ConfigError` listing the known."""
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names())
            raise ConfigError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def names(self) -> tuple[str, ...]:
        """Entry names, ordered by their ``order`` attribute (if any), then registration."""
        self._load()
        items = list(self._entries.values())
        ranked = sorted(range(len(items)), key=lambda i: (getattr(items[i], "order", 0), i))
        return tuple(items[i].name for i in ranked)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[T]:
        return iter(self.get(n) for n in self.names())


# Where each registry is defined: the config validates names against them without importing
# the packages above it (the import is dynamic, as for built-in entries).
HOMES = {
    "compare row": ("merit.compare.rows", "ROWS"),
    "splitter": ("merit.plan.split_methods", "SPLITTERS"),
    "merge method": ("merit.merge.methods", "METHODS"),
    "metric": ("merit.evaluate.metrics", "METRICS"),
    "stage": ("merit.stages", "STAGES"),
}


def registry(kind: str) -> Registry:
    """The registry of ``kind`` (a key of :data:`HOMES`)."""
    module, attr = HOMES[kind]
    return getattr(importlib.import_module(module), attr)


def registered(kind: str) -> tuple[str, ...]:
    """The names registered for ``kind``."""
    return registry(kind).names()


def load_plugins(spec: str | None) -> None:
    """Import the comma-separated modules of ``MERIT_PLUGINS``: they register their entries."""
    for name in filter(None, (s.strip() for s in (spec or "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"MERIT_PLUGINS: cannot import {name} ({err})") from None
