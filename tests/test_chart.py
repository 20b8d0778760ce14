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
