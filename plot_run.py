"""A picture of one or more runs, from their metrics.jsonl alone: one panel per quantity, one line per run.

    python plot_run.py runs/vanilla runs/r2m -o runs/compare.png
    python plot_run.py runs/r2m --keys gold/reward policy/clipfrac -o runs/r2m.png    # extra panels

Panels: reward, KL to the reference per response token, ω(t), policy loss, GREBT loss, response length, then
every feedback diagnostic a run logged (keys starting with `feedback/` or `rm/`). A panel no run logged is left
out (a vanilla run has no GREBT loss; it simply has no line there). matplotlib is an optional dependency
(pip install matplotlib), imported only when drawing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Callable, Optional, Union

DIAGNOSTIC_PREFIXES = ("feedback/", "rm/")


def kl_per_token(record: dict) -> Optional[float]:
    """KL(π_θ‖π_ref) per response token: the logged `kl/token` when the run has it, else the per-sequence sum
    divided by the mean response length (the ratio of the step's means, which is what older logs allow)."""
    if "kl/token" in record:
        return record["kl/token"]
    if "kl/sequence" in record and record.get("response/length"):
        return record["kl/sequence"] / record["response/length"]
    return None


Getter = Union[str, Callable[[dict], Optional[float]]]
PANELS: list[tuple[str, Getter]] = [
    ("reward (mean)", "reward/mean"),
    ("KL to reference, per token", kl_per_token),
    ("ω(t)", "omega"),
    ("policy loss", "policy/loss"),
    ("GREBT loss", "rm/grebt"),
    ("response length (tokens)", "response/length"),
]


def read_metrics(run: str) -> list[dict]:
    """The records of a run folder (its metrics.jsonl) or of a metrics file given directly."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise SystemExit(f"error: {run} has no metrics.jsonl (give a run's --output_dir or the file itself)")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise SystemExit(f"error: {path} holds no steps yet")
    return records


def series(records: list[dict], getter: Getter) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have the quantity."""
    get = (lambda r: r.get(getter)) if isinstance(getter, str) else getter
    points = [(r["step"], get(r)) for r in records]
    points = [(s, float(v)) for s, v in points if v is not None and math.isfinite(float(v))]
    return [s for s, _ in points], [v for _, v in points]


def panels_for(runs: dict[str, list[dict]], extra_keys: tuple[str, ...] = ()) -> list[tuple[str, Getter]]:
    """The fixed panels, then the diagnostics and extra keys any run logged; only panels with data."""
    panels = list(PANELS)
    taken = {g for _, g in panels if isinstance(g, str)}
    logged = sorted({k for records in runs.values() for r in records for k in r})
    panels += [(k, k) for k in logged if k.startswith(DIAGNOSTIC_PREFIXES) and k not in taken]
    panels += [(k, k) for k in extra_keys if k not in taken and k not in {g for _, g in panels}]
    return [(title, g) for title, g in panels if any(series(records, g)[0] for records in runs.values())]


def plot_runs(run_dirs: list[str], output: str, labels: Optional[list[str]] = None,
              extra_keys: tuple[str, ...] = (), columns: int = 3) -> dict[str, list[str]]:
    """Draw every run into one PNG (or any format matplotlib writes); returns {panel title: run labels drawn}.
    Each run's reward is its own reward model's (R2M's includes the policy feedback), so compare shapes."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit("error: plot_run.py needs matplotlib: pip install matplotlib") from None
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(run_dirs) or len(set(labels)) != len(labels):
        labels = [os.path.normpath(d) for d in run_dirs]  # same folder names under different parents
    runs = {label: read_metrics(d) for label, d in zip(labels, run_dirs)}
    panels = panels_for(runs, extra_keys)
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows), layout="constrained")  # no pyplot: no display needed
    drawn: dict[str, list[str]] = {}
    for i, (title, getter) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        drawn[title] = []
        for colour, (label, records) in enumerate(runs.items()):
            steps, values = series(records, getter)
            if steps:  # a run keeps its colour in every panel, whichever panels it has
                ax.plot(steps, values, label=label, color=f"C{colour}", linewidth=1.5)
                drawn[title].append(label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    return drawn


def main(argv: Optional[list[str]] = None) -> dict[str, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="Run folders (each with a metrics.jsonl) or metrics files.")
    parser.add_argument("-o", "--output", default="compare.png", help="Picture to write (PNG by its suffix).")
    parser.add_argument("--labels", nargs="+", default=None, help="One legend label per run (default: folder names).")
    parser.add_argument("--keys", nargs="+", default=(), help="Further metric keys to draw, one panel each.")
    args = parser.parse_args(argv)
    drawn = plot_runs(args.runs, args.output, args.labels, tuple(args.keys))
    print(f"wrote {args.output}: {len(drawn)} panels ({', '.join(drawn)}) for {len(args.runs)} run(s)")
    return drawn


if __name__ == "__main__":
    main()
