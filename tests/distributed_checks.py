"""Checks of the multi-process paths for tests/test_distributed.py, run under torchrun (gloo). Not collected by pytest.

    torchrun --nproc_per_node 2 tests/distributed_checks.py LOG train_tldr [script flags...]
        runs train_tldr.py's main with every rank logging, one line `rank what` per call, when it repairs an
        interrupted save (`checkpoints._swap_in` of a found folder: step -1), loads a full policy from a checkpoint
        (`from_pretrained`) or has looked at the run's folder (`check_output_dir`; rank 1 looks 2 s late).
    torchrun --nproc_per_node 2 tests/distributed_checks.py OUT.pt rm_rewards CHECKPOINT
        loads a checkpoint's reward model (a fine-tuned body included) into a sharded RM through
        `load_trainable_state_dict`, scores fixed preference pairs on every rank, and rank 0 writes every rank's
        rewards: a body loaded into the wrong shards gives other rewards on some rank.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

from plumbing import checkpoints  # noqa: E402
from plumbing import devices  # noqa: E402
from plumbing import distributed  # noqa: E402
import r2m  # noqa: E402
from plumbing import data  # noqa: E402
from launch import tiny  # noqa: E402


def log_calls(log: str) -> None:
    """Every rank appends a line to `log` when it repairs a checkpoint layout or loads a full policy, and when it has
    looked at the layout (the end of `check_output_dir`); rank 1 looks 2 s late, so a repair that does not wait for
    every rank's look comes first in the log."""
    import time

    from transformers import GPTNeoXForCausalLM

    def write(what: str) -> None:
        with open(log, "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {what}\n")

    swap_in = checkpoints._swap_in

    def logged_swap_in(src, final, step):
        if step == -1:  # putting a found complete folder in place, not a save's own swap
            write("repairs")
        return swap_in(src, final, step)

    from_pretrained = GPTNeoXForCausalLM.from_pretrained.__func__

    def logged_from_pretrained(cls, path, *args, **kwargs):
        if "checkpoint" in str(path):  # the policy's full weights from a checkpoint, not the script's own loading
            write("loads the policy")
        return from_pretrained(cls, path, *args, **kwargs)

    check_output_dir = checkpoints.check_output_dir

    def late_check_output_dir(cfg):  # the last look before the repair, after the models' collectives
        if os.environ.get("RANK", "0") == "1":
            time.sleep(2)
        check_output_dir(cfg)
        write("looked")

    checkpoints._swap_in = logged_swap_in
    checkpoints.check_output_dir = late_check_output_dir
    GPTNeoXForCausalLM.from_pretrained = classmethod(logged_from_pretrained)


def rm_rewards(out: str, checkpoint: str) -> None:
    """Every rank's rewards for the same 8 preference pairs, from the checkpoint's reward model."""
    tokenizer = tiny.build_tokenizer()
    state = torch.load(os.path.join(checkpoint, "state.pt"), map_location="cpu", weights_only=False)
    cfg = r2m.R2MConfig(device="cpu", d_attn=state["config"]["d_attn"])
    policy, ref_policy = tiny.build_policy(tokenizer), tiny.build_policy(tokenizer)  # (unused: the RM is what counts)
    reward_model = r2m.R2MRewardModel(tiny.build_reward_model(tokenizer, seed=1), d_policy=64, d_attn=cfg.d_attn)
    distributed.setup("cpu")
    rt = devices.make_runtime(cfg)
    devices.prepare_models(policy, ref_policy, reward_model, rt)
    distributed.place_models(policy, ref_policy, reward_model, rt.device, bf16_compute=False)
    reward_model.load_trainable_state_dict(state["reward_model"])
    chosen, _ = data.preference_views(tiny.PREFERENCES_TINY, data.make_rm_view(tokenizer))
    with torch.no_grad():
        rewards = reward_model(chosen[0][:8], chosen[1][:8])  # the same pairs on every rank
    every_rank = distributed.gather_rows(rewards[None])  # (world, 8)
    if distributed.is_main_process():
        with open(out, "w") as f:
            json.dump(every_rank.tolist(), f)
    distributed.teardown()


if __name__ == "__main__":
    if sys.argv[2] == "train_tldr":
        import train_tldr

        log_calls(sys.argv[1])
        train_tldr.main(sys.argv[3:])
    elif sys.argv[2] == "rm_rewards":
        rm_rewards(sys.argv[1], sys.argv[3])
    else:
        raise SystemExit(f"unknown check {sys.argv[2]!r}")
