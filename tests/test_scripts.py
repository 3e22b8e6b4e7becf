"""The training scripts as a user runs them: end to end, resume, and clear errors on bad input."""

import json
import os
import subprocess
import sys

import pytest
from helpers import LEARNING_SEED, below, learned

from launch import flags as launch_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers import ENV  # noqa: E402  (the scripts' environment, PYTHONPATH included)


def run(script, *args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=ENV,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("script", ["train_tldr.py", "train_ultrafeedback.py"])
def test_tiny_preset_runs_and_resumes(tmp_path, script):
    out = str(tmp_path / "run")
    first = run(script, "--preset", "tiny", "--output_dir", out, "--total_trajectories", "96", "--save_every", "2")
    assert [m["step"] for m in metrics(out)] == [0, 1, 2]
    ckpt = os.path.join(out, "checkpoint")
    assert os.path.exists(os.path.join(ckpt, "state.pt"))
    assert os.path.exists(os.path.join(ckpt, "policy", "config.json"))
    assert "step    2" in first.stderr + first.stdout
    # a crash after step 2's metrics but before its checkpoint: fake it by rolling the checkpoint back to step 1
    import torch

    state_path = os.path.join(ckpt, "state.pt")
    state = torch.load(state_path, weights_only=False)
    state["step"] = 1
    torch.save(state, state_path)
    # resume with a longer budget: continues at step 2, keeps the earlier curve without duplicating step 2
    second = run(script, "--preset", "tiny", "--output_dir", out, "--total_trajectories", "160", "--resume", "true")
    assert "resumed" in second.stderr + second.stdout
    steps = [m["step"] for m in metrics(out)]
    assert steps == [0, 1, 2, 3, 4]
    assert all(m["omega"] >= 0.6 for m in metrics(out))
    # resuming under other settings is refused with one clear line
    third = run(script, "--preset", "tiny", "--output_dir", out, "--resume", "true", "--reward", "vanilla", check=False)
    assert third.returncode != 0 and "written with --reward r2m" in third.stderr.strip().splitlines()[-1]


def test_bad_inputs_get_one_clear_line(tmp_path):
    cases = []
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text(json.dumps({"text": "hello"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases.append((["--dataset", str(no_prompt)], "no column"))
    cases.append((["--dataset", str(empty)], "error:"))
    cases.append((["--group_size", "1"], "group_size must be at least 2"))
    cases.append((["--preset", "paper", "--policy_model", str(tmp_path / "missing"),
                   "--reward_model", str(tmp_path / "missing_rm"), "--device", "cpu", "--dataset",
                   os.path.join(ROOT, "data", "tldr_tiny.jsonl")], "could not load policy"))
    for args, message in cases:
        preset = [] if "--preset" in args else ["--preset", "tiny"]
        proc = run("train_tldr.py", *preset, "--output_dir", str(tmp_path / "o"), *args, check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode != 0, args
        assert last.startswith("error:") and message in last, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, args


def test_every_flag_has_help():
    import dataclasses

    import r2m

    # the loop's help texts live with the flags (launch/flags.py), one per field of r2m.R2MConfig
    assert set(launch_flags.LOOP_HELP) == {f.name for f in dataclasses.fields(r2m.R2MConfig)}
    for cls in (launch_flags.loop_flags(), launch_flags.TLDRArgs, launch_flags.UltraFeedbackArgs):
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} has no help text"
    proc = run("train_tldr.py", "--help")
    assert "--omega_floor" in proc.stdout and "floor of the" in proc.stdout


@pytest.mark.parametrize("script", ["train_tldr.py", "train_ultrafeedback.py"])
def test_brme_tiny_preset_saves_heads_and_resumes_without_refitting(tmp_path, script):
    import torch

    out = str(tmp_path / "brme")
    first = run(script, "--preset", "tiny", "--reward", "brme", "--output_dir", out, "--total_trajectories", "64")
    assert "BRME: 5 heads" in first.stdout + first.stderr
    state = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False)
    assert state["reward_model"]["heads"]["weight"].shape[0] == 2 * 5 and state["reward_model"]["lam"] == 0.4
    second = run(script, "--preset", "tiny", "--reward", "brme", "--output_dir", out,
                 "--total_trajectories", "96", "--resume", "true")
    assert "BRME: 5 heads" not in second.stdout + second.stderr  # heads come back from the checkpoint
    assert [m["step"] for m in metrics(out)] == [0, 1, 2]


def test_brme_without_preference_file_is_a_clear_error(tmp_path):
    proc = run("train_tldr.py", "--preset", "tiny", "--reward", "brme", "--brme_preference_file", "",
               "--output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode != 0 and "needs --brme_preference_file" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("script", ["train_tldr.py", "train_ultrafeedback.py"])
@pytest.mark.parametrize("row", [("--algo", "remax"), ("--algo", "reinforce_pp"), ("--reward", "pretrained_rm")])
def test_every_paper_row_runs_on_the_tiny_presets(tmp_path, script, row):
    """ReMax, REINFORCE++ and the Pretrained RM run from both scripts; the fine-tuned RM is saved with the
    checkpoint, so a resume does not fine-tune it again."""
    import torch

    out = str(tmp_path / "run")
    first = run(script, "--preset", "tiny", *row, "--output_dir", out, "--total_trajectories", "64")
    assert [m["step"] for m in metrics(out)] == [0, 1]
    assert all(m["reward/mean"] == m["reward/mean"] for m in metrics(out))  # finite, not NaN
    if row[1] == "pretrained_rm":
        assert "Pretrained RM: BT fine-tuning" in first.stdout + first.stderr
        state = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False)
        assert "body" in state["reward_model"]
        second = run(script, "--preset", "tiny", *row, "--output_dir", out, "--total_trajectories", "96",
                     "--resume", "true")
        assert "Pretrained RM: BT fine-tuning" not in second.stdout + second.stderr
        assert [m["step"] for m in metrics(out)] == [0, 1, 2]


@pytest.mark.learning
@pytest.mark.parametrize("script", ["train_tldr.py", "train_ultrafeedback.py"])
def test_the_quick_start_is_a_healthy_run(tmp_path, script):
    """The README's first command as a newcomer runs it (here in a folder of its own): the reward rises while the
    KL to the reference stays moderate, no progress bar of transformers' interleaves the step lines, and the run
    ends with a summary saying where its files are and what to run next."""
    out = str(tmp_path / "run")
    proc = run(script, "--preset", "tiny", "--output_dir", out, "--seed", str(LEARNING_SEED))
    records = metrics(out)
    rewards = [m["reward/mean"] for m in records]
    assert len(records) == 16
    assert learned(sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3, 0.25 * records[0]["reward/std"]), rewards
    assert below(records[-1]["kl/sequence"], 2.0), [m["kl/sequence"] for m in records]
    log = proc.stdout + proc.stderr
    assert "Writing model shards" not in log
    summary = log[log.index("done: 16 steps"):].splitlines()
    assert summary[1].strip() == f"metrics:    {out}/metrics.jsonl" and summary[2].strip().startswith(f"checkpoint: {out}/checkpoint (step 15")
    assert summary[3].strip().startswith("plot it:    python plot_run.py") and "python eval_judge.py" in summary[4]


@pytest.mark.parametrize("path", ["train_tldr.py", "train_ultrafeedback.py", "benchmarks/gpu_check.py"])
def test_cuda_memory_expands_its_segments_unless_the_user_chose_otherwise(path):
    """Generation grows and frees its cache at a new length every step: the scripts and the GPU check ask the CUDA
    allocator for expandable segments before anything starts CUDA, and leave a user's own setting alone."""
    code = f"import os, runpy; runpy.run_path({os.path.join(ROOT, path)!r}); print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    unset = {k: v for k, v in ENV.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    for env, expected in ((unset, "expandable_segments:True"), ({**unset, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"},
                                                               "max_split_size_mb:64")):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.split()[-1] == expected, proc.stderr[-2000:]
