"""MERIT's overhead: calibration + planning + merge against branch training time."""

from merit.overhead import overhead


def test_overhead_against_all_training_and_against_the_longest_branch():
    o = overhead({"calibrate": 3.0, "plan": 1.0, "merge": 2.0, "train": 99.0}, [100.0, 200.0])
    assert o.seconds == 6.0
    assert o.of_training == 6.0 / 300.0 and o.of_longest_branch == 6.0 / 200.0
    assert "2.0% of branch training (300s over 2 branches), 3.0% of the longest" in o.line()
    assert o.to_json()["of_training"] == o.of_training


def test_no_overhead_before_the_branches_have_trained_or_a_step_was_timed():
    assert overhead({"calibrate": 3.0, "plan": 1.0}, [100.0]) is None
    assert overhead({"calibrate": 3.0, "plan": 1.0, "merge": 2.0}, []) is None
    assert overhead({"calibrate": 3.0, "plan": 1.0, "merge": {"x": 1}}, [5.0]) is None
