"""More than one process: `torchrun --nproc_per_node 2` on CPU (gloo), FSDP2-sharded policy.

- one step on 2 ranks x n/2 prompts updates the policy and the R2M head exactly as 1 process x n prompts
  on the same trajectories (catches a gradient not averaged over ranks, or averaged twice);
- the tiny presets of both scripts run under torchrun, write one metrics file and a full (unsharded)
  checkpoint, and resume from it with 1 and with 2 processes.
Each rank runs with one thread, so two ranks fit the 2-core CI machine.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_scripts import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers import ENV as _ENV  # noqa: E402

ENV = {**_ENV, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port each time


def launch(cmd, check=True):
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_two_ranks_update_like_one_process(tmp_path):
    step = os.path.join(ROOT, "tests", "distributed_step.py")
    launch([sys.executable, step, str(tmp_path / "one.pt")])
    launch([*TORCHRUN, step, str(tmp_path / "two.pt")])
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    import tiny

    start = tiny.build_policy(tiny.build_tokenizer(), seed=0).state_dict()
    assert one["policy"].keys() == two["policy"].keys() == start.keys()  # full weights, no shards
    moved = max((one["policy"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # the step really changed the policy (so equality below says something)
    for k in start:
        assert two["policy"][k].shape == start[k].shape, k
        torch.testing.assert_close(two["policy"][k], one["policy"][k], rtol=0, atol=1e-6, msg=k)
    for part in ("policy_feedback", "score_head"):
        for k, v in one["head"][part].items():
            torch.testing.assert_close(two["head"][part][k], v, rtol=0, atol=1e-6, msg=f"{part}.{k}")
    assert one["stats"]["rm/grebt"] > 0
    for k, v in one["stats"].items():  # losses, global gradient norm, clip fraction: means over all ranks
        assert two["stats"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("script", ["train_tldr.py", "train_ultrafeedback.py"])
def test_tiny_preset_under_torchrun_checkpoints_and_resumes_with_1_or_2_ranks(tmp_path, script):
    out = str(tmp_path / "run")
    tiny_run = [os.path.join(ROOT, script), "--preset", "tiny", "--output_dir", out]
    first = launch([*TORCHRUN, *tiny_run, "--total_trajectories", "64", "--save_every", "2"])
    assert [m["step"] for m in metrics(out)] == [0, 1]  # one file, each step written once (by rank 0)
    assert (first.stdout + first.stderr).count("step    1 |") == 1  # the step line is printed by rank 0 only
    policy_dir = os.path.join(out, "checkpoint", "policy")
    from transformers import AutoModelForCausalLM

    import tiny

    saved = AutoModelForCausalLM.from_pretrained(policy_dir)  # a plain HF folder of the full weights
    initial = tiny.build_policy(tiny.build_tokenizer(), seed=0, **({"hidden_size": 64, "arch": "llama"} if "ultra" in script else {}))
    assert sum(p.numel() for p in saved.parameters()) == sum(p.numel() for p in initial.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(saved.state_dict().values(), initial.state_dict().values()))

    shutil.copytree(out, out + "_two")
    # resume on one process (no torchrun) ...
    one = launch([sys.executable, *tiny_run, "--total_trajectories", "96", "--resume", "true"])
    assert "resumed" in one.stdout + one.stderr
    assert [m["step"] for m in metrics(out)] == [0, 1, 2]
    # ... and on two
    two_run = [a if a != out else out + "_two" for a in tiny_run]
    two = launch([*TORCHRUN, *two_run, "--total_trajectories", "96", "--resume", "true"])
    assert (two.stdout + two.stderr).count("resumed from") == 1
    assert [m["step"] for m in metrics(out + "_two")] == [0, 1, 2]


def test_each_rank_gets_an_equal_share_or_a_clear_error():
    import distributed
    import r2m

    cfg = r2m.R2MConfig(queries_per_step=8, group_size=4, policy_minibatch_size=16, micro_batch_size=4, rm_minibatch_groups=4)
    assert distributed.per_rank_config(cfg, 1) is cfg  # one process: untouched
    share = distributed.per_rank_config(cfg, 2)
    assert (share.queries_per_step, share.policy_minibatch_size, share.rm_minibatch_groups) == (4, 8, 2)
    assert share.micro_batch_size == 4 and cfg.queries_per_step == 8
    bad = [
        (dict(queries_per_step=9, policy_minibatch_size=36), "--queries_per_step 9 must be divisible by the number of processes (2)"),
        (dict(policy_minibatch_size=8, micro_batch_size=8), "--micro_batch_size 8 must divide each process's share"),
        (dict(rm_minibatch_groups=3), "--rm_minibatch_groups 3 must be divisible"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            distributed.per_rank_config(r2m.R2MConfig(**{**vars(cfg), **change}), 2)
    with pytest.raises(ValueError, match="one process only"):
        distributed.per_rank_config(cfg, 2, train_body=True)
