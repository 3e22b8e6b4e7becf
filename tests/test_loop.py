"""The training loop on tiny models: what changes, what must not, and that it learns."""

import copy
import math

import pytest
import torch

import baselines
import r2m
from helpers import LEARNING_SEED, learned
from launch import tiny
from plumbing import data, devices
from plumbing.devices import HostRows


def tiny_cfg(tmp_path, **overrides) -> r2m.R2MConfig:
    return tiny.loop_config(**{"output_dir": str(tmp_path / "run"), **overrides})


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_one_step_updates_exactly_the_right_parameters(tmp_path, tokenizer, models, prompts):
    policy, ref_policy, rm = models
    reward_model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16)
    before = {name: snapshot(m) for name, m in [("policy", policy), ("ref", ref_policy), ("rm", rm),
                                                   ("attn", reward_model.policy_feedback),
                                                   ("head", reward_model.score_head)]}
    # two steps: at t = 0, ω = 1 and the cross-attention gets no gradient; at t = 1, ω = 0.6
    r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, tiny_cfg(tmp_path, total_trajectories=64))
    assert changed(before["ref"], ref_policy) == set()  # reference policy bit-identical
    assert changed(before["rm"], rm) == set()  # RM body AND its own score head bit-identical
    assert changed(before["attn"], reward_model.policy_feedback) == set(before["attn"])  # all of W_q,k,v,o
    assert changed(before["head"], reward_model.score_head) == set(before["head"])
    assert len(changed(before["policy"], policy)) > 0
    trainable = {id(p) for p in reward_model.trainable_parameters()}
    frozen = [p for p in reward_model.reward_model.parameters()]
    assert all(id(p) not in trainable for p in frozen) and all(not p.requires_grad for p in frozen)
    assert len(trainable) == 4 + len(list(reward_model.score_head.parameters()))  # W_q,k,v,o and φ


@pytest.mark.parametrize("mode,attn_trains,head_trains", [
    ("vanilla", False, False), ("r2m_frozen", False, False), ("iterative_head", False, True),
    ("r2m_noise", True, True),
])
def test_reward_modes_train_what_they_should(tmp_path, tokenizer, models, prompts, mode, attn_trains, head_trains):
    policy, ref_policy, rm = models
    reward_model = r2m.REWARD_MODES[mode].reward_model(rm, d_policy=64, d_attn=16)
    attn, head = snapshot(reward_model.policy_feedback), snapshot(reward_model.score_head)
    history = r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, tiny_cfg(tmp_path, reward=mode))
    assert bool(changed(attn, reward_model.policy_feedback)) == attn_trains
    assert bool(changed(head, reward_model.score_head)) == head_trains
    assert ("rm/grebt" in history[-1]) == head_trains
    assert history[-1]["omega"] == (1.0 if mode in ("vanilla", "iterative_head") else 0.6)


def test_forward_passes_per_step(tmp_path, tokenizer, models, prompts):
    """Hidden states ride on passes the loop makes anyway: count every forward of one step."""
    policy, ref_policy, rm = models
    reward_model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16)
    cfg = tiny_cfg(tmp_path, total_trajectories=32, forward_batch_size=8, micro_batch_size=4)
    counts = {"policy": 0, "policy_generate": 0, "ref": 0, "rm": 0}
    in_generate = [False]
    original_generate = policy.generate

    def generate(*a, **k):
        in_generate[0] = True
        try:
            return original_generate(*a, **k)
        finally:
            in_generate[0] = False

    policy.generate = generate
    policy.register_forward_hook(lambda *a: counts.__setitem__(
        "policy_generate" if in_generate[0] else "policy", counts["policy_generate" if in_generate[0] else "policy"] + 1))
    ref_policy.register_forward_hook(lambda *a: counts.__setitem__("ref", counts["ref"] + 1))
    rm.base_model.register_forward_hook(lambda *a: counts.__setitem__("rm", counts["rm"] + 1))
    r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, cfg)
    N = cfg.trajectories_per_step
    assert counts["policy"] == N // 8 + cfg.policy_epochs * N // 4  # old log-probs + k epochs, nothing more
    assert counts["ref"] == N // 8
    assert counts["rm"] == N // 8  # annotation only: the GREBT step reuses the cached H_last
    assert 1 <= counts["policy_generate"] <= cfg.max_new_tokens  # one generate call, one pass per token


