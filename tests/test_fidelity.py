"""Fidelity to the paper: sampling, GRE's std, seeding, dropout, float32 rewards, GREBT's pair, the Eq. 4
blend and the hidden-state refresh of Algorithm 1."""

import copy

import pytest
import torch

import r2m
from launch import runner, tiny
from plumbing import devices
from plumbing.devices import HostRows


def _cfg(tmp_path, **overrides) -> r2m.R2MConfig:
    small = dict(queries_per_step=4, total_trajectories=16 * 2, max_new_tokens=5, policy_lr=1e-2, generation_batch_size=16)
    return tiny.loop_config(**{"output_dir": str(tmp_path / "run"), **small, **overrides})


def test_sampling_ignores_the_models_own_generation_config(tmp_path, tokenizer, prompts):
    """A model may ship a generation_config.json with processors (repetition penalty, top-k, top-p, n-gram
    bans): the old log-probs must still be exactly the log-softmax of the scores generate() sampled from."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = tmp_path / "policy"
    tiny.build_policy(tokenizer).save_pretrained(folder)
    GenerationConfig(repetition_penalty=1.3, top_k=5, top_p=0.5, no_repeat_ngram_size=2, do_sample=True,
                     temperature=1.3).save_pretrained(folder)
    policy = AutoModelForCausalLM.from_pretrained(folder)
    assert policy.generation_config.repetition_penalty == 1.3  # the trap is armed
    cfg = _cfg(tmp_path, max_new_tokens=8, temperature=0.7)
    rt = devices.make_runtime(cfg)
    devices.disable_dropout(policy)

    captured = {}
    original = policy.generate

    def generate_with_scores(*args, generation_config=None, **kwargs):
        gc = copy.deepcopy(generation_config)
        gc.output_scores, gc.return_dict_in_generate = True, True
        out = original(*args, generation_config=gc, **kwargs)
        captured["scores"] = torch.stack(out.scores, 1).log_softmax(-1)  # (b, R', V): processed scores
        return out.sequences

    policy.generate = generate_with_scores
    torch.manual_seed(0)
    ro = r2m.rollout(policy, copy.deepcopy(policy), tokenizer, prompts[:4], None, cfg, rt, None, 0, False)
    P, steps = ro.prompt_len, captured["scores"].shape[1]
    tokens = ro.query_responses[:, P : P + steps]
    theirs = captured["scores"].gather(-1, tokens[..., None]).squeeze(-1)  # (N, R')
    mask = ro.response_mask[:, :steps].bool()
    torch.testing.assert_close(ro.old_logprobs[:, :steps][mask], theirs[mask], atol=1e-5, rtol=0)
    assert policy.generation_config.repetition_penalty == 1.3  # the model's own config is left as it was


def test_cross_attention_init_depends_only_on_the_seed(tokenizer):
    rm = tiny.build_reward_model(tokenizer)
    a = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16, seed=7)
    torch.randn(1000)  # unrelated random work in between
    torch.manual_seed(123)
    b = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16, seed=7)
    c = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16, seed=8)
    for (name, pa), pb, pc in zip(a.policy_feedback.named_parameters(), b.policy_feedback.parameters(),
                                  c.policy_feedback.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name
    # and building it does not disturb the caller's random stream
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    r2m.R2MRewardModel(rm, d_policy=64, d_attn=16, seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ["gptneox", "llama"])
def test_dropout_off_everywhere_including_config_rates(tokenizer, arch):
    from transformers import GPTNeoXForCausalLM, LlamaForCausalLM

    if arch == "gptneox":
        config = tiny.gptneox_config(tokenizer)
        config.attention_dropout, config.hidden_dropout = 0.5, 0.5
        model = GPTNeoXForCausalLM(config)
    else:
        config = tiny.llama_config(tokenizer)
        config.attention_dropout = 0.5
        model = LlamaForCausalLM(config)
    ids = torch.randint(3, len(tokenizer), (2, 12))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout really is on before
    devices.disable_dropout(model)
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    assert torch.equal(first, second)


def test_rewards_are_float32_under_bf16_autocast(tokenizer):
    """The score head and the blend run in float32 even under bf16 autocast (CPU autocast stands in for the
    GPU's): a bf16 reward has a resolution of ~0.016 at |r| ~ 3, enough to reorder a group."""
    model = r2m.R2MRewardModel(tiny.build_reward_model(tokenizer), d_policy=64, d_attn=16)
    torch.manual_seed(0)
    rte = 3.0 * torch.randn(6, 48)
    h, h_mask = torch.randn(6, 9, 64), torch.ones(6, 9, dtype=torch.bool)
    with torch.no_grad():
        exact = model.rewards_from_embedding(rte, h, h_mask, 0.7)
        exact_no_feedback = model.rewards_from_embedding(rte)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.rewards_from_embedding(rte, h, h_mask, 0.7)
            mixed_no_feedback = model.rewards_from_embedding(rte)
    assert mixed.dtype == torch.float32 and mixed_no_feedback.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed_no_feedback, exact_no_feedback, atol=1e-6, rtol=0)


