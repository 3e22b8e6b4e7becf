"""Dialogue chat templates, and the BRME reward-robust baseline."""

import copy

import pytest
import torch

import brme
import r2m
from helpers import LEARNING_SEED, learned
from launch import tiny
from plumbing import data, devices


def test_rm_reads_its_own_template_and_policy_states_cover_policy_tokens(tmp_path):
    tok = tiny.build_tokenizer()
    rm_tok = tiny.build_tokenizer(vocab_size=400, chat_template=tiny.RM_CHAT_TEMPLATE)
    policy = tiny.build_policy(tok, arch="llama", hidden_size=64)
    prompts_text = ["How do I fix my dog?", "Why is my car so noisy?"]
    prompts = [data.chat_prompt_ids(tok, p) for p in prompts_text]
    assert tok.decode(prompts[0]) == "<|user|>How do I fix my dog?<|endoftext|><|assistant|>"
    cfg = r2m.R2MConfig(queries_per_step=2, group_size=2, total_trajectories=4, max_new_tokens=5, device="cpu",
                        forward_batch_size=4, generation_batch_size=4)
    rt = devices.make_runtime(cfg)
    view = data.make_rm_view(rm_tok, data.chat_render(rm_tok))
    ro = r2m.rollout(policy, copy.deepcopy(policy), tok, prompts, prompts_text, cfg, rt, view, rm_tok.pad_token_id)
    for row in range(4):
        response = tok.decode(ro.query_responses[row, ro.prompt_len:][ro.response_mask[row].bool()], skip_special_tokens=True)
        rm_text = rm_tok.decode(ro.rm_input_ids[row][ro.rm_attention_mask[row].bool()])
        assert rm_text == f"### User: {prompts_text[row // 2]}\n### Assistant: {response}\n<|endoftext|>"
        assert "<|user|>" not in rm_text  # nothing of the policy's template leaks into the RM's view
        # hidden states: one per policy token that predicts a real next token, in the policy's width
        assert ro.hidden.lengths[row] == int(ro.attention_mask[row].sum()) - 1
    assert ro.hidden.rows == 4 and ro.hidden.width == 64


def _embed(ensemble, view, rows, column):
    ids, mask = data.pad_right([view(r["prompt"], r[column]) for r in rows], 0)
    return ensemble.reward_token_embedding(ids, mask)


@pytest.mark.learning
def test_brme_heads_learn_and_sigma_marks_contradictory_pairs(tokenizer):
    rm = tiny.build_reward_model(tokenizer, seed=LEARNING_SEED + 1)
    view = data.make_rm_view(tokenizer)
    train = tiny.synthetic_preference_rows(512, seed=11 + LEARNING_SEED, contradictory=0.3)
    test = tiny.synthetic_preference_rows(256, seed=12 + LEARNING_SEED, contradictory=0.3)
    ensemble = brme.BRMEReward(rm, num_heads=5, lam=0.4, seed=LEARNING_SEED)
    brme.fit_brme_heads(ensemble, _embed(ensemble, view, train, "chosen"), _embed(ensemble, view, train, "rejected"),
                       epochs=10, lr=3e-2, seed=LEARNING_SEED)
    with torch.no_grad():
        mu_w, sig_w = ensemble.head_distributions(_embed(ensemble, view, test, "chosen"))
        mu_l, sig_l = ensemble.head_distributions(_embed(ensemble, view, test, "rejected"))
    consistent = torch.tensor([r["kind"] == "consistent" for r in test])
    heldout_accuracy = (mu_w > mu_l)[consistent].float().mean(0)  # (E,)
    assert learned(heldout_accuracy.min().item(), 0.75), heldout_accuracy  # chance is 0.5
    sigma = (sig_w + sig_l) / 2  # (M, E)
    assert learned(sigma[~consistent].mean().item(), 1.5 * sigma[consistent].mean().item())
    # the heads differ (noise at init + own bootstrap sample)
    assert not torch.allclose(mu_w[:, 0], mu_w[:, 1])


@pytest.mark.learning
def test_brme_rl_run_raises_the_robust_reward(tmp_path, tokenizer, prompts):
    policy, rm = tiny.build_policy(tokenizer, seed=LEARNING_SEED), tiny.build_reward_model(tokenizer, seed=LEARNING_SEED + 1)
    ref_policy = copy.deepcopy(policy)
    ensemble = brme.BRMEReward(rm, num_heads=3, lam=0.4, seed=LEARNING_SEED)
    view = data.make_rm_view(tokenizer)
    rows = tiny.synthetic_preference_rows(128, seed=5 + LEARNING_SEED)
    pairs = tuple(data.pad_right([view(r["prompt"], r[c]) for r in rows], 0) for c in ("chosen", "rejected"))
    cfg = r2m.R2MConfig(reward="brme", queries_per_step=8, group_size=4, total_trajectories=32 * 24,
                        max_new_tokens=3, policy_lr=1e-2, beta=0.0, policy_minibatch_size=16, micro_batch_size=8,
                        forward_batch_size=16, generation_batch_size=32, device="cpu", brme_epochs=5, brme_lr=3e-2,
                        output_dir=str(tmp_path / "run"), save_every=0, sample_every=0, seed=LEARNING_SEED)
    fitted_alone = copy.deepcopy(ensemble)  # the same fit, without RL after it
    fitted_alone.fit_before_rl(*pairs, cfg=cfg, runtime=devices.make_runtime(cfg))
    history = r2m.train(policy, ref_policy, ensemble, tokenizer, prompts, cfg, preferences=pairs)  # fits, then RL
    # 24 steps: the rise beat one initial standard deviation by 1.45x or more over seeds 0-5 and 1-2 threads (16 did
    # not at every seed)
    rewards = [h["reward/mean"] for h in history]
    assert learned(sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3, history[0]["reward/std"]), rewards
    heads = fitted_alone.heads.state_dict()
    assert all(torch.equal(heads[k], v) for k, v in ensemble.heads.state_dict().items())  # frozen during RL
    assert any(not torch.equal(heads[k], v) for k, v in brme.BRMEReward(rm, 3, 0.4, LEARNING_SEED).heads.state_dict().items())


def test_brme_refuses_an_r2m_mode_mismatch(tmp_path, tokenizer, models, prompts):
    policy, ref_policy, rm = models
    cfg = r2m.R2MConfig(reward="r2m", device="cpu", output_dir=str(tmp_path), queries_per_step=8,
                        total_trajectories=32, policy_minibatch_size=16)
    try:
        r2m.train(policy, ref_policy, brme.BRMEReward(rm), tokenizer, prompts, cfg)
    except ValueError as e:
        assert "needs a reward model of class R2MRewardModel" in str(e)
    else:
        raise AssertionError("a BRME reward model under --reward r2m must be refused")
