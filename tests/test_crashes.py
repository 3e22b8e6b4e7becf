"""A run is never lost: no silent overwrite, crash-safe checkpoints, consistent resume, no non-finite state,
one clear line for every bad input. Real subprocesses, killed with SIGKILL where a crash is the point."""

import copy
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import r2m
import train_tldr
import train_ultrafeedback
from launch import flags as launch_flags
from launch import runner, tiny
from plumbing import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers import ENV as _ENV  # noqa: E402

ENV = {**_ENV, "OMP_NUM_THREADS": "1"}


def command(script, *args):
    return [sys.executable, os.path.join(ROOT, script), *args]


def run(script, *args, env=None, check=True, limit_file_size=None):
    preexec = None
    if limit_file_size is not None:  # every write that would grow a file past this many bytes fails (EFBIG)
        preexec = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))  # noqa: E731
    proc = subprocess.run(command(script, *args), env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=300, preexec_fn=preexec)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


def assert_one_line_error(proc, *words):
    assert proc.returncode not in (0, -9), proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith("error:") and all(w in line for w in words), (words, proc.stderr[-2000:])


def strict_metrics(out):
    """metrics.jsonl as strict JSON: a bare NaN / Infinity token fails."""
    def refuse(token):
        raise AssertionError(f"metrics.jsonl holds a bare {token}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def comparable(records):
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in records]


def final_weights(out):
    ckpt = os.path.join(out, "checkpoint")
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    return load_file(os.path.join(ckpt, "policy", "model.safetensors")), state["reward_model"], state["optimizers"]


def assert_same_tensors(a, b):
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


# 6 steps of 8 prompts x 4, checkpoints after steps 1, 3 and 5
SIX_STEPS = ["--preset", "tiny", "--total_trajectories", str(6 * 32), "--save_every", "2", "--sample_every", "0"]


def tiny_cfg(tmp_path, **overrides):
    base = dict(queries_per_step=8, group_size=4, total_trajectories=8 * 4 * 6, max_new_tokens=4, policy_lr=1e-3,
                rm_lr=1e-2, d_attn=16, policy_minibatch_size=16, micro_batch_size=8, forward_batch_size=32,
                generation_batch_size=32, rm_minibatch_groups=4, device="cpu", output_dir=str(tmp_path / "run"),
                save_every=1, sample_every=0)
    base.update(overrides)
    return r2m.R2MConfig(**base)


def tldr_flags(out, *flags):
    return launch_flags.parse_flags(launch_flags.TLDRArgs, launch_flags.TLDR_PRESETS, ["--preset", "tiny", "--output_dir", out, *flags])


def refused(parse, *args):
    with pytest.raises(SystemExit) as e:
        parse(*args)
    assert str(e.value).startswith("error:") and "\n" not in str(e.value)
    return str(e.value)


# --- point 1: a fresh run never writes over a finished one -------------------------------------------------------


def test_fresh_run_into_a_finished_run_is_refused_and_overwrite_replaces_it(tmp_path, tokenizer, models, prompts):
    policy, ref_policy, rm = models
    cfg = tiny_cfg(tmp_path, total_trajectories=64)
    r2m.train(copy.deepcopy(policy), ref_policy, r2m.R2MRewardModel(copy.deepcopy(rm), 64, 16), tokenizer, prompts, cfg)
    files = {p: open(os.path.join(cfg.output_dir, p), "rb").read() for p in ("metrics.jsonl", "checkpoint/state.pt")}
    message = refused(tldr_flags, cfg.output_dir)  # as the scripts check it, before any model loads
    assert all(w in message for w in ("already holds a run", "--resume true", "--overwrite true", "--output_dir"))
    with pytest.raises(checkpoints.TrainingError, match="already holds a run"):  # and as the loop checks it
        r2m.train(copy.deepcopy(policy), ref_policy, r2m.R2MRewardModel(copy.deepcopy(rm), 64, 16), tokenizer,
                  prompts, cfg)
    assert all(open(os.path.join(cfg.output_dir, p), "rb").read() == data for p, data in files.items())
    # a folder holding only metrics (a run stopped before its first checkpoint) is a run too
    shutil.rmtree(os.path.join(cfg.output_dir, "checkpoint"))
    assert "already holds a run" in refused(tldr_flags, cfg.output_dir)
    # --overwrite true starts over: one step now, the old curve gone
    r2m.train(policy, ref_policy, r2m.R2MRewardModel(rm, 64, 16), tokenizer, prompts,
              tiny_cfg(tmp_path, total_trajectories=32, save_every=0, overwrite=True))
    assert [m["step"] for m in strict_metrics(cfg.output_dir)] == [0]