def test_reward_is_the_eq4_affine_blend_and_continuous_at_omega_one(tokenizer):
    """φ is linear, so φ((1-ω)Ĥ + ωH) = (1-ω)·φ(Ĥ) + ω·φ(H): the reward at any ω is the affine blend of the
    ω = 0 and ω = 1 rewards, and it tends to the RM's own reward as ω -> 1."""
    model = r2m.R2MRewardModel(tiny.build_reward_model(tokenizer), d_policy=64, d_attn=16)
    torch.manual_seed(1)
    rte, h, h_mask = torch.randn(5, 48), torch.randn(5, 7, 64), torch.ones(5, 7, dtype=torch.bool)
    with torch.no_grad():
        at = lambda w: model.rewards_from_embedding(rte, h, h_mask, w)  # noqa: E731
        r0, r1 = at(0.0), at(1.0)
        torch.testing.assert_close(r1, model.score_head(rte).squeeze(-1))  # ω = 1: the semantic RM
        feedback = model.policy_feedback(rte, h, h_mask)
        torch.testing.assert_close(r0, model.score_head(feedback).squeeze(-1))  # ω = 0: φ(Ĥ)
        for w in (0.3, 0.6, 0.9):
            torch.testing.assert_close(at(w), (1 - w) * r0 + w * r1, atol=1e-5, rtol=0)
        torch.testing.assert_close(at(1.0 - 1e-6), r1, atol=1e-4, rtol=0)
        reward, part = model.reward_parts(rte, h, h_mask, 0.6)
        torch.testing.assert_close(part, 0.4 * (feedback @ model.score_head.weight[0]))
        torch.testing.assert_close(reward - part, model.rewards_from_embedding(0.6 * rte), atol=1e-5, rtol=0)


def test_hidden_states_used_by_the_rm_step_are_refreshed_in_the_last_epoch(tmp_path, tokenizer, prompts):
    """Algorithm 1: the RM step sees h' from the last policy epoch, not π_old's h. With one minibatch per
    epoch, the last epoch's forward runs after exactly one optimiser step."""
    policy = tiny.build_policy(tokenizer)
    cfg = _cfg(tmp_path, policy_epochs=2, policy_minibatch_size=16, micro_batch_size=16)
    rt = devices.make_runtime(cfg)
    devices.disable_dropout(policy)
    torch.manual_seed(0)
    ro = r2m.rollout(policy, copy.deepcopy(policy), tokenizer, prompts[:4], None, cfg, rt, None, 0, True)
    h_old, kept = ro.hidden.padded()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.policy_lr)
    after_first_step = {}
    optimizer.register_step_post_hook(
        lambda opt, *_: after_first_step.setdefault("policy", copy.deepcopy(policy)))
    advantages = torch.randn(16)
    r2m.policy_update(policy, optimizer, ro, advantages, cfg, rt)
    h_new, _ = ro.hidden.padded()
    assert not torch.allclose(h_new[kept], h_old[kept])  # refreshed, not π_old's
    h_expected, mask = r2m.policy_hidden_states(after_first_step["policy"], ro.query_responses, ro.attention_mask)
    torch.testing.assert_close(h_new[kept], h_expected[mask], atol=1e-5, rtol=0)


