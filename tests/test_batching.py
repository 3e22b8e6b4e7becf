"""How a step is batched changes no number beyond float rounding: its groups go longest prompt first, every batch is
cut to its own longest row, a minibatch's rows are sorted before it is split into micro-batches, the LM head runs on
the response positions alone, and h is kept at each row's own length. Each is compared with the plain computation:
the step's rows in their drawn order, at the step's full width, logits at every position."""

import copy

import pytest
import torch

import r2m
from launch import tiny
from plumbing import devices

K = 2


@pytest.fixture
def varied(tokenizer, prompts):
    """8 prompts of 9 to 37 tokens, in no order of length."""
    lengths = [13, 37, 9, 25, 21, 33, 17, 29]
    return [prompts[i % len(prompts)][-n:] for i, n in enumerate(lengths)]


def _cfg(tmp_path, **overrides):
    return tiny.loop_config(**{"output_dir": str(tmp_path / "run"), "queries_per_step": 8, "group_size": K,
                               "max_new_tokens": 6, "total_trajectories": 16 * 2, "policy_minibatch_size": 16,
                               "micro_batch_size": 16, "forward_batch_size": 4, "generation_batch_size": 4,
                               **overrides})


def full_width_logprobs(model, query_responses, attention_mask, prompt_len, temperature):
    """The plain way: one forward over the whole (N, P + R), logits at every position, the response's picked."""
    with torch.no_grad():
        logits = model(input_ids=query_responses, attention_mask=attention_mask,
                       position_ids=r2m.position_ids_from_mask(attention_mask)).logits[:, prompt_len - 1 : -1]
        return r2m._token_logprobs(logits, query_responses[:, prompt_len:], temperature)


def fixed_responses(monkeypatch, tokenizer):
    """generate_responses answers each prompt with the same tokens whatever its batch: sampling is taken out."""
    def generate(policy, query_ids, query_mask, tokenizer_, cfg, runtime, greedy=False):
        rows, seen = [], {}
        for ids, mask in zip(query_ids, query_mask):
            prompt = tuple(ids[mask.bool()].tolist())
            copy_ = seen[prompt] = seen.get(prompt, -1) + 1  # the k-th of the group's K rows
            row = [3 + (sum(prompt) * (j + 7) + len(prompt) + 31 * copy_) % 500 for j in range(cfg.max_new_tokens)]
            if (sum(prompt) + copy_) % 3 == 0:  # some responses end early
                row[4] = tokenizer.eos_token_id
            rows.append(row)
        response = torch.tensor(rows)
        return r2m.truncate_after_eos(response, tokenizer.eos_token_id, tokenizer.pad_token_id)

    monkeypatch.setattr(r2m, "generate_responses", generate)


def test_batches_cut_to_their_own_longest_row_give_todays_logprobs_and_states(tmp_path, tokenizer, varied):
    policy, ref = tiny.build_policy(tokenizer, seed=0), tiny.build_policy(tokenizer, seed=2)
    cfg = _cfg(tmp_path)
    runtime = devices.make_runtime(cfg)
    torch.manual_seed(0)
    trajectories = r2m.rollout(policy, ref, tokenizer, sorted(varied, key=len, reverse=True), None, cfg, runtime,
                               None, 0, True)
    qr, am, P = trajectories.query_responses, trajectories.attention_mask, trajectories.prompt_len
    mask = trajectories.response_mask.bool()
    for model, got in ((policy, trajectories.old_logprobs), (ref, trajectories.ref_logprobs)):
        expected = full_width_logprobs(model, qr, am, P, cfg.temperature)
        torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
        assert not got[~mask].any()  # nothing but zeros where no response token is
    h, kept = trajectories.hidden.padded()  # each row's own positions
    expected, expected_mask = r2m.policy_hidden_states(policy, qr, am)  # all P + R - 1 positions, padding masked
    assert kept.sum(1).tolist() == expected_mask.sum(1).tolist() == (am.sum(1) - 1).tolist()
    torch.testing.assert_close(h[kept], expected[expected_mask], atol=1e-5, rtol=0)
    assert trajectories.hidden.capacity == (am.sum(1) - 1).tolist()  # host memory: the real positions, no padding


