"""More than one process: `torchrun --nproc_per_node 2` on CPU (gloo), FSDP2-sharded policy.

- one step on 2 ranks x n/2 prompts updates the policy and the R2M head exactly as 1 process x n prompts
  on the same trajectories (catches a gradient not averaged over ranks, or averaged twice);
- the tiny presets of both scripts run under torchrun, write one metrics file and a full (unsharded)
  checkpoint, and resume from it with 1 and with 2 processes.
Each rank runs with one thread, so two ranks fit the 2-core CI machine.
"""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from launch import tiny
from test_scripts import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers import ENV as _ENV  # noqa: E402

ENV = {**_ENV, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port each time


def launch(cmd, check=True, env=None, timeout=240, preexec_fn=None):
    """Run a command (torchrun and its ranks) in a session of its own: on a timeout the whole group is killed,
    so no rank is left behind to slow the tests that follow."""
    with subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, preexec_fn=preexec_fn) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            raise AssertionError(f"timed out after {timeout} s: {cmd}\n{(stdout + stderr)[-4000:]}") from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_two_ranks_update_like_one_process(tmp_path):
    step = os.path.join(ROOT, "tests", "distributed_step.py")
    launch([sys.executable, step, str(tmp_path / "one.pt")])
    launch([*TORCHRUN, step, str(tmp_path / "two.pt")])
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    from launch import tiny

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

    saved = AutoModelForCausalLM.from_pretrained(policy_dir)  # a plain HF folder of the full weights
    initial = AutoModelForCausalLM.from_pretrained(tiny.TINY_MODEL_FOLDERS["chat_policy" if "ultra" in script else "tldr_policy"])
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
    import baselines
    import r2m
    from plumbing import distributed

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
        distributed.per_rank_config(cfg, 2, baselines.WholeRewardModel)
    with pytest.raises(ValueError, match="--pretrain_rm_batch_size 3 must be divisible"):  # split over the processes
        distributed.per_rank_config(r2m.R2MConfig(**{**vars(cfg), "pretrain_rm_batch_size": 3}), 2,
                                    baselines.PretrainedRewardModel)


# --- the Pretrained RM, checkpoint repair, save errors and LoRA on 2 ranks ------------------------------------------

CHECKS = os.path.join(ROOT, "tests", "distributed_checks.py")
TINY = [os.path.join(ROOT, "train_tldr.py"), "--preset", "tiny", "--sample_every", "0"]


