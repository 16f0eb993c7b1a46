"""The CLI's views of a search: trial rows folded from events, and the live trials table on a terminal."""

import io
import re

from rich.console import Console

from engine.events import BestChanged, StageProgress, StageStarted, TrialFinished, TrialStarted
from engine.search.trial_rows import TrialRows
from tui.report import RichSink

P = {"calib_source": "stdlib-docs", "calib_n": 32, "calib_len": 128, "calib_select": "typical", "calib_seed": 8,
     "metric": "vector", "aggregate": "sum", "metric2": "wanda", "mix": 0.75, "attn_share": "auto",
     "allocation": "uniform", "ramp": 0.0, "first_kept": 2, "last_kept": 1}


def _events(n: int) -> list:
    out = [TrialStarted(0, P), TrialFinished(0, "complete", 80.0, P, 9.0, 8.0), BestChanged(0, 80.0, P)]
    for i in range(1, n):
        value = 60.0 if i == 2 else 90.0 + i
        out += [TrialStarted(i, P), TrialFinished(i, "complete" if i != 3 else "pruned", value, P, 9.0, 8.0)]
        if i == 2:
            out.append(BestChanged(2, 60.0, P))
    return out


def test_rows_pin_baseline_and_best_and_measure_gain():
    board = TrialRows()
    for e in _events(30):
        board.apply(e)
    shown = [r.number for r in board.shown(6)]
    assert shown == [0, 2, 26, 27, 28, 29]
    assert board.best == 2 and board.best_history == [(0, 80.0), (2, 60.0)]
    assert abs(board.gain(board.rows[2]) - 0.25) < 1e-9
    assert board.gain(board.rows[3]) is None  # stopped early: its partial value is not comparable


def _plain(buf: io.StringIO) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())


def test_live_table_on_a_terminal_and_lines_elsewhere():
    buf = io.StringIO()
    with RichSink(Console(file=buf, force_terminal=True, width=100, height=30)) as sink:
        sink(StageStarted("trials", 5, "trials"))
        for e in _events(5):
            sink(e)
        sink(TrialStarted(5, P))
        sink(StageProgress("trials", 5, 6))
    out = _plain(buf)
    assert "0 base" in out and "-25.0%" in out and "best" in out and "running" in out
    assert "trial 4 complete" not in out  # the table replaces the per-trial lines

    buf = io.StringIO()
    with RichSink(Console(file=buf, force_terminal=False, width=100)) as sink:
        for e in _events(3):
            sink(e)
    out = _plain(buf)
    assert "trial 2 complete: objective 60.000" in out and "best so far: trial 2" in out and "┃" not in out


def test_a_rerun_baseline_stays_the_baseline():
    board = TrialRows()
    for e in [TrialStarted(0, P, baseline=True), TrialFinished(0, "failed", None, P),
              TrialStarted(1, P), TrialFinished(1, "complete", 90.0, P),
              TrialStarted(2, P, baseline=True), TrialFinished(2, "complete", 100.0, P)]:
        board.apply(e)
    assert board.baseline.number == 2 and board.is_baseline(board.rows[2]) and not board.is_baseline(board.rows[0])
    assert abs(board.gain(board.rows[1]) - 0.10) < 1e-9
    assert [r.number for r in board.shown(1)] == [2]  # pinned before the latest


def test_a_trial_layout_says_whether_and_how_it_was_repaired():
    from tui.report import layout_text

    base = {"attn_share": "auto", "allocation": "uniform", "ramp": 0.0, "first_kept": 4, "last_kept": 2}
    assert "repair" not in layout_text(base) and "repair" not in layout_text({**base, "repair": "none"})
    assert layout_text({**base, "repair": "self", "repair_lambda": 0.3, "repair_n": 48}).endswith("repair self λ0.3")


def test_live_measurement_lines_round_as_the_bench_table_does():
    from tui.report import metric_value

    assert [metric_value("ppl:stdlib-docs@128", v) for v in (24.8312, 129.354)] == ["24.83", "129.35"]
    assert metric_value("acc:piqa", 0.61234) == "0.612"