# --- point 2 and the exact-resume property: SIGKILL between checkpoints and between the two renames ---------------


def test_killed_runs_resume_exactly_and_a_kill_between_the_renames_loses_nothing(tmp_path):
    reference = str(tmp_path / "reference")
    run("train_tldr.py", *SIX_STEPS, "--output_dir", reference)
    expected, expected_weights = comparable(strict_metrics(reference)), final_weights(reference)
    assert [m["step"] for m in expected] == list(range(6))

    # 1) SIGKILL from outside once step 4's metrics are written: between the checkpoints of steps 3 and 5
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(command("train_tldr.py", *SIX_STEPS, "--output_dir", out), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics_path, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics_path) and '"step": 4' in open(metrics_path).read():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = run("train_tldr.py", *SIX_STEPS, "--output_dir", out, "--resume", "true")
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert comparable(strict_metrics(out)) == expected
    assert_same_tensors(final_weights(out), expected_weights)

    # 2) SIGKILL between `checkpoint -> checkpoint.old` and `checkpoint.tmp -> checkpoint` of step 3's save
    out = str(tmp_path / "renames")
    crashed = run("train_tldr.py", *SIX_STEPS, "--output_dir", out, env={"R2M_TEST_KILL_BETWEEN_RENAMES": "3"},
                  check=False)
    assert crashed.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "checkpoint"))
    assert os.path.exists(os.path.join(out, "checkpoint.old")) and os.path.exists(os.path.join(out, "checkpoint.tmp"))
    resumed = run("train_tldr.py", *SIX_STEPS, "--output_dir", out, "--resume", "true")
    log = resumed.stdout + resumed.stderr
    assert "at step 4/6" in log and "step    0 |" not in log  # from .tmp's step 3, not from scratch
    assert comparable(strict_metrics(out)) == expected
    assert_same_tensors(final_weights(out), expected_weights)
    assert sorted(os.listdir(out)) == ["checkpoint", "config.json", "metrics.jsonl"]  # no .old / .tmp left


def test_newest_complete_checkpoint_wins_and_an_unmarked_one_never_counts(tmp_path):
    out = tmp_path
    for name, step in [("checkpoint.old", 3), ("checkpoint.tmp", 7)]:
        (out / name).mkdir()
        (out / name / checkpoints.COMPLETE_MARKER).write_text(json.dumps({"step": step, "config": {}}))
    assert checkpoints.find_checkpoint(str(out)) == str(out / "checkpoint.tmp")
    (out / "checkpoint.tmp" / checkpoints.COMPLETE_MARKER).write_text('{"step": 7, "con')  # cut short by a crash
    assert checkpoints.find_checkpoint(str(out)) == str(out / "checkpoint.old")
    (out / "checkpoint.old" / checkpoints.COMPLETE_MARKER).unlink()
    assert checkpoints.find_checkpoint(str(out)) is None and not checkpoints.has_checkpoint(str(out))


# --- point 3: --resume true with nothing to resume --------------------------------------------------------------


