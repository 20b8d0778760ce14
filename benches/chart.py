"""Draw the AP bring-up figures of a pytest-benchmark JSON file: time against vCPU count.

    .venv/bin/pytest benches/bench_sidecar.py --benchmark-only --benchmark-json=sidecar.json
    .venv/bin/python -m hclsim.benches.chart sidecar.json -o bring-up.png

The vCPU counts are the x axis's tick labels (8, 64, 256, ...); the goal (50 ms at 1024 vCPUs)
is drawn at its size only; each baseline point carries its pooled/baseline ratio; the legend sits
below the plot, clear of the data. Times are host wall-clock (pytest-benchmark), while
`hclsim boot` reports the bring-up in guest time (reference time, from instruction counts).
"""
import argparse
import json
import sys

GOAL_CPUS, GOAL_MS = 1024, 50.0
NOTE = ("times: host wall-clock seconds measured by pytest-benchmark; `hclsim boot` reports the "
        "bring-up in guest time")


def bring_up_points(report: dict, prefix: str = "test_ap_bring_up[") -> list[tuple[int, float, float, float]]:
    """(vCPUs, median ms, min ms, max ms) of every run whose name starts with prefix, by vCPU count."""
    points = []
    for bench in report.get("benchmarks", []):
        if bench["name"].startswith(prefix):
            cpus = bench.get("extra_info", {}).get("cpus") or int(bench["param"])
            s = bench["stats"]
            points.append((cpus, s["median"] * 1e3, s["min"] * 1e3, s["max"] * 1e3))
    return sorted(points)


def speedups(pooled, baseline) -> dict[int, float]:
    """vCPUs -> baseline median / pooled median, where both were measured."""
    pooled_ms = {cpus: median for cpus, median, _, _ in pooled}
    return {cpus: median / pooled_ms[cpus] for cpus, median, _, _ in baseline if pooled_ms.get(cpus)}


def draw(report: dict):
    """The figure (matplotlib), or None if the report has no bring-up results."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    points = bring_up_points(report)
    if not points:
        return None
    baseline = bring_up_points(report, "test_ap_bring_up_baseline_engine_per_vcpu[")
    cpus, median, low, high = zip(*points)
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    ax.errorbar(cpus, median, yerr=[[m - l for m, l in zip(median, low)], [h - m for m, h in zip(median, high)]],
                marker="o", capsize=3, label="pooled engines: sidecar_entry → all APs IDLE (median, min–max)")
    if baseline:
        b_cpus, b_median, _, _ = zip(*baseline)
        ax.plot(b_cpus, b_median, marker="s", linestyle=":", label="baseline: one Unicorn instance per vCPU (median)")
        for n, ratio in speedups(points, baseline).items():
            b = next(m for c, m, _, _ in baseline if c == n)
            ax.annotate(f"pooled {ratio:.0f}× faster", (n, b), textcoords="offset points", xytext=(-7, 4),
                        ha="right", va="bottom", fontsize=8, color="tab:orange")
    ax.plot([GOAL_CPUS], [GOAL_MS], marker="_", markersize=24, markeredgewidth=2.5, linestyle="none",
            color="tab:red", label=f"goal: ≤ {GOAL_MS:g} ms at {GOAL_CPUS} vCPUs")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(set(cpus) | ({c for c, *_ in baseline} if baseline else set()) | {GOAL_CPUS})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("vCPUs")
    ax.set_ylabel("bring-up time (ms, host wall-clock)")
    ax.set_title("hclsim sidecar AP bring-up")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.08, y=0.15)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False, fontsize=9)
    fig.text(0.01, 0.01, NOTE, fontsize=7.5, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("-o", "--output", default="bring-up.png", help="image to write (.png or .svg)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("chart: matplotlib is needed: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 1
    try:
        with open(args.json) as f:
            report = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"chart: {args.json}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    fig = draw(report)
    if fig is None:
        print(f"chart: {args.json} has no test_ap_bring_up results", file=sys.stderr)
        return 1
    fig.savefig(args.output, bbox_inches="tight")
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
