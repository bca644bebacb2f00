"""The splitter registry: one module per built-in, and a user's splitter compared beside them."""

from __future__ import annotations

import numpy as np
import pytest

from merit.plan.split_methods import SPLITTERS
from merit.plan.splitters import PlanInputs, choose, compare, splitters

BUILT_INS = ("median", "sign", "random", "gain")


def _inputs(t: int = 8) -> PlanInputs:
    g = np.random.default_rng(0).normal(size=(t, 30))
    return PlanInputs.from_gram(g @ g.T, np.ones(t), np.ones(t))


@pytest.fixture
def toy():
    import toy_splitter

    SPLITTERS.register(toy_splitter.ALTERNATE)  # again after an earlier test's teardown
    yield toy_splitter.ALTERNATE
    SPLITTERS.unregister("alternate")


def test_built_ins_are_registered_in_order():
    assert SPLITTERS.names()[:4] == BUILT_INS
    assert tuple(splitters()) == SPLITTERS.names()
    assert [c.splitter for c in compare(_inputs(), 2)] == list(SPLITTERS.names())


def test_a_registered_splitter_is_compared_and_chosen(toy):
    assert SPLITTERS.names() == (*BUILT_INS, "alternate")
    cands = compare(_inputs(), 3)
    assert [c.splitter for c in cands] == ["median", "sign", "random", "gain", "alternate"]
    alt = cands[-1]
    assert alt.available and alt.groups.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert np.isfinite(alt.gain) and alt.balance == pytest.approx(3 / 2)
    assert cands[choose(cands, "alternate", "gain")].splitter == "alternate"
    assert splitters(tolerance=0.2)["alternate"].options.tolerance == 0.2


def test_unregistered_splitter_is_gone(toy):
    SPLITTERS.unregister("alternate")
    assert "alternate" not in SPLITTERS
    assert [c.splitter for c in compare(_inputs(), 2)] == list(BUILT_INS)