def test_heterogeneous_pair_runs_a_step(tmp_path, tokenizer, prompts):
    """Llama-style policy (D_p = 48) with a GPT-NeoX RM of another width (D_rm = 32) and its own tokenizer."""
    policy = tiny.build_policy(tokenizer, arch="llama", hidden_size=48)
    rm_tokenizer = tiny.build_tokenizer(vocab_size=400)
    rm = tiny.build_reward_model(rm_tokenizer, hidden_size=32)
    assert not data.same_tokenizer(tokenizer, rm_tokenizer)
    reward_model = r2m.R2MRewardModel(rm, d_policy=48, d_attn=16)
    attn = snapshot(reward_model.policy_feedback)
    rm_view = data.make_rm_view(rm_tokenizer)
    texts = [tokenizer.decode(p) for p in prompts]
    history = r2m.train(policy, copy.deepcopy(policy), reward_model, tokenizer, prompts,
                        tiny_cfg(tmp_path, total_trajectories=64), prompt_texts=texts, rm_view=rm_view,
                        rm_pad_id=rm_tokenizer.pad_token_id)
    assert len(history) == 2 and all(math.isfinite(h["reward/mean"]) for h in history)
    assert changed(attn, reward_model.policy_feedback)
    # the RM sees the text in its own tokens, and prompt + response round-trip through text
    ids = rm_view("TL;DR: hello", " world")
    assert rm_tokenizer.decode(ids, skip_special_tokens=True) == "TL;DR: hello world"
    assert ids[-1] == rm_tokenizer.eos_token_id


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_lr_schedule(tmp_path, tokenizer, models, prompts, schedule):
    """--lr_schedule: policy and RM-head learning rates decay linearly to 0 over T, or stay constant."""
    policy, ref_policy, rm = models
    reward_model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16)
    cfg = tiny_cfg(tmp_path, lr_schedule=schedule, total_trajectories=8 * 4 * 4, policy_lr=1e-3)  # T = 4
    history = r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, cfg)
    expected = [1e-3 * (1 - (t + 1) / 4) if schedule == "linear" else 1e-3 for t in range(4)]
    assert [h["lr/policy"] for h in history] == pytest.approx(expected)
    with pytest.raises(ValueError, match="lr_schedule"):
        tiny_cfg(tmp_path, lr_schedule="cosine").validate()


@pytest.mark.learning
@pytest.mark.parametrize("algo", ["rloo", "grpo", "remax", "reinforce_pp"])  # every estimator learns
def test_tiny_run_raises_a_fixed_reward(tmp_path, tokenizer, prompts, algo):
    """Frozen tiny RM as a fixed reward. Short responses (3 tokens) keep credit assignment easy enough for
    a 2-layer random policy to learn within 32 steps of 32 trajectories: the mean reward of the last 3 steps is
    at least half a standard deviation (of the first step's rewards) above the first 3 steps' (measured: 1.2-2.7
    standard deviations over seeds 0-4, 1 and 2 threads)."""
    policy, rm = tiny.build_policy(tokenizer, seed=LEARNING_SEED), tiny.build_reward_model(tokenizer, seed=LEARNING_SEED + 1)
    reward_model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16, seed=LEARNING_SEED)
    steps = 32
    cfg = tiny_cfg(tmp_path, algo=algo, reward="vanilla", total_trajectories=32 * steps, max_new_tokens=3,
                   beta=0.0, policy_lr=1e-2, seed=LEARNING_SEED)
    history = r2m.train(policy, copy.deepcopy(policy), reward_model, tokenizer, prompts, cfg)
    rewards = [h["reward/mean"] for h in history]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    spread = history[0]["reward/std"]  # std of the reward over the first step's trajectories
    assert learned(end - start, 0.5 * spread), (algo, [round(r, 3) for r in rewards], spread)


@pytest.mark.learning
def test_grebt_step_lowers_its_loss_on_a_fixed_batch(tmp_path, tokenizer):
    """reward_model_update is real optimisation: repeated on one step's data its GREBT loss goes down."""
    rm = tiny.build_reward_model(tokenizer, seed=LEARNING_SEED + 1)
    torch.manual_seed(LEARNING_SEED)
    reward_model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16, seed=LEARNING_SEED)
    n, K, S = 8, 4, 10
    cfg = tiny_cfg(tmp_path, rm_lr=1e-2, rm_minibatch_groups=n)
    ro = r2m.Rollout(
        query_responses=torch.zeros(n * K, S + 1, dtype=torch.long), attention_mask=torch.ones(n * K, S + 1),
        response_mask=torch.ones(n * K, 1), old_logprobs=torch.zeros(n * K, 1), ref_logprobs=torch.zeros(n * K, 1),
        hidden=HostRows.from_tensor(torch.randn(n * K, S, 64)),
        rm_input_ids=torch.zeros(n * K, 1, dtype=torch.long), rm_attention_mask=torch.ones(n * K, 1),
        contains_eos=torch.ones(n * K, dtype=torch.bool), prompt_len=S, reward_token_embedding=torch.randn(n * K, 48),
    )
    annotated = torch.randn(n, K)
    optimizer = torch.optim.AdamW(reward_model.trainable_parameters(), lr=cfg.rm_lr)
    rt = devices.make_runtime(cfg)
    losses = [r2m.reward_model_update(reward_model, optimizer, ro, annotated, 0.6, r2m.REWARD_MODES["r2m"], cfg, rt)["rm/grebt"]
              for _ in range(30)]
    assert learned(1 - losses[-1] / losses[0], 0.3), losses  # the loss falls by more than 30%


