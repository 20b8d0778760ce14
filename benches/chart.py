"""Draw the AP bring-up figures of a pytest-benchmark JSON file: time against vCPU count.

    .venv/bin/pytest benches/bench_sidecar.py --benchmark-only --benchmark-json=sidecar.json
    .venv/bin/python -m hclsim.benches.chart sidecar.json -o bring-up.png
"""
import argparse
import json
import sys


def bring_up_points(report: dict, prefix: str = "test_ap_bring_up[") -> list[tuple[int, float, float, float]]:
    """(vCPUs, median ms, min ms, max ms) of every run whose name starts with prefix, by vCPU count."""
    points = []
    for bench in report.get("benchmarks", []):
        if bench["name"].startswith(prefix):
            cpus = bench.get("extra_info", {}).get("cpus") or int(bench["param"])
            s = bench["stats"]
            points.append((cpus, s["median"] * 1e3, s["min"] * 1e3, s["max"] * 1e3))
    return sorted(points)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("-o", "--output", default="bring-up.png", help="image to write (.png or .svg)")
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("chart: matplotlib is needed: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 1
    with open(args.json) as f:
        report = json.load(f)
    points = bring_up_points(report)
    if not points:
        print(f"chart: {args.json} has no test_ap_bring_up results", file=sys.stderr)
        return 1
    cpus, median, low, high = zip(*points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.errorbar(cpus, median, yerr=[[m - l for m, l in zip(median, low)], [h - m for m, h in zip(median, high)]],
                marker="o", capsize=3, label="sidecar_entry → all APs IDLE (median, min–max)")
    baseline = bring_up_points(report, "test_ap_bring_up_baseline_engine_per_vcpu[")
    if baseline:
        b_cpus, b_median, _, _ = zip(*baseline)
        ax.plot(b_cpus, b_median, marker="s", linestyle=":", label="baseline: one Unicorn instance per vCPU")
    ax.axhline(50, color="tab:red", linestyle="--", linewidth=1, label="goal at 1024 vCPUs: 50 ms")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("vCPUs")
    ax.set_ylabel("bring-up time (ms)")
    ax.set_title("hclsim sidecar AP bring-up")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