def test_pretrained_rm_on_two_ranks_fine_tunes_shards_saves_and_resumes_like_one_process(tmp_path):
    """The RM body is fine-tuned after sharding, data-parallel (each rank half of every minibatch), gathered whole
    into the checkpoint, and loaded back into every rank's own shards."""
    flags = ["--reward", "pretrained_rm", "--total_trajectories", "64", "--save_every", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    launch([sys.executable, *TINY, *flags, "--output_dir", one])
    log = launch([*TORCHRUN, *TINY, *flags, "--output_dir", two])
    assert (log.stdout + log.stderr).count("Pretrained RM: BT fine-tuning") == 1  # printed by rank 0
    bodies = [torch.load(os.path.join(d, "checkpoint", "state.pt"), weights_only=False)["reward_model"]["body"]
              for d in (one, two)]
    assert {k: v.shape for k, v in bodies[0].items()} == {k: v.shape for k, v in bodies[1].items()}
    assert all(type(v) is torch.Tensor for v in bodies[1].values())  # whole tensors, not DTensor shards
    from transformers import AutoModelForSequenceClassification

    start = AutoModelForSequenceClassification.from_pretrained(tiny.TINY_MODEL_FOLDERS["tldr_reward_model"]).base_model.state_dict()
    assert any(not torch.equal(bodies[0][k], v) for k, v in start.items())  # it was fine-tuned ...
    # ... alike on 1 and 2 ranks (every minibatch split in two, gradients averaged). Not to the last bit: AdamW scales
    # a gradient component that is zero but for rounding (a key bias: softmax ignores it) up to ±lr.
    norm = lambda tensors: sum(float(t.double().pow(2).sum()) for t in tensors) ** 0.5  # noqa: E731
    update = norm(bodies[0][k] - start[k] for k in start)
    assert norm(bodies[1][k] - bodies[0][k] for k in start) <= 0.02 * update
    # every rank of a resumed run scores with the saved body: the same rewards on each, and as on one process
    out = str(tmp_path / "rewards.json")
    launch([*TORCHRUN, CHECKS, out, "rm_rewards", os.path.join(two, "checkpoint")])
    launch([sys.executable, CHECKS, out + ".one", "rm_rewards", os.path.join(two, "checkpoint")])
    import json

    ranks, single = json.load(open(out)), json.load(open(out + ".one"))[0]
    for rewards in ranks:
        assert rewards == pytest.approx(single, abs=1e-5)
    resumed = launch([*TORCHRUN, *TINY, *flags[:2], "--total_trajectories", "96", "--resume", "true", "--output_dir", two])
    assert "Pretrained RM: BT fine-tuning" not in resumed.stdout + resumed.stderr  # the body came back with it
    assert [m["step"] for m in metrics(two)] == [0, 1, 2]


def test_brme_on_two_ranks_fits_the_same_heads_as_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    flags = ["--reward", "brme", "--total_trajectories", "64"]
    launch([sys.executable, *TINY, *flags, "--output_dir", one])
    launch([*TORCHRUN, *TINY, *flags, "--output_dir", two])
    heads = [torch.load(os.path.join(d, "checkpoint", "state.pt"), weights_only=False)["reward_model"]["heads"]
             for d in (one, two)]
    for k in heads[0]:
        torch.testing.assert_close(heads[1][k], heads[0][k], atol=1e-4, rtol=1e-4, msg=k)


def test_two_ranks_resuming_an_interrupted_save_repair_it_once_and_load_the_policy_once(tmp_path):
    out = str(tmp_path / "run")
    flags = ["--total_trajectories", "96", "--save_every", "1", "--output_dir", out]
    crashed = launch([sys.executable, *TINY, *flags], check=False, env={"R2M_TEST_KILL_BETWEEN_RENAMES": "1"})
    assert crashed.returncode == -9 and not os.path.exists(os.path.join(out, "checkpoint"))
    assert os.path.exists(os.path.join(out, "checkpoint.old")) and os.path.exists(os.path.join(out, "checkpoint.tmp"))
    log = str(tmp_path / "calls.log")
    launch([*TORCHRUN, CHECKS, log, "train_tldr", "--preset", "tiny", "--sample_every", "0", "--resume", "true", *flags])
    calls = open(log).read().splitlines()
    assert sorted(calls) == ["0 loads the policy", "0 looked", "0 repairs", "1 looked"]  # rank 0 alone, once each
    assert calls.index("0 repairs") > max(calls.index("0 looked"), calls.index("1 looked"))  # after every rank looked
    assert [m["step"] for m in metrics(out)] == [0, 1, 2]
    assert sorted(os.listdir(out)) == ["checkpoint", "config.json", "metrics.jsonl"]


def test_a_failed_save_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 alone writes checkpoints; when it cannot (here: files may not grow past 100 kB, as on a full disk)
    both ranks stop at once with the one-line error, instead of rank 1 waiting in the next collective."""
    import resource

    out = str(tmp_path / "run")
    launch([sys.executable, *TINY, "--total_trajectories", "64", "--save_every", "2", "--output_dir", out])
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # noqa: E731
    proc = launch([*TORCHRUN, *TINY, "--total_trajectories", "128", "--save_every", "1", "--resume", "true",
                   "--output_dir", out], check=False, timeout=180, preexec_fn=limit)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "error: step 2: could not write" in log  # rank 0's own error
    assert "error: rank 0 stopped the run: step 2: could not write" in log  # rank 1's


def test_lora_under_torchrun_stops_with_one_clear_line_and_no_traceback(tmp_path):
    """Each rank refuses at flag parsing. The first to exit makes torchrun stop the other, which may not have
    printed its line yet: one or two copies of it, and no traceback from our code on either rank."""
    proc = launch([*TORCHRUN, *TINY, "--lora_r", "4", "--output_dir", str(tmp_path / "o")], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("error: --lora_r runs on one process only") in (1, 2), out[-3000:]
    assert not re.search(r'File "[^"]*/(train_tldr\.py|r2m\.py|launch/|plumbing/)', out), out[-3000:]
    assert not os.path.exists(tmp_path / "o")  # refused before anything was written


def test_two_nodes_of_one_process_each_finish_one_run(tmp_path):
    """The multi-node command of docs/scale.md, both "nodes" on this machine: two torchrun launches that meet at one
    rendezvous endpoint (c10d) and write one run to the shared output folder (rank 0 writes metrics and checkpoints;
    every rank reads the checkpoint on a resume)."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "shared" / "run")
    nodes = []
    for node_rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
                   "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                   "--rdzv_id", "tiny", *TINY, "--total_trajectories", "96", "--save_every", "2", "--output_dir", out]
        nodes.append(subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=240)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert [m["step"] for m in metrics(out)] == [0, 1, 2]  # one metrics file, each step once
    assert logs[0].count("step    2 |") == 1 and "step    2 |" not in logs[1]  # node 0 holds rank 0: it reports
    assert sorted(os.listdir(out)) == ["checkpoint", "config.json", "metrics.jsonl"]