def test_whole_rm_baseline_trains_the_body_and_r2m_does_not(tmp_path, tokenizer, models, prompts):
    policy, ref_policy, rm = models
    reward_model = baselines.WholeRewardModel(rm, d_policy=64, d_attn=16)
    body = snapshot(rm.base_model)
    counts = {"rm": 0}
    rm.base_model.register_forward_hook(lambda *a: counts.__setitem__("rm", counts["rm"] + 1))
    cfg = tiny_cfg(tmp_path, reward="r2m_full_rm", total_trajectories=32, forward_batch_size=16, rm_minibatch_groups=4)
    r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, cfg)
    assert changed(body, rm.base_model)  # the whole RM moved ...
    # ... at the price of RM forwards in the GREBT step too: 8 groups in minibatches of 4, each run through the RM in
    # micro-batches of 8 // K = 2 groups (--micro_batch_size sequences)
    assert counts["rm"] == 32 // 16 + (8 // 4) * (4 // (8 // 4))


def test_whole_rm_grebt_step_in_micro_batches_is_the_same_update(tmp_path, tokenizer, prompts):
    """The whole-RM baseline's GREBT step runs the RM body with gradients; micro-batched (accumulating over whole
    groups) it makes the same update as in one piece, without holding a whole minibatch's activations."""
    policy = tiny.build_policy(tokenizer, seed=0)
    cfg = tiny_cfg(tmp_path, reward="r2m_full_rm", rm_minibatch_groups=8, micro_batch_size=32, policy_minibatch_size=32)
    rt = devices.make_runtime(cfg)
    torch.manual_seed(0)
    ro = r2m.rollout(policy, copy.deepcopy(policy), tokenizer, prompts[:8], None, cfg, rt, None, 0, True)
    mode = r2m.REWARD_MODES["r2m_full_rm"]
    after = {}
    for micro in (32, 4):  # all 8 groups at once, then 1 group (K = 4 sequences) per RM forward
        rm = tiny.build_reward_model(tokenizer, seed=1)
        model = baselines.WholeRewardModel(rm, d_policy=64, d_attn=16)  # its body trains
        counts = {"rm": 0}
        rm.base_model.register_forward_hook(lambda *a: counts.__setitem__("rm", counts["rm"] + 1))
        with torch.no_grad():
            annotated, ro.reward_token_embedding, _ = r2m.annotate_rewards(model, ro, 0.6, cfg, rt)
            annotated = annotated.view(8, 4)
        optimizer = torch.optim.SGD(list(model.trainable_parameters()), lr=0.5)
        micro_cfg = tiny_cfg(tmp_path, reward="r2m_full_rm", rm_minibatch_groups=8, micro_batch_size=micro,
                             policy_minibatch_size=32)
        forwards_before = counts["rm"]
        r2m.reward_model_update(model, optimizer, ro, annotated, 0.6, mode, micro_cfg, rt)
        assert counts["rm"] - forwards_before == 32 // micro  # one RM forward per micro-batch
        after[micro] = {k: v.clone() for k, v in model.state_dict().items()}
    for k in after[32]:
        torch.testing.assert_close(after[4][k], after[32][k], atol=1e-5, rtol=1e-4, msg=k)
    start = tiny.build_reward_model(tokenizer, seed=1).base_model.state_dict()
    assert any(not torch.equal(after[32]["reward_model.gpt_neox." + k], v) for k, v in start.items())  # the body moved


def test_the_policy_gradient_is_the_same_for_micro_batches_of_1_2_4_rows_and_the_whole_minibatch(tmp_path, tokenizer,
                                                                                                  prompts):
    """Each micro-batch's loss is divided by the number of micro-batches in a minibatch, so the accumulated gradient is
    the minibatch mean's, however it is split (and each piece cut to its own longest row)."""
    policy = tiny.build_policy(tokenizer, seed=0)
    cfg = tiny_cfg(tmp_path, policy_minibatch_size=16, micro_batch_size=16, policy_epochs=1, max_grad_norm=1e9)
    rt = devices.make_runtime(cfg)
    torch.manual_seed(0)
    varied = [p[-(9 + 5 * (i % 6)):] for i, p in enumerate(prompts[:4])]  # prompts of 9 to 34 tokens
    ro = r2m.rollout(policy, copy.deepcopy(policy), tokenizer, varied, None, cfg, rt, None, 0, False)
    advantages = torch.randn(16)
    grads = {}
    for micro in (1, 2, 4, 16):
        model = copy.deepcopy(policy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        optimizer.register_step_pre_hook(lambda opt, *_: grads.__setitem__(
            micro, [p.grad.clone() for p in model.parameters()]))
        micro_cfg = tiny_cfg(tmp_path, policy_minibatch_size=16, micro_batch_size=micro, policy_epochs=1,
                             max_grad_norm=1e9)
        r2m.policy_update(model, optimizer, ro, advantages, micro_cfg, rt)
    assert any(g.abs().sum() > 0 for g in grads[16])
    for micro in (1, 2, 4):
        for got, expected in zip(grads[micro], grads[16]):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4, msg=f"micro-batches of {micro}")
