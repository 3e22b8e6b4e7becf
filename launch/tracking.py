"""Opt-in experiment tracking: TensorBoard or Weights & Biases see what metrics.jsonl sees.

    python train_tldr.py --report_to tensorboard     # then: tensorboard --logdir runs/r2m/tensorboard
    WANDB_MODE=offline python train_tldr.py --report_to wandb    # later: wandb sync runs/r2m/wandb/offline-run-*

The training loop (`r2m.train`) knows nothing about either tool. It takes one optional `tracker` and calls
    tracker.log(record, samples)     once per step
with the very dict it appends to metrics.jsonl and the (prompt, response, reward) rows it printed at that step
(every --sample_every steps; an empty list otherwise). The run's full config is logged once, when the tracker
is made (`make_tracker`). `tensorboard` and `wandb`
are optional dependencies: imported only when chosen, with a one-line error naming the pip install.
"""

from __future__ import annotations

import json
import os
from typing import Optional

REPORT_TO = ("none", "tensorboard", "wandb")


def _numbers(record: dict) -> dict[str, float]:
    """The record's scalar entries, without the step itself (that is the x axis)."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """The default: logs nothing (metrics.jsonl and the console are written by the loop itself)."""

    def log(self, record: dict, samples: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files under output_dir/tensorboard: one scalar curve per metric, the config and the sample table
    as text (Markdown tables, which TensorBoard's text tab renders)."""

    def __init__(self, log_dir: str, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("error: --report_to tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=log_dir)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```", 0)

    def log(self, record: dict, samples: list[dict]) -> None:
        step = record["step"]
        for key, value in _numbers(record).items():
            self.writer.add_scalar(key, value, step)
        if samples:
            escape = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731  a cell stays one cell
            lines = ["| prompt | response | reward |", "|---|---|---|"]
            lines += [f"| {escape(r['prompt'])} | {escape(r['response'])} | {r['reward']:+.4f} |" for r in samples]
            self.writer.add_text("samples", "\n".join(lines), step)
        self.writer.flush()  # nothing lost on a crash: each step is on disk once logged

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run named after output_dir, its files under output_dir/wandb. WANDB_MODE=offline writes it
    locally (no account, no network) for a later `wandb sync`. The samples are one table that grows: each
    log holds every row so far, so the last version shows the whole run."""

    def __init__(self, output_dir: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: --report_to wandb needs the wandb package: pip install wandb") from None
        self.wandb = wandb
        os.makedirs(output_dir, exist_ok=True)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "r2m"),
                name=os.path.basename(os.path.normpath(output_dir)),
                dir=output_dir,
                config=config,
            )
        except Exception as e:  # noqa: BLE001 - e.g. no API key; the user needs one line and a way out
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SystemExit(f"error: wandb could not start a run ({first}); `wandb login`, or WANDB_MODE=offline") from None
        self.sample_rows: list[list] = []

    def log(self, record: dict, samples: list[dict]) -> None:
        step, data = record["step"], _numbers(record)
        if samples:
            self.sample_rows += [[step, r["prompt"], r["response"], r["reward"]] for r in samples]
            data["samples"] = self.wandb.Table(columns=["step", "prompt", "response", "reward"], data=self.sample_rows)
        # One call per step, committed at once: W&B drops anything logged later at a step it has committed.
        self.run.log(data, step=step, commit=True)

    def close(self) -> None:
        self.run.finish()


def make_tracker(report_to: str, output_dir: str, config: Optional[dict] = None) -> Tracker:
    """The tracker `--report_to` names, with the run's config logged once."""
    config = config or {}
    if report_to == "none":
        return Tracker()
    if report_to == "tensorboard":
        return TensorBoardTracker(os.path.join(output_dir, "tensorboard"), config)
    if report_to == "wandb":
        return WandbTracker(output_dir, config)
    raise SystemExit(f"error: --report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