def test_resume_without_a_checkpoint(tmp_path, tokenizer, models, prompts, capsys):
    with_metrics = tmp_path / "metrics_only"
    with_metrics.mkdir()
    (with_metrics / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward/mean": 0.1}) + "\n")
    message = refused(tldr_flags, str(with_metrics), "--resume", "true")
    assert "no complete checkpoint" in message and "--overwrite true" in message
    assert (with_metrics / "metrics.jsonl").read_text().count("\n") == 1  # untouched
    policy, ref_policy, rm = models
    cfg = tiny_cfg(tmp_path, output_dir=str(tmp_path / "empty"), resume=True, total_trajectories=32)
    r2m.train(policy, ref_policy, r2m.R2MRewardModel(rm, 64, 16), tokenizer, prompts, cfg)
    assert "holds no run yet: starting a new run at step 0" in capsys.readouterr().out
    assert [m["step"] for m in strict_metrics(cfg.output_dir)] == [0]


# --- point 4: settings on resume: must match / may change (applied) / from the checkpoint ----------------------------


def test_resume_settings_must_match_or_are_applied(tmp_path, capsys):
    out = str(tmp_path / "run")
    train_tldr.main(["--preset", "tiny", "--output_dir", out, "--total_trajectories", "64", "--save_every", "1",
                     "--sample_every", "0"])
    # must match: one line naming the saved and the given value, before any model loads
    for flag, given, saved in [("--group_size", "2", "4"), ("--queries_per_step", "4", "8"), ("--d_attn", "16", "32"),
                               ("--omega_floor", "0.7", "0.6"), ("--alpha", "0.5", "0.3"), ("--beta", "0.2", "0.1"),
                               ("--clip_eps", "0.3", "0.2"), ("--temperature", "1.0", "0.7"),
                               ("--brme_lambda", "0.2", "0.4"), ("--brme_heads", "3", "5"), ("--seed", "1", "0")]:
        with pytest.raises(SystemExit) as e:
            launch_flags.parse_flags(launch_flags.TLDRArgs, launch_flags.TLDR_PRESETS,
                               ["--preset", "tiny", "--output_dir", out, "--resume", "true", flag, given])
        assert str(e.value) == (f"error: {out} was written with {flag} {saved}, not {given}; resume with {flag} "
                                f"{saved}, or start over with --overwrite true or another --output_dir")
    # taken from the checkpoint: BRME's fitting settings, with a note
    saved = dataclasses.asdict(r2m.R2MConfig(reward="brme", brme_epochs=10))
    assert checkpoints.resume_notes(saved, r2m.R2MConfig(reward="brme", brme_epochs=3), "the fitted BRME heads") == [
        "--brme_epochs 3 is not used: the checkpoint holds the fitted BRME heads (brme_epochs was 10)"]
    # may change: a longer run and a new learning rate, both really applied from the first resumed step
    capsys.readouterr()
    train_tldr.main(["--preset", "tiny", "--output_dir", out, "--resume", "true", "--total_trajectories", "128",
                     "--policy_lr", "5e-3", "--save_every", "1", "--sample_every", "0"])
    log = capsys.readouterr().out
    assert "--total_trajectories 128 (the checkpoint's: 64)" in log and "--policy_lr 0.005 (the checkpoint's: 0.0005)" in log
    records = strict_metrics(out)
    assert [m["step"] for m in records] == [0, 1, 2, 3]
    T = 4
    for m in records[2:]:
        assert m["omega"] == r2m.omega(m["step"], T, 0.6)  # ω(t) over the new T
        assert m["lr/policy"] == pytest.approx(5e-3 * (1 - (m["step"] + 1) / T), rel=1e-12)  # new peak, new T
    assert records[0]["lr/policy"] == pytest.approx(5e-4 * (1 - 1 / 2))  # before: the saved run's own


# --- point 5: non-finite values are skipped, counted, stopped, never saved; metrics stay strict JSON ----------------


def test_reward_model_with_infinite_scores_stops_after_skipped_steps(tmp_path, tokenizer, models, prompts):
    policy, ref_policy, rm = models
    with torch.no_grad():
        rm.score.weight.fill_(float("inf"))  # every reward is ±inf or NaN
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    reward_model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16)
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(checkpoints.TrainingError) as e:
        r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, cfg)
    assert str(e.value).startswith("step 2: reward/mean was not finite in 3 steps in a row")
    records = strict_metrics(cfg.output_dir)
    assert [m["step"] for m in records] == [0, 1, 2]
    assert all(m["reward/mean"] is None and m["nonfinite/skipped_updates"] > 0 for m in records)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())  # every update was skipped
    assert not checkpoints.has_checkpoint(cfg.output_dir)  # and no checkpoint was written after a non-finite step


def test_a_nonfinite_gradient_step_is_skipped_and_counted():
    weight = torch.nn.Parameter(torch.ones(3))
    opt = checkpoints.SkipNonFiniteSteps(torch.optim.AdamW([weight], lr=0.1))
    weight.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.skipped == 1 and torch.equal(weight.detach(), torch.ones(3)) and weight.grad is None
    weight.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    assert opt.skipped == 1 and not torch.equal(weight.detach(), torch.ones(3))


