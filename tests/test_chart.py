"""The bring-up chart reads pytest-benchmark's JSON."""
import json

from hclsim.benches import chart


def _report():
    return {"benchmarks": [
        {"name": "test_ap_bring_up[64]", "param": "64", "extra_info": {"cpus": 64},
         "stats": {"median": 0.02, "min": 0.019, "max": 0.021}},
        {"name": "test_ap_bring_up[8]", "param": "8", "extra_info": {},
         "stats": {"median": 0.003, "min": 0.003, "max": 0.004}},
        {"name": "test_sidecar_to_linux_conversion", "param": None, "stats": {"median": 0.0002}},
    ]}


def test_points_sorted_by_vcpus():
    points = chart.bring_up_points(_report())
    assert [p[0] for p in points] == [8, 64]
    assert abs(points[1][1] - 20.0) < 1e-9


def test_chart_written(tmp_path):
    src = tmp_path / "b.json"
    src.write_text(json.dumps(_report()))
    out = tmp_path / "c.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert chart.main([str(src), "-o", str(out)]) == 1
        return
    assert chart.main([str(src), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _full_report():
    def bench(name, cpus, median):
        return {"name": f"{name}[{cpus}]", "param": str(cpus), "extra_info": {"cpus": cpus},
                "stats": {"median": median, "min": median * 0.95, "max": median * 1.1}}
    return {"benchmarks": [bench("test_ap_bring_up", c, m) for c, m in
                           ((8, 0.0025), (64, 0.005), (256, 0.015), (1024, 0.047), (2048, 0.1))]
            + [bench("test_ap_bring_up_baseline_engine_per_vcpu", c, m) for c, m in
               ((64, 0.343), (256, 2.29), (1024, 7.746))]}


def test_speedups_are_baseline_over_pooled():
    report = _full_report()
    ratios = chart.speedups(chart.bring_up_points(report),
                            chart.bring_up_points(report, "test_ap_bring_up_baseline_engine_per_vcpu["))
    assert sorted(ratios) == [64, 256, 1024] and round(ratios[1024]) == 165


def test_chart_reads_like_the_figures():
    """vCPU counts as plain numbers on the x axis, the goal at its size only, the pooled/baseline
    ratio printed, the legend clear of the data, and the note that times are host wall-clock."""
    import pytest
    pytest.importorskip("matplotlib")
    fig = chart.draw(_full_report())
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["8", "64", "256", "1024", "2048"]
    assert not ax.xaxis.get_minorticklabels() or all(not t.get_text() for t in ax.xaxis.get_minorticklabels())
    goal = [line for line in ax.get_lines() if "goal" in (line.get_label() or "")]
    assert len(goal) == 1 and list(goal[0].get_xdata()) == [1024] and list(goal[0].get_ydata()) == [50]
    flat_at_goal = [line for line in ax.get_lines() if len(line.get_ydata()) > 1
                    and set(map(float, line.get_ydata())) == {50.0}]
    assert not flat_at_goal                                       # no line across every size
    texts = [t.get_text() for t in ax.texts]
    assert any("165×" in t for t in texts) and any("69×" in t for t in texts)
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    axes = ax.get_window_extent(renderer)
    assert legend.y1 <= axes.y0 or legend.x0 >= axes.x1          # outside the plotting area
    assert any("wall-clock" in t.get_text() and "guest time" in t.get_text() for t in fig.texts)


def test_chart_of_a_missing_file_is_one_line(tmp_path, capsys):
    assert chart.main([str(tmp_path / "nope.json"), "-o", str(tmp_path / "c.png")]) == 1
    assert capsys.readouterr().err.startswith("chart: ")


class _FakeBenchmark:
    def __init__(self):
        self.extra_info = {}


def test_goal_met_and_missed_are_recorded_and_said(capsys):
    import warnings
    from hclsim.benches.goals import GoalMissed, check_goal
    bench = _FakeBenchmark()
    assert check_goal(bench, "boot", 14.0, 20, unit=" ms") is True
    assert bench.extra_info["goal"] == "<= 20 ms" and bench.extra_info["goal_met"] is True
    assert "boot: 14 ms, goal <= 20 ms: met" in capsys.readouterr().out
    slow = _FakeBenchmark()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert check_goal(slow, "speedup", 69.0, 100, at_most=False, unit="x") is False
    assert slow.extra_info["goal_met"] is False and slow.extra_info["goals"]["speedup"]["value"] == 69.0
    assert "GOAL MISSED: speedup: 69x, goal >= 100x: MISSED" in capsys.readouterr().out
    assert [w.category for w in seen] == [GoalMissed]
    assert check_goal(_FakeBenchmark(), "not timed", None, 1) is None


def test_every_bench_with_a_goal_checks_it():
    from pathlib import Path
    benches = Path(chart.__file__).parent
    for name in ("bench_boot", "bench_exits", "bench_memory", "bench_sidecar", "bench_step", "bench_userspace"):
        assert "check_goal(" in (benches / f"{name}.py").read_text(), name
