"""LogProgress: plain status lines with percentage, rate and ETA every few seconds (no terminal)."""

import io

from surgery.progress import LogProgress, Progress, current_activity


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_status_lines_every_interval_with_percent_rate_eta():
    clock, out = FakeClock(), io.StringIO()
    p = LogProgress(out, interval=5.0, clock=clock)
    with p.task("gptq layers", total=20) as t:
        for _ in range(20):
            clock.t += 1.0  # one step per second
            t.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "... gptq layers (20 steps)"
    # 20 s of work, a status line every 5 s: after steps 5, 10, 15, 20.
    assert lines[1] == "    gptq layers: 5/20 (25%), 1.00/s, elapsed 0:05, ETA 0:15"
    assert lines[2] == "    gptq layers: 10/20 (50%), 1.00/s, elapsed 0:10, ETA 0:10"
    assert lines[4] == "    gptq layers: 20/20 (100%), 1.00/s, elapsed 0:20, ETA 0:00"
    assert lines[5] == "    done: gptq layers in 0:20"
    assert len(lines) == 6


def test_no_status_line_for_quick_tasks_and_unknown_totals():
    clock, out = FakeClock(), io.StringIO()
    p = LogProgress(out, interval=5.0, clock=clock)
    with p.task("loading data") as t:
        clock.t += 6.0
        t.advance(3)
    lines = out.getvalue().splitlines()
    assert lines == ["... loading data", "    loading data: 3, 0.50/s, elapsed 0:06",
                     "    done: loading data in 0:06"]


def test_current_activity_is_the_innermost_task():
    p = Progress()
    assert current_activity() is None
    with p.task("outer"):
        with p.task("inner"):
            assert current_activity() == "inner"
        assert current_activity() == "outer"
    assert current_activity() is None