def test_a_checkpoint_with_a_nonfinite_tensor_is_never_written(tmp_path, tokenizer, models, prompts):
    policy, ref_policy, rm = models
    reward_model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16)
    cfg = tiny_cfg(tmp_path, total_trajectories=32)
    r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, cfg)
    good = open(os.path.join(cfg.output_dir, "checkpoint", "state.pt"), "rb").read()
    with torch.no_grad():
        reward_model.score_head.weight[0, 0] = float("nan")
    opt = torch.optim.AdamW(policy.parameters())
    with pytest.raises(checkpoints.TrainingError, match="non-finite tensors .first: reward_model.score_head.weight"):
        checkpoints.save_checkpoint(cfg.output_dir, 1, policy, tokenizer, reward_model, {"policy": opt}, {}, cfg)
    assert open(os.path.join(cfg.output_dir, "checkpoint", "state.pt"), "rb").read() == good
    assert checkpoints.find_checkpoint(cfg.output_dir) == os.path.join(cfg.output_dir, "checkpoint")


def test_a_run_that_ends_on_nonfinite_steps_exits_non_zero_without_scheduler_warnings(tmp_path):
    """An RM whose scores are infinite, a 2-step run (fewer steps than --max_nonfinite_steps): both updates are
    skipped and no checkpoint is written, so the run must not end as a finished one (exit 0). And a skipped first
    update is no misordered lr_scheduler.step(): PyTorch's warning about it is not printed."""
    from transformers import AutoModelForSequenceClassification

    paths = tiny.save_models(str(tmp_path / "models"))
    rm = AutoModelForSequenceClassification.from_pretrained(paths["reward_model"])
    with torch.no_grad():
        rm.score.weight.fill_(float("inf"))
    rm.save_pretrained(paths["reward_model"])
    out = str(tmp_path / "run")
    flags = ["--policy_model", paths["policy"], "--reward_model", paths["reward_model"], "--dataset", tiny.TLDR_TINY,
             "--device", "cpu", "--queries_per_step", "8", "--total_trajectories", "64", "--max_new_tokens", "4",
             "--policy_minibatch_size", "16", "--micro_batch_size", "8", "--forward_batch_size", "32",
             "--generation_batch_size", "32", "--rm_minibatch_groups", "4", "--d_attn", "16", "--max_prompt_tokens", "128",
             "--save_every", "1", "--output_dir", out]
    proc = run("train_tldr.py", *flags, check=False)
    assert_one_line_error(proc, "step 1: reward/mean was not finite in 2 steps in a row", "the run ended there",
                          "--resume true")
    assert "lr_scheduler.step()" not in proc.stderr + proc.stdout
    assert [m["step"] for m in strict_metrics(out)] == [0, 1] and not checkpoints.has_checkpoint(out)


def test_diverging_learning_rate_stops_with_one_line_and_no_checkpoint(tmp_path):
    """A learning rate that blows the policy up: its sampling probabilities overflow at once. (Non-finite losses and
    rewards, and their streak, are the infinite-RM tests above.)"""
    out = str(tmp_path / "run")
    for lr, words in [("1e6", "error: the policy's sampling probabilities are not finite")]:
        argv = ["--preset", "tiny", "--output_dir", out, "--policy_lr", lr, "--save_every", "1", "--overwrite", "true"]
        assert refused(train_tldr.main, argv).startswith(words)
        strict_metrics(out)
        assert not checkpoints.has_checkpoint(out)


# --- point 6: bad inputs: one line each, nothing written or lost -------------------------------------------------

