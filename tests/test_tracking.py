"""Experiment tracking (tracking.py): what the loop hands a tracker, TensorBoard's event file read back with
TensorBoard's own reader, W&B in offline mode, and one clear line when a tracker's package is missing."""

import glob
import json
import os
import subprocess
import sys

import pytest

import r2m
from launch import tracking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers import ENV  # noqa: E402  (the scripts' environment, PYTHONPATH included)


def tiny_run(tmp_path, tokenizer, models, prompts, tracker, steps=3, sample_every=2):
    policy, ref_policy, rm = models
    cfg = r2m.R2MConfig(
        queries_per_step=4, group_size=2, total_trajectories=8 * steps, max_new_tokens=4, d_attn=16,
        policy_minibatch_size=8, micro_batch_size=4, forward_batch_size=8, generation_batch_size=8, rm_lr=1e-2,
        device="cpu", output_dir=str(tmp_path / "run"), save_every=0, sample_every=sample_every,
    )
    history = r2m.train(policy, ref_policy, r2m.R2MRewardModel(rm, 64, 16), tokenizer, prompts, cfg, tracker=tracker)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        return history, [json.loads(line) for line in f]


class Recorder(tracking.Tracker):
    def __init__(self):
        self.records, self.samples = [], []

    def log(self, record, samples):
        self.records.append(dict(record))
        if samples:
            self.samples.append((record["step"], samples))


def test_the_loop_hands_the_tracker_each_metrics_record_and_the_printed_samples(tmp_path, tokenizer, models, prompts, capsys):
    recorder = Recorder()
    history, lines = tiny_run(tmp_path, tokenizer, models, prompts, recorder, steps=3, sample_every=2)
    assert recorder.records == lines == history  # the very records of metrics.jsonl, once per step
    assert [step for step, _ in recorder.samples] == [0, 2]
    printed = capsys.readouterr()
    for step, rows in recorder.samples:
        assert len(rows) == 2 and all(set(r) == {"prompt", "response", "reward"} for r in rows)
        for r in rows:  # the same samples the console shows
            assert f"{r['response']!r}  reward {r['reward']:+.3f}" in printed.err + printed.out


def test_tensorboard_event_file_reads_back_with_tensorboards_reader(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (.ci/run installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_tldr.py"), "--preset", "tiny", "--output_dir",
                           str(out), "--total_trajectories", "160", "--report_to", "tensorboard"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    numeric = [k for k in lines[0] if k != "step"]
    assert set(events.Tags()["scalars"]) == set(numeric)
    for key in numeric:  # every metric, every step, the values of metrics.jsonl (stored as float32)
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [m["step"] for m in lines] == [0, 1, 2, 3, 4]
        assert all(v == pytest.approx(m[key], rel=1e-6, abs=1e-6) for (_, v), m in zip(got, lines))
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(config.strip("`\n")) == json.load(open(out / "config.json"))  # the full config, once
    samples = events.Tensors("samples/text_summary")
    assert [s.step for s in samples] == [0, 4]  # the tiny preset's --sample_every 4
    table = samples[0].tensor_proto.string_val[0].decode().splitlines()
    assert table[0] == "| prompt | response | reward |" and len(table) == 2 + 2


def test_wandb_offline_run(tmp_path, tokenizer, models, prompts, monkeypatch):
    pytest.importorskip("wandb", reason="pip install wandb (.ci/run installs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    tracker = tracking.make_tracker("wandb", str(out), {"algo": "rloo", "note": "offline"})
    try:
        history, lines = tiny_run(tmp_path, tokenizer, models, prompts, tracker, steps=3, sample_every=2)
        assert tracker.run.offline
        assert dict(tracker.run.config) == {"algo": "rloo", "note": "offline"}
        last = history[-1]
        for key in ("reward/mean", "omega", "kl/sequence", "rm/grebt"):
            assert tracker.run.summary[key] == pytest.approx(last[key])
        assert tracker.sample_rows and [row[0] for row in tracker.sample_rows] == [0, 0, 2, 2]
    finally:
        tracker.close()
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1  # written locally for a later `wandb sync`
    assert os.path.getsize(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0]) > 0
    tables = sorted(glob.glob(os.path.join(runs[0], "files", "media", "table", "samples_*.table.json")))
    newest = max((json.load(open(t)) for t in tables), key=lambda t: len(t["data"]))
    assert newest["columns"] == ["step", "prompt", "response", "reward"] and len(newest["data"]) == 4


@pytest.mark.parametrize("report_to,module,package", [
    ("tensorboard", "torch.utils.tensorboard", "tensorboard"), ("wandb", "wandb", "wandb"),
])
def test_missing_tracker_package_is_one_clear_line(tmp_path, monkeypatch, report_to, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if it were not installed
    with pytest.raises(SystemExit) as e:
        tracking.make_tracker(report_to, str(tmp_path), {})
    assert str(e.value) == f"error: --report_to {report_to} needs the {package} package: pip install {package}"


def test_bad_report_to_is_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_tldr.py"), "--preset", "tiny", "--output_dir",
                           str(tmp_path / "o"), "--report_to", "mlflow"], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "error: --report_to must be one of none, tensorboard, wandb, got 'mlflow'"


def test_wandb_without_an_account_is_one_clear_line(tmp_path):
    """Online mode with no stored login and no key: one line that says what to do (a fresh interpreter, since
    W&B keeps process-wide settings from earlier runs)."""
    pytest.importorskip("wandb", reason="pip install wandb (.ci/run installs it)")
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"))  # no ~/.netrc, no login
    proc = subprocess.run([sys.executable, "-c", f"from launch import tracking; tracking.make_tracker('wandb', {str(tmp_path / 'run')!r}, {{}})"],
                          env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("error: wandb could not start a run (") and "WANDB_MODE=offline" in last
    assert "Traceback" not in proc.stderr
