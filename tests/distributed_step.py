"""One R2M step (reward annotation, policy update, GREBT update) on this process's share of a fixed rollout,
for tests/test_distributed.py. Not collected by pytest: run as

    python tests/distributed_step.py OUT.pt                             # one process, all n prompts
    torchrun --nproc_per_node 2 tests/distributed_step.py OUT.pt        # each rank n/2 prompts (whole groups)

The rollout (sampled responses, old/ref log-probs, hidden states) is made once from a fixed seed with the
plain models before any sharding, so both runs update on the same trajectories; each rank then takes its
rows, the models are sharded exactly as `r2m.train` shards them, and the step runs through r2m's own
functions. Rank 0 writes the full policy and R2M-head weights after the step, and the step's metrics.
Under FSDP it also checks that the sharded policy gives the rollout's log-probs and that generation
all-gathers once per `generate` call, not once per new token.
"""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

from plumbing import devices  # noqa: E402
from plumbing import distributed  # noqa: E402
import r2m  # noqa: E402
from plumbing import data  # noqa: E402
from plumbing.devices import HostRows  # noqa: E402
from launch import tiny  # noqa: E402


def take_rows(ro: r2m.Rollout, rows: slice) -> r2m.Rollout:
    """This rank's rows of a rollout (every (N, ...) field)."""
    fields = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in vars(ro).items()}
    h, mask = ro.hidden.padded()
    fields["hidden"] = HostRows.from_tensor(h[rows], mask[rows])
    return r2m.Rollout(**fields)


def count_all_gathers(fn) -> int:
    """How many FSDP all-gathers `fn()` makes (a test-only peek at FSDP2's internals)."""
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

    original, calls = param_group.foreach_all_gather, [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    param_group.foreach_all_gather = counting
    try:
        fn()
    finally:
        param_group.foreach_all_gather = original
    return calls[0]


def main(out: str) -> None:
    cfg = r2m.R2MConfig(
        queries_per_step=8, group_size=4, total_trajectories=8 * 4 * 4, max_new_tokens=4, policy_lr=0.1, rm_lr=0.1,
        d_attn=32, policy_epochs=2, policy_minibatch_size=32, micro_batch_size=4, forward_batch_size=8,
        generation_batch_size=32, rm_minibatch_groups=8, max_grad_norm=1e6, device="cpu", gradient_checkpointing=False,
    )
    tokenizer = tiny.build_tokenizer()
    policy = tiny.build_policy(tokenizer, seed=0)
    ref_policy = copy.deepcopy(policy)
    rm = tiny.build_reward_model(tokenizer, seed=1)
    torch.manual_seed(2)
    reward_model = r2m.R2MRewardModel(rm, d_policy=policy.get_output_embeddings().in_features, d_attn=cfg.d_attn)
    rows = tiny.synthetic_tldr_rows(cfg.queries_per_step, seed=3)
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"][-48:] for r in rows]
    rt = devices.make_runtime(cfg)
    devices.prepare_models(policy, ref_policy, reward_model, rt)
    mode = r2m.REWARD_MODES["r2m"]

    torch.manual_seed(5)  # the same trajectories for every process count
    full = r2m.rollout(policy, ref_policy, tokenizer, prompts, None, cfg, rt, None, data.pad_token_id(tokenizer))

    is_distributed, rank, world_size, _ = distributed.setup(cfg.device)
    rank_cfg = distributed.per_rank_config(cfg, world_size)
    distributed.place_models(policy, ref_policy, reward_model, rt.device, bf16_compute=False)
    share = cfg.trajectories_per_step // world_size
    ro = take_rows(full, slice(rank * share, (rank + 1) * share))
    torch.manual_seed(7 + rank)

    if is_distributed:
        # the sharded policy reproduces the plain one's log-probs on this rank's rows
        with torch.no_grad():
            logprobs = r2m.sequence_logprobs(policy, ro.query_responses, ro.attention_mask, ro.prompt_len, cfg.temperature)
        assert torch.allclose(logprobs, ro.old_logprobs, atol=1e-5), "sharded policy gives other log-probs"
        # generation: one all-gather per FSDP unit per generate call, not one per new token
        from transformers import GenerationConfig

        units = sum(isinstance(m, torch.distributed.fsdp.FSDPModule) for m in policy.modules())
        ids, mask = data.pad_left(prompts[:2], data.pad_token_id(tokenizer))
        config = GenerationConfig(do_sample=True, max_new_tokens=6, min_new_tokens=6, top_k=0, pad_token_id=0)

        def generate():
            with torch.no_grad(), distributed.gathered_for_generation(policy):
                policy.generate(input_ids=ids, attention_mask=mask, generation_config=config)

        gathers = count_all_gathers(generate)
        assert gathers <= units, f"{gathers} all-gathers for one generate call of 6 tokens ({units} FSDP units)"

    # Plain SGD and no clipping in effect: the update is -lr * gradient, so a gradient that is not averaged over
    # ranks, or averaged twice, shows in the weights (AdamW's first step is nearly scale-free and would hide
    # the second). The clip still runs and reports the global gradient norm, which must match too.
    optimizer = torch.optim.SGD(policy.parameters(), lr=cfg.policy_lr)
    rm_optimizer = torch.optim.SGD(list(reward_model.trainable_parameters()), lr=cfg.rm_lr)
    omega_t = 0.8
    rm_rewards, ro.reward_token_embedding, _ = r2m.annotate_rewards(reward_model, ro, omega_t, rank_cfg, rt)  # (share,)
    advantages = r2m.ALGOS["rloo"].advantages(rm_rewards.view(-1, cfg.group_size), ro, None, rank_cfg)  # (share,)
    pstats = r2m.policy_update(policy, optimizer, ro, advantages, rank_cfg, rt)
    rstats = r2m.reward_model_update(
        reward_model, rm_optimizer, ro, rm_rewards.view(-1, cfg.group_size), omega_t, mode, rank_cfg, rt
    )
    stats = distributed.mean_over_ranks({**pstats, **rstats})
    weights, _ = distributed.policy_state(policy, optimizer)
    if distributed.is_main_process():
        torch.save({"policy": weights, "head": reward_model.trainable_state_dict(), "stats": stats}, out)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
