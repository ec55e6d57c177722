"""The benchmark's own rules (tests/bench): what --quick judges. The benchmark itself runs as
`python -m tests.bench`, not in this suite: its figures are for a quiet machine."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as `python -m tests.bench` runs from the root
from tests.bench.__main__ import Bench  # noqa: E402


def test_quick_shows_machine_figures_without_judging_them_and_judges_losses(tmp_path: Path):
    """--quick exited 1 on figures a busy machine moves (start-up RSS, a 1 s rate) where the
    README called it a smoke run (issue 21, finding 17)."""
    for quick in (True, False):
        bench = Bench(quick, tmp_path)
        bench.row("start-up", "RSS before traffic (MB)", 67.7, "<= 60 MB", False, machine=True)
        bench.row("ingest", "accepted but not delivered", 3, "0", False)
        bench.row("ingest", "ratio", 1.2, "-", None, machine=True)
        (rss, lost, shown) = bench.rows
        if quick:
            assert (rss["result"], rss["target"]) == ("-", "<= 60 MB (full run only)")
        else:
            assert (rss["result"], rss["target"]) == ("MISS", "<= 60 MB")
        assert lost["result"] == "MISS" and shown["result"] == "-"  # a loss is judged in either


def test_quick_runs_each_order_once_and_the_full_run_both_ways(tmp_path: Path):
    assert Bench(True, tmp_path).order("ABC") == ["A", "B", "C"]
    assert Bench(False, tmp_path).order("ABC") == ["A", "B", "C", "C", "B", "A"]
    assert Bench(False, tmp_path).order((False, True)) == [False, True, True, False]
