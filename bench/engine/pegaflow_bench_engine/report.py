"""Figures for people: summaries, a table on stderr (stdout carries the JSON), the TTFT plot."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, p50 and p99 (nearest rank) of some timings, in milliseconds."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    rank = lambda q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]  # noqa: E731
    return {"n": len(values), "mean_ms": 1e3 * statistics.fmean(values), "p50_ms": 1e3 * rank(0.5),
            "p99_ms": 1e3 * rank(0.99)}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (pastes straight into docs/benchmarks.md)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def write_sweep(points: Sequence[dict[str, float]], out_dir: Path, title: str) -> str:
    """TTFT against cached prefix length: a PNG when matplotlib is installed, else a CSV. Returns
    the path written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "ttft-vs-prefix.csv"
    csv.write_text("cached_tokens,prompt_tokens,ttft_ms\n" + "".join(
        f"{p['cached_tokens']},{p['prompt_tokens']},{p['ttft_ms']:.3f}\n" for p in points))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return str(csv)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([p["cached_tokens"] for p in points], [p["ttft_ms"] for p in points], marker="o")
    ax.set_xlabel("prefix served from pegaflow (tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = out_dir / "ttft-vs-prefix.png"
    fig.savefig(png)
    plt.close(fig)
    return str(png)


def main(argv: list[str] | None = None) -> None:
    """``python -m pegaflow_bench_engine.report ttft-vs-prefix.csv [title]``: the PNG from a CSV a
    machine without matplotlib wrote."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m pegaflow_bench_engine.report CSV [TITLE]")
    path = Path(args[0])
    rows = [line.split(",") for line in path.read_text().splitlines()[1:] if line.strip()]
    points = [{"cached_tokens": int(a), "prompt_tokens": int(b), "ttft_ms": float(c)} for a, b, c in rows]
    written = write_sweep(points, path.parent, args[1] if len(args) > 1 else "TTFT vs cached prefix")
    if not written.endswith(".png"):
        raise SystemExit("matplotlib is not installed: pip install matplotlib")
    print(written)


if __name__ == "__main__":
    main()
