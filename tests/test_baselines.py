"""The paper's other baselines (baselines.py): ReMax, REINFORCE++ and the Pretrained RM, on the same loop."""

import math

import pytest
import torch

import baselines
import r2m
from helpers import LEARNING_SEED, learned
from launch import tiny
from plumbing import data, devices
from plumbing.devices import HostRows


def _cfg(tmp_path, **overrides) -> r2m.R2MConfig:
    return tiny.loop_config(**{"output_dir": str(tmp_path / "run"), "max_new_tokens": 6, **overrides})


def test_remax_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 4.0], [0.0, -1.0, 3.0]])
    greedy = torch.tensor([2.0, 1.0])
    expected = torch.tensor([[-1.0, 0.0, 2.0], [-1.0, -2.0, 2.0]])
    assert torch.equal(baselines.remax_advantages(rewards, greedy), expected)


def test_reinforce_pp_returns_and_batch_normalisation_hand_computed():
    # two responses, R = 3; the second ends after 2 tokens
    rewards = torch.tensor([1.0, -2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    beta = 0.5
    # per-token rewards: -β·KL, plus the score on the last response token
    # row 0: [-0.05, -0.10, -0.15 + 1] -> returns [0.70, 0.75, 0.85]
    # row 1: [-0.20, -0.25 - 2]        -> returns [-2.45, -2.25]
    returns = torch.tensor([0.70, 0.75, 0.85, -2.45, -2.25])
    mean, std = returns.mean(), returns.std()
    expected = torch.tensor([[0.70, 0.75, 0.85], [-2.45, -2.25, 0.0]])
    expected = torch.where(mask.bool(), (expected - mean) / std, torch.zeros(()))
    out = baselines.reinforce_pp_advantages(rewards, kl, mask, beta)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert out[mask.bool()].mean().abs() < 1e-6 and out[mask.bool()].std() == pytest.approx(1.0, abs=1e-5)


def test_policy_loss_takes_per_token_advantages():
    lp = torch.tensor([[-1.0, -2.0]])
    adv_tok = torch.tensor([[2.0, -1.0]])
    loss, _ = r2m.policy_loss(lp, lp, lp, adv_tok, torch.ones(1, 2), clip_eps=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-(2.0 - 1.0) / 2)  # ratio 1: -mean(A_t)


def test_greedy_baseline_is_greedy_and_its_states_are_the_policys(tmp_path, tokenizer, models, prompts):
    """The baseline responses are exactly generate(do_sample=False); the hidden states captured during that
    generation equal a plain forward's on the same sequences (so R2M can score the baseline with feedback)."""
    from transformers import GenerationConfig

    policy, _, rm = models
    devices.disable_dropout(policy)
    cfg = _cfg(tmp_path, algo="remax", max_new_tokens=6)
    rt = devices.make_runtime(cfg)
    batch = prompts[:5]
    ids, mask = data.pad_left(batch, tokenizer.pad_token_id)
    capture = baselines.GenerationStateCapture(policy, HostRows.for_policy([len(p) + 5 for p in batch], policy, rt))
    with capture:  # one generate() call: every prompt fits one generation batch
        response, response_mask = r2m.generate_responses(policy, ids, mask, tokenizer, cfg, rt, greedy=True)
    capture.end_batch(torch.arange(len(batch)), r2m.hidden_state_mask(torch.cat([mask, response_mask], 1)))
    gc = GenerationConfig(do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        expected = policy.generate(input_ids=ids, attention_mask=mask, generation_config=gc)[:, ids.shape[1]:]
    expected, _ = r2m.truncate_after_eos(
        torch.nn.functional.pad(expected, (0, 6 - expected.shape[1]), value=tokenizer.pad_token_id),
        tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert torch.equal(response, expected)
    full = torch.cat([ids, response], 1)
    full_mask = torch.cat([mask, response_mask], 1)
    h, h_mask = r2m.policy_hidden_states(policy, full, full_mask)
    captured, captured_mask = capture.hidden.padded()  # each row's real positions, from position 0
    assert capture.hidden.lengths == h_mask.sum(1).tolist()
    torch.testing.assert_close(captured[captured_mask], h[h_mask], atol=1e-5, rtol=0)
    # the baseline's reward is the RM's score of that greedy response, at the step's ω
    reward_model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16)
    greedy_rewards = baselines.greedy_baseline(policy, reward_model, tokenizer, batch, None, 0.7, cfg, rt, None, 0)
    with torch.no_grad():
        direct = reward_model(full, full_mask, h, h_mask, omega=0.7)
    torch.testing.assert_close(greedy_rewards, direct, atol=1e-5, rtol=0)


def _count_forwards(policy, ref_policy, rm):
    counts = {"policy": 0, "generate_calls": 0, "ref": 0, "rm": 0}
    original_generate = policy.generate

    def generate(*a, **k):
        counts["generate_calls"] += 1
        in_generate[0] = True
        try:
            return original_generate(*a, **k)
        finally:
            in_generate[0] = False

    in_generate = [False]
    policy.generate = generate
    policy.register_forward_hook(lambda *a: None if in_generate[0] else counts.__setitem__("policy", counts["policy"] + 1))
    ref_policy.register_forward_hook(lambda *a: counts.__setitem__("ref", counts["ref"] + 1))
    rm.base_model.register_forward_hook(lambda *a: counts.__setitem__("rm", counts["rm"] + 1))
    return counts


@pytest.mark.parametrize("reward", ["vanilla", "r2m"])
def test_remax_adds_one_greedy_generation_and_one_rm_score_per_prompt(tmp_path, tokenizer, models, prompts, reward):
    policy, ref_policy, rm = models
    reward_model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16)
    cfg = _cfg(tmp_path, algo="remax", reward=reward, total_trajectories=32, forward_batch_size=8, micro_batch_size=4)
    counts = _count_forwards(policy, ref_policy, rm)
    history = r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, cfg)
    N, n = cfg.trajectories_per_step, cfg.queries_per_step
    assert counts["generate_calls"] == 2  # the sampled responses, then the greedy baseline
    assert counts["policy"] == N // 8 + cfg.policy_epochs * N // 4  # as RLOO: the baseline adds no policy forward
    assert counts["ref"] == N // 8
    assert counts["rm"] == N // 8 + math.ceil(n / 8)  # + one RM score per prompt
    assert "reward/greedy_mean" in history[0]


def test_remax_baseline_is_not_trained_on(tmp_path, tokenizer, models, prompts):
    """The policy loss sees only the sampled responses: the greedy baseline changes the advantages only.
    With every greedy reward forced to the group mean, ReMax's update equals a mean-baseline update."""
    policy, ref_policy, rm = models
    cfg = _cfg(tmp_path, algo="remax", reward="vanilla", total_trajectories=32)
    rt = devices.make_runtime(cfg)
    torch.manual_seed(0)
    ro = r2m.rollout(policy, ref_policy, tokenizer, prompts[:8], None, cfg, rt, None, 0, False)
    assert ro.query_responses.shape[0] == cfg.trajectories_per_step  # no greedy rows in what is trained on
    rewards = torch.randn(8, 4)
    adv = r2m.ALGOS["remax"].advantages(rewards, ro, rewards.mean(1), cfg)
    torch.testing.assert_close(adv, (rewards - rewards.mean(1, keepdim=True)).reshape(-1))


def test_reinforce_pp_has_no_in_loss_kl(tmp_path, tokenizer, models, prompts):
    """β enters REINFORCE++ once, through the per-token reward: the loss's k3 term is off."""
    assert r2m.ALGOS["reinforce_pp"].kl_in_loss is False and r2m.ALGOS["rloo"].kl_in_loss is True
    policy, ref_policy, rm = models
    cfg = _cfg(tmp_path, algo="reinforce_pp", reward="vanilla", beta=0.3)
    rt = devices.make_runtime(cfg)
    torch.manual_seed(0)
    ro = r2m.rollout(policy, ref_policy, tokenizer, prompts[:8], None, cfg, rt, None, 0, False)
    adv = r2m.ALGOS["reinforce_pp"].advantages(torch.randn(8, 4), ro, None, cfg)
    assert adv.shape == ro.response_mask.shape  # per token
    seen = {}
    original = r2m.policy_loss
    r2m.policy_loss = lambda *a: seen.setdefault("beta", a[6]) is not None and original(*a)
    try:
        r2m.policy_update(policy, torch.optim.AdamW(policy.parameters(), lr=0.0), ro, adv, cfg, rt)
    finally:
        r2m.policy_loss = original
    assert seen["beta"] == 0.0


@pytest.mark.learning
def test_pretrained_rm_fine_tuning_raises_pair_accuracy_and_trains_the_body(tmp_path, tokenizer):
    rm = tiny.build_reward_model(tokenizer, seed=LEARNING_SEED + 1)
    reward_model = baselines.PretrainedRewardModel(rm, d_policy=64, d_attn=16)
    body_before = {k: v.clone() for k, v in rm.base_model.state_dict().items()}
    cfg = _cfg(tmp_path, reward="pretrained_rm", pretrain_rm_preference_file=tiny.PREFERENCES_TINY,
               pretrain_rm_epochs=3, pretrain_rm_lr=1e-3, seed=LEARNING_SEED)
    chosen, rejected = data.preference_views(tiny.PREFERENCES_TINY, data.make_rm_view(tokenizer))
    before, after = baselines.pretrain_reward_model(reward_model, chosen, rejected, cfg, devices.make_runtime(cfg))
    assert learned(after - before, 0.1), (before, after)
    assert any(not torch.equal(v, rm.base_model.state_dict()[k]) for k, v in body_before.items())
    assert not any(p.requires_grad for p in rm.parameters())  # frozen again for RL
    assert "body" in reward_model.trainable_state_dict()  # and kept by checkpoints


def test_invalid_combinations_are_one_line_errors():
    with pytest.raises(ValueError, match="--group_size"):
        r2m.R2MConfig(algo="rloo", group_size=1, reward="vanilla").validate()
    with pytest.raises(ValueError, match="GREBT"):
        r2m.R2MConfig(algo="remax", group_size=1, reward="r2m").validate()
    r2m.R2MConfig(algo="remax", group_size=1, reward="vanilla").validate()  # K = 1 is fine for ReMax
    r2m.R2MConfig(algo="reinforce_pp", group_size=1, reward="r2m_frozen").validate()


@pytest.mark.parametrize("reward,flag", [("pretrained_rm", "pretrain_rm_preference_file"), ("brme", "brme_preference_file")])
def test_a_mode_fitted_before_rl_needs_its_pairs_before_anything_loads(tmp_path, reward, flag):
    from launch import flags

    with pytest.raises(SystemExit, match=f"--reward {reward} needs --{flag}"):
        flags.parse_flags(flags.TLDRArgs, flags.TLDR_PRESETS, ["--reward", reward, "--output_dir", str(tmp_path / "r")])


ALL_ALGOS = ["grpo", "reinforce_pp", "remax", "rloo"]
ALL_REWARDS = ["brme", "iterative_head", "pretrained_rm", "r2m", "r2m_frozen", "r2m_full_rm", "r2m_noise", "vanilla"]


@pytest.mark.parametrize("entry", ["import launch.flags", "import launch.runner",
                                   "sys.path.insert(0, 'experiments'); import overoptimization"])
def test_every_variant_is_a_row_wherever_runs_start(entry):
    """The scripts (through launch/) and the study see every estimator and reward mode; a fresh process each."""
    import subprocess
    import sys

    from helpers import ENV, ROOT

    code = f"import sys; {entry}; import r2m; print(sorted(r2m.ALGOS)); print(sorted(r2m.REWARD_MODES))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [str(ALL_ALGOS), str(ALL_REWARDS)]


def test_r2m_alone_holds_its_own_rows_and_says_where_the_baselines_are():
    import subprocess
    import sys

    from helpers import ENV, ROOT

    code = ("import r2m\nprint(sorted(r2m.ALGOS), sorted(r2m.REWARD_MODES))\n"
            "try:\n    r2m.R2MConfig(algo='remax').validate()\nexcept ValueError as e:\n    print(e)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    first, error = proc.stdout.splitlines()
    assert first == "['grpo', 'rloo'] ['iterative_head', 'r2m', 'r2m_frozen', 'vanilla']"
    assert error.startswith("--algo must be one of ['grpo', 'rloo'], got 'remax'") and "import baselines" in error