def test_a_steps_order_of_prompts_changes_no_logprob_reward_advantage_or_update(tmp_path, tokenizer, varied,
                                                                              monkeypatch):
    """The same trajectories sampled in the drawn order and longest-first: their log-probs, h, rewards, RLOO
    advantages and one SGD update of the policy agree to float rounding."""
    fixed_responses(monkeypatch, tokenizer)
    cfg = _cfg(tmp_path, policy_epochs=1)
    runtime = devices.make_runtime(cfg)
    rm = tiny.build_reward_model(tokenizer, seed=1)
    results = {}
    order = sorted(range(len(varied)), key=lambda i: -len(varied[i]))
    for name, prompts in (("drawn", varied), ("longest first", [varied[i] for i in order])):
        policy = tiny.build_policy(tokenizer, seed=0)
        model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16, seed=3)
        torch.manual_seed(0)
        trajectories = r2m.rollout(policy, copy.deepcopy(policy), tokenizer, prompts, None, cfg, runtime, None, 0, True)
        rewards, trajectories.reward_token_embedding, _ = r2m.annotate_rewards(model, trajectories, 0.6, cfg, runtime)
        advantages = r2m.ALGOS["rloo"].advantages(rewards.view(-1, K), trajectories, None, cfg)
        r2m.policy_update(policy, torch.optim.SGD(policy.parameters(), lr=0.5), trajectories, advantages, cfg, runtime)
        h, kept = trajectories.hidden.padded()  # h' of the one (last) epoch
        rows = torch.tensor(order if name == "drawn" else range(len(varied))).repeat_interleave(K) * K \
            + torch.arange(K).repeat(len(varied))  # both in longest-first order of their rows
        results[name] = dict(old=trajectories.old_logprobs[rows], ref=trajectories.ref_logprobs[rows],
                             rewards=rewards[rows], advantages=advantages[rows], h=[h[i][kept[i]] for i in rows],
                             policy={k: v.clone() for k, v in policy.state_dict().items()})
    a, b = results["drawn"], results["longest first"]
    for key in ("old", "ref", "rewards", "advantages"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)
    for x, y in zip(a["h"], b["h"]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    for k in a["policy"]:
        torch.testing.assert_close(a["policy"][k], b["policy"][k], atol=1e-5, rtol=1e-4, msg=k)
    start = tiny.build_policy(tokenizer, seed=0).state_dict()
    assert any(not torch.equal(a["policy"][k], v) for k, v in start.items())  # the update did move the policy


def test_the_rm_reads_each_batch_cut_to_its_own_longest_row(tmp_path, tokenizer, varied):
    """Annotation in batches of 4 (each cut to its own longest row) or in one batch of the whole step."""
    policy = tiny.build_policy(tokenizer, seed=0)
    rm = r2m.R2MRewardModel(tiny.build_reward_model(tokenizer, seed=1), d_policy=64, d_attn=16)
    cfg = _cfg(tmp_path)
    runtime = devices.make_runtime(cfg)
    torch.manual_seed(0)
    trajectories = r2m.rollout(policy, policy, tokenizer, varied, None, cfg, runtime, None, 0, True)
    widths = []
    hook = rm.reward_model.base_model.register_forward_pre_hook(
        lambda m, a, k: widths.append(k["input_ids"].shape[1]), with_kwargs=True)
    small = r2m.annotate_rewards(rm, trajectories, 0.6, cfg, runtime)
    whole = r2m.annotate_rewards(rm, trajectories, 0.6, _cfg(tmp_path, forward_batch_size=16), runtime)
    hook.remove()
    for x, y in zip(small, whole):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert min(widths[:-1]) < widths[-1] == trajectories.query_responses.shape[1]  # cut batches, then the whole step
