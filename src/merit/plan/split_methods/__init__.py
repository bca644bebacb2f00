"""The splitters, one module each; a new splitter is one new module here (or in a plugin).

A module registers its :class:`~merit.plan.partition.Splitter` in ``SPLITTERS`` when imported;
the registry imports every module of this package on first use, and ``compare``
(:mod:`merit.plan.splitters`) plans with every registered splitter, in ``order``.
"""

from __future__ import annotations

from merit.plan.partition import Splitter
from merit.registry import Registry

SPLITTERS: Registry[Splitter] = Registry("splitter", "merit.plan.split_methods")
