"""The built-in stages: importing a stage module registers its :class:`merit.graph.Stage`, so a
new stage is its module plus one line here. The CLI gives every registered stage a command."""

from __future__ import annotations

from merit.calibrate import stage as calibrate
from merit.compare import stage as compare
from merit.data import stage as data
from merit.diagnose import stage as diagnose
from merit.evaluate import stage as evaluate
from merit.graph import STAGES
from merit.merge import stage as merge
from merit.plan import stage as plan
from merit.report import stage as report
from merit.train import stage as train

BUILT_IN = (data, calibrate, plan, train, merge, evaluate, diagnose, report, compare)

__all__ = ["BUILT_IN", "STAGES"]