def test_grebt_pairs_fresh_by_default_annotated_on_request(tmp_path, tokenizer):
    """With --grebt_pairs fresh the pair is argmax/argmin of the rewards recomputed at the RM step; with
    'annotated' it is the annotation-time one; iterative_head always uses the annotation-time one."""
    rm = tiny.build_reward_model(tokenizer)
    torch.manual_seed(0)
    n, K = 3, 4
    ro = r2m.Rollout(
        query_responses=torch.zeros(n * K, 6, dtype=torch.long), attention_mask=torch.ones(n * K, 6),
        response_mask=torch.ones(n * K, 2), old_logprobs=torch.zeros(n * K, 2), ref_logprobs=torch.zeros(n * K, 2),
        hidden=HostRows.from_tensor(torch.randn(n * K, 5, 64)),
        rm_input_ids=torch.zeros(n * K, 6, dtype=torch.long), rm_attention_mask=torch.ones(n * K, 6),
        contains_eos=torch.ones(n * K, dtype=torch.bool), prompt_len=4,
        reward_token_embedding=torch.randn(n * K, 48),
    )
    annotated = torch.randn(n, K)
    results = {}
    for mode_name, pairs in [("r2m", "fresh"), ("r2m", "annotated"), ("iterative_head", "fresh")]:
        model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16)
        mode = r2m.REWARD_MODES[mode_name]
        cfg = _cfg(tmp_path, grebt_pairs=pairs, alpha=0.0, rm_minibatch_groups=n, rm_lr=0.0)
        with torch.no_grad():
            fresh = model.rewards_from_embedding(ro.reward_token_embedding, *ro.hidden.padded(), 0.5)
            fresh = fresh.view(n, K) if mode.sees_policy else model.rewards_from_embedding(
                ro.reward_token_embedding).view(n, K)
        opt = torch.optim.AdamW(list(model.trainable_parameters(feedback=mode.sees_policy)), lr=0.0)
        stats = r2m.reward_model_update(model, opt, ro, annotated, 0.5, mode, cfg, devices.make_runtime(cfg))
        chooser = annotated if (pairs == "annotated" or mode_name == "iterative_head") else fresh
        w, l = chooser.argmax(1), chooser.argmin(1)
        rows = torch.arange(n)
        expected = r2m.bradley_terry_loss(fresh[rows, w], fresh[rows, l]).item()
        assert stats["rm/bt"] == pytest.approx(expected, rel=1e-5), (mode_name, pairs)
        results[(mode_name, pairs)] = stats["rm/bt"]
    assert results[("r2m", "fresh")] != pytest.approx(results[("r2m", "annotated")])
    assert r2m.R2MConfig().grebt_pairs == "fresh"


def test_a_tiny_run_logs_the_feedback_diagnostics_and_per_token_kl(tmp_path, tokenizer, prompts):
    policy, rm = tiny.build_policy(tokenizer), tiny.build_reward_model(tokenizer)
    cfg = _cfg(tmp_path, total_trajectories=16 * 3, rm_epochs=2)
    model = runner.build_reward(cfg, rm, policy)
    history = r2m.train(policy, copy.deepcopy(policy), model, tokenizer, prompts, cfg)
    first, last = history[0], history[-1]
    assert first["feedback/reward_var_share"] == 0.0  # ω(0) = 1: the feedback path carries nothing
    assert last["feedback/reward_var_share"] > 0.0
    assert first["feedback/attn_rel_change"] == 0.0 < last["feedback/attn_rel_change"]
    for h in history:
        lengths = h["response/length"]
        assert h["kl/token"] == pytest.approx(h["kl/sequence"] / lengths, rel=1e-4)