FLAG_CASES = [  # (flags, words of the one-line error); each is parsed as both scripts parse their flags
    (["--policy_lr=-1e-3"], "--policy_lr must be a finite number >= 0"),
    (["--rm_lr", "-1"], "--rm_lr must be"),
    (["--policy_lr", "inf"], "--policy_lr must be a finite number"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--queries_per_step", "0"], "--queries_per_step must be"),
    (["--total_trajectories", "0"], "--total_trajectories must be"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be"),
    (["--policy_epochs", "0"], "--policy_epochs must be"),
    (["--micro_batch_size", "0"], "--micro_batch_size must be"),
    (["--policy_minibatch_size", "0"], "--policy_minibatch_size must be"),
    (["--clip_eps", "-0.1"], "--clip_eps must be"),
    (["--beta", "-1"], "--beta must be"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be a finite number > 0"),
    (["--d_attn", "0"], "--d_attn must be"),
    (["--rm_minibatch_groups", "0"], "--rm_minibatch_groups must be"),
    (["--brme_heads", "0"], "--brme_heads must be"),
    (["--brme_epochs", "0"], "--brme_epochs must be"),
    (["--brme_lr", "-1"], "--brme_lr must be"),
    (["--brme_sigma_prior", "-1"], "--brme_sigma_prior must be"),
    (["--generation_batch_size", "0"], "--generation_batch_size must be"),
    (["--forward_batch_size", "0"], "--forward_batch_size must be"),
    (["--save_every", "-1"], "--save_every must be"),
    (["--sample_every", "-1"], "--sample_every must be"),
    (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps must be"),
    (["--missing_eos_penalty", "nan"], "--missing_eos_penalty must be finite"),
    (["--alpha", "2"], "--alpha must lie in [0, 1]"),
    (["--group_size", "1"], "--group_size must be at least 2"),
    (["--max_prompt_tokens", "0"], "--max_prompt_tokens must be at least 1"),
    (["--resume", "true", "--overwrite", "true"], "exclude each other"),
]


@pytest.mark.parametrize("args_cls,presets", [(launch_flags.TLDRArgs, launch_flags.TLDR_PRESETS),
                                               (launch_flags.UltraFeedbackArgs, launch_flags.ULTRAFEEDBACK_PRESETS)])
def test_bad_flags_are_one_line_before_anything_loads(tmp_path, args_cls, presets):
    for flags, words in FLAG_CASES:
        with pytest.raises(SystemExit) as e:
            launch_flags.parse_flags(args_cls, presets, ["--preset", "tiny", "--output_dir", str(tmp_path / "o"), *flags])
        message = str(e.value)
        assert message.startswith("error:") and words in message and "\n" not in message, (flags, message)
    assert not os.path.exists(tmp_path / "o")


def test_bad_inputs_as_a_user_meets_them(tmp_path):
    paths = tiny.save_models(str(tmp_path / "models"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file" in refused(tldr_flags, str(a_file / "run"))
    cfg = r2m.R2MConfig(device="cpu")
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    assert "not a Hugging Face model folder" in refused(runner.load_pretrained, str(not_a_model), paths["reward_model"], cfg)
    assert "--policy_model" in refused(runner.load_pretrained, str(not_a_model), paths["reward_model"], cfg)
    message = refused(runner.load_pretrained, paths["policy"], paths["policy"], cfg)  # a causal LM as the RM
    assert "--reward_model" in message and "holds no trained score head" in message
    assert len(runner.load_pretrained(paths["policy"], paths["reward_model"], cfg)) == 5  # the right pair loads
    empty_prompts = tmp_path / "empty_prompts.jsonl"
    empty_prompts.write_text("".join(json.dumps({"prompt": " ", "chosen": "ok"}) + "\n" for _ in range(4)))
    for script in (train_ultrafeedback, train_tldr):
        argv = ["--preset", "tiny", "--dataset", str(empty_prompts), "--output_dir", str(tmp_path / script.__name__)]
        assert "no non-empty prompts" in refused(script.main, argv)


def test_write_errors_are_one_line_and_the_last_checkpoint_survives(tmp_path):
    out = str(tmp_path / "run")
    flags = ["--preset", "tiny", "--output_dir", out, "--sample_every", "0"]
    run("train_tldr.py", *flags, "--total_trajectories", "64", "--save_every", "2")
    good = open(os.path.join(out, "checkpoint", "state.pt"), "rb").read()
    two_steps = os.path.getsize(os.path.join(out, "metrics.jsonl"))
    # a checkpoint that cannot be written (files may not grow past 100 kB, as on a full disk)
    proc = run("train_tldr.py", *flags, "--total_trajectories", "128", "--save_every", "1", "--resume", "true",
               limit_file_size=100_000, check=False)
    assert_one_line_error(proc, "could not write", "the last complete checkpoint is untouched")
    assert open(os.path.join(out, "checkpoint", "state.pt"), "rb").read() == good
    # metrics.jsonl that cannot grow (its next line passes the limit); the line cut short is dropped on resume
    proc = run("train_tldr.py", *flags, "--total_trajectories", "128", "--save_every", "1", "--resume", "true",
               limit_file_size=two_steps + 100, check=False)
    assert_one_line_error(proc, "File too large", "--resume true")
    assert open(os.path.join(out, "checkpoint", "state.pt"), "rb").read() == good
    # nothing was lost: the run resumes from its last checkpoint and finishes
    run("train_tldr.py", *flags, "--total_trajectories", "128", "--save_every", "1", "--resume", "true")
    assert [m["step"] for m in strict_metrics(out)] == [0, 1, 2, 3]
