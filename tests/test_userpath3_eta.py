"""The live panel's ETA (round 3, item 5). Before, the engine's eta_s was the average step time
since training began times the steps left: under load (another job on the machine, a throttling
laptop) it lagged the real speed by the whole run, and the panel kept showing the last figure while
a slow step ran. Now the engine takes the time of its recent steps (core.runs.StepRate, the
warm-up step left out) and the panel counts the figure down between steps."""
from __future__ import annotations

from types import SimpleNamespace

from core.runs import ETA_WINDOW_STEPS, StepRate


def _rate(times: list[float]) -> StepRate:
    r = StepRate()
    for step, t in enumerate(times):
        r.add(step, t)
    return r


def test_a_slowdown_moves_the_eta_to_the_new_speed():
    # 100 steps at 1 s, then the machine gets busy: 40 steps at 3 s each
    times = [0.0]
    for i in range(140):
        times.append(times[-1] + (1.0 if i < 100 else 3.0))
    r = _rate(times)
    assert r.seconds_per_step() == 3.0  # the whole-run average said 1.57
    assert r.eta(200) == 600.0


def test_the_warm_up_step_is_left_out():
    # the first step took 60 s (allocator growth, graph capture), the next ones 2 s
    r = _rate([0.0, 60.0, 62.0, 64.0, 66.0])
    assert r.seconds_per_step() == 2.0
    # with only the first step there is nothing else to go by
    assert _rate([0.0, 60.0]).seconds_per_step() == 60.0
    assert StepRate().eta(10) is None and _rate([0.0]).eta(10) is None


def test_logging_every_few_steps_and_a_repeated_step():
    r = StepRate()
    for step, t in [(0, 0.0), (10, 100.0), (20, 150.0), (20, 170.0), (30, 200.0)]:
        r.add(step, t)
    assert r.seconds_per_step() == 5.0  # (200 - 100) / 20, the repeat ignored
    # a window's worth of memory only
    many = _rate([float(i) for i in range(10 * ETA_WINDOW_STEPS)])
    assert len(many.points) <= 2 * ETA_WINDOW_STEPS + 2 and many.seconds_per_step() == 1.0


def test_the_panel_counts_the_eta_down_between_steps():
    from tui.screens.train import TrainScreen

    panel = SimpleNamespace(state="running", last={"eta_s": 300.0, "time": 1000.0})
    assert TrainScreen.eta_text(panel, now=1000.0) == "ETA 5m00s"
    assert TrainScreen.eta_text(panel, now=1120.0) == "ETA 3m00s"  # two minutes into a slow step
    assert TrainScreen.eta_text(panel, now=2000.0) == "ETA <1s"
    assert TrainScreen.eta_text(SimpleNamespace(state="stopped", last=panel.last)) == "stopped"
    assert TrainScreen.eta_text(SimpleNamespace(state="finished", last=panel.last)) == "done"
    assert TrainScreen.eta_text(SimpleNamespace(state="running", last={})) == "ETA …"
