"""LoRA policies (lora.py): only the adapter trains, the reference is the base model without a second copy,
R2M's hidden states come from the adapted policy, a tiny run learns, checkpoints resume and merge."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import r2m
from helpers import LEARNING_SEED, learned
from launch import flags as launch_flags
from launch import tiny
from plumbing import checkpoints, data, devices

pytest.importorskip("peft", reason="pip install peft (.ci/run installs it)")
from plumbing import lora  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers import ENV  # noqa: E402  (the scripts' environment, PYTHONPATH included)


def tiny_cfg(tmp_path, **overrides) -> r2m.R2MConfig:
    return tiny.loop_config(**{"output_dir": str(tmp_path / "run"), "max_new_tokens": 4, "policy_lr": 1e-2, **overrides})


def lora_policy(tokenizer, seed=0, r=8):
    """(LoRA policy, an untouched copy of its base model)."""
    policy = tiny.build_policy(tokenizer, seed=seed)
    base = copy.deepcopy(policy)
    return lora.add_lora(policy, r=r, alpha=2 * r, target_modules="all-linear"), base


def base_weights(policy) -> dict:
    """The LoRA policy's own (frozen) weights under the base model's names."""
    state = policy.get_base_model().state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


def adapter_weights(policy) -> dict:
    return {k: v.detach().clone() for k, v in policy.named_parameters() if ".lora_" in k}


def logprobs(model, qr, am, P, temperature=0.7):
    with torch.no_grad():
        return r2m.sequence_logprobs(model, qr, am, P, temperature)


def test_only_the_adapter_trains_and_the_reference_is_the_base_model(tmp_path, tokenizer, prompts):
    policy, base = lora_policy(tokenizer)
    ref = lora.AdapterDisabledReference(policy)
    assert list(ref.parameters()) == []  # no second copy of the policy's weights
    reward_model = r2m.R2MRewardModel(tiny.build_reward_model(tokenizer, seed=1), d_policy=64, d_attn=16)
    attn = copy.deepcopy(reward_model.policy_feedback.state_dict())
    adapter_before = adapter_weights(policy)
    r2m.train(policy, ref, reward_model, tokenizer, prompts, tiny_cfg(tmp_path))

    frozen, original = base_weights(policy), base.state_dict()
    assert set(frozen) == set(original)
    assert all(torch.equal(frozen[k], original[k]) for k in original)  # every base weight bit-identical
    adapter_after = adapter_weights(policy)
    assert len(adapter_after) == 2 * 4 * 2  # A and B of 4 linear layers in each of 2 blocks
    assert all(not torch.equal(adapter_before[k], adapter_after[k]) for k in adapter_after)  # all of them moved
    assert all(p.requires_grad for k, p in policy.named_parameters() if ".lora_" in k)  # prepare_models froze none
    # R2M's feedback path trained on states captured through the peft wrapper
    assert any(not torch.equal(attn[k], v) for k, v in reward_model.policy_feedback.state_dict().items())

    ids, mask = data.pad_left([p[-20:] + [5, 6, 7, 8] for p in prompts[:6]], 0)
    P = ids.shape[1] - 4
    ref_lp, base_lp, policy_lp = (logprobs(m, ids, mask, P) for m in (ref, base, policy))
    assert torch.allclose(ref_lp, base_lp, atol=1e-6, rtol=0)  # π_ref = the SFT model exactly
    assert (policy_lp - base_lp).abs().max() > 1e-2  # while the adapted policy has moved away from it
    assert not torch.allclose(logprobs(policy, ids, mask, P), ref_lp)  # the adapter is back on after ref's forward


def test_hidden_states_are_the_adapted_policys(tmp_path, tokenizer, prompts):
    """The hook on the backbone sees the adapter's effect, and the reference's forward (adapter off, same
    modules) does not overwrite what the old-log-prob forward captured."""
    policy, base = lora_policy(tokenizer)
    with torch.no_grad():
        for k, p in policy.named_parameters():
            if ".lora_B" in k:
                p.normal_(0, 0.5)  # a trained-looking adapter (B starts at zero)
    cfg = tiny_cfg(tmp_path, forward_batch_size=8)
    rt = devices.make_runtime(cfg)
    ro = r2m.rollout(policy, lora.AdapterDisabledReference(policy), tokenizer, prompts[:4], None, cfg, rt, None, 0)
    adapted, h_mask = r2m.policy_hidden_states(policy, ro.query_responses, ro.attention_mask)
    original, _ = r2m.policy_hidden_states(base, ro.query_responses, ro.attention_mask)
    captured, kept = ro.hidden.padded()
    assert torch.allclose(captured[kept], adapted[h_mask], atol=1e-5)
    assert not torch.allclose(captured[kept], original[h_mask], atol=1e-2)
    assert torch.allclose(ro.ref_logprobs, logprobs(base, ro.query_responses, ro.attention_mask, ro.prompt_len, cfg.temperature), atol=1e-6)


def test_frozen_base_is_stored_like_the_reference_and_the_adapter_stays_float32(tmp_path, tokenizer, prompts):
    """On GPU the frozen models are bf16 and trainable weights float32 masters; with LoRA the policy's base is
    frozen, so it is bf16 too. Checked on CPU with a bf16-autocast runtime (the GPU path's dtypes)."""
    policy, _ = lora_policy(tokenizer)
    ref = lora.AdapterDisabledReference(policy)
    reward_model = r2m.R2MRewardModel(tiny.build_reward_model(tokenizer, seed=1), d_policy=64, d_attn=16)
    cfg = tiny_cfg(tmp_path, bf16=True)  # --bf16 true: the GPU's dtypes, on the CPU
    rt = devices.make_runtime(cfg)
    devices.prepare_models(policy, ref, reward_model, rt)
    for k, p in policy.named_parameters():
        if ".lora_" in k:
            assert p.dtype == torch.float32 and p.requires_grad, k
        else:
            assert p.dtype == torch.bfloat16 and not p.requires_grad, k
    # one step's rollout and policy update run in these dtypes
    ro = r2m.rollout(policy, ref, tokenizer, prompts[:4], None, cfg, rt, None, 0)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    advantages = torch.randn(ro.query_responses.shape[0])
    stats = r2m.policy_update(policy, optimizer, ro, advantages, tiny_cfg(tmp_path, policy_minibatch_size=8), rt)
    assert torch.isfinite(torch.tensor(stats["policy/loss"]))


@pytest.mark.learning
def test_tiny_lora_run_raises_a_fixed_reward(tmp_path, tokenizer, prompts):
    """As the full fine-tuning learning test in test_loop.py, with only a LoRA adapter training."""
    policy, _ = lora_policy(tokenizer, seed=LEARNING_SEED)
    # A random tiny model's LM head (init std 0.02) gives near-uniform next-token distributions, which changes
    # of the hidden state alone (all LoRA can make) hardly sharpen; an SFT model's head is not that flat.
    with torch.no_grad():
        policy.get_output_embeddings().weight.mul_(10.0)
    reward_model = r2m.R2MRewardModel(tiny.build_reward_model(tokenizer, seed=LEARNING_SEED + 1), d_policy=64, d_attn=16)
    steps = 16
    cfg = tiny_cfg(tmp_path, reward="vanilla", total_trajectories=32 * steps, max_new_tokens=3, beta=0.0, policy_lr=5e-3,
                   seed=LEARNING_SEED)
    history = r2m.train(policy, lora.AdapterDisabledReference(policy), reward_model, tokenizer, prompts, cfg)
    rewards = [h["reward/mean"] for h in history]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    spread = history[0]["reward/std"]
    assert learned(end - start, 1.0 * spread), ([round(r, 3) for r in rewards], spread)


def test_checkpoint_holds_the_adapter_resumes_and_merges(tmp_path, tokenizer, prompts):
    from transformers import AutoModelForCausalLM

    import eval_judge

    policy, _ = lora_policy(tokenizer)
    reward_model = r2m.R2MRewardModel(tiny.build_reward_model(tokenizer, seed=1), d_policy=64, d_attn=16)
    cfg = tiny_cfg(tmp_path, save_every=2, merge_on_save=True)
    r2m.train(policy, lora.AdapterDisabledReference(policy), reward_model, tokenizer, prompts, cfg)
    ckpt = os.path.join(cfg.output_dir, "checkpoint")
    adapter_file = os.path.join(ckpt, "adapter", "adapter_model.safetensors")
    merged_file = os.path.join(ckpt, "policy", "model.safetensors")
    assert os.path.getsize(adapter_file) < 0.25 * os.path.getsize(merged_file)  # the adapter, not a model

    # --merge_on_save: a plain Hugging Face folder that behaves as the adapted policy
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt, "policy")).eval()
    ids, mask = data.pad_left([p[-20:] + [5, 6, 7] for p in prompts[:4]], 0)
    P = ids.shape[1] - 3
    assert torch.allclose(logprobs(merged, ids, mask, P), logprobs(policy, ids, mask, P), atol=1e-4)
    rows = [{"id": str(i), "prompt": r["prompt"]} for i, r in enumerate(tiny.synthetic_tldr_rows(2, seed=5))]
    generated = eval_judge.generate(eval_judge.EvalArgs(policy=os.path.join(ckpt, "policy"), max_new_tokens=3, temperature=0.0, device="cpu"),
                                    rows, torch.device("cpu"), str(tmp_path / "responses.jsonl"))
    assert len(generated) == 2  # eval_judge.py reads the merged folder

    # resume: a fresh base + adapter picks up the trained adapter, optimiser and step, and runs on
    fresh, _ = lora_policy(tokenizer)
    fresh_rm = r2m.R2MRewardModel(tiny.build_reward_model(tokenizer, seed=1), d_policy=64, d_attn=16)
    assert checkpoints.load_checkpoint(cfg.output_dir, fresh, fresh_rm, {}, {}, cfg) == 2
    trained, restored = adapter_weights(policy), adapter_weights(fresh)
    assert all(torch.equal(trained[k], restored[k]) for k in trained)
    fresh, _ = lora_policy(tokenizer)
    history = r2m.train(fresh, lora.AdapterDisabledReference(fresh), fresh_rm, tokenizer, prompts,
                        tiny_cfg(tmp_path, total_trajectories=8 * 4 * 3, save_every=2, resume=True))
    assert [h["step"] for h in history] == [2]
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2]


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_tldr.py"), "--preset", "tiny", *args],
                          env=ENV, capture_output=True, text=True, timeout=300)


def test_lora_flags_end_to_end_with_resume_and_clear_errors(tmp_path, tokenizer):
    out = str(tmp_path / "lora")
    flags = ["--output_dir", out, "--lora_r", "4", "--lora_target_modules", "query_key_value,dense"]
    first = run(*flags, "--total_trajectories", "64")
    assert first.returncode == 0, first.stderr[-3000:]
    with open(os.path.join(out, "checkpoint", "adapter", "adapter_config.json")) as f:
        saved = json.load(f)
    assert saved["r"] == 4 and sorted(saved["target_modules"]) == ["dense", "query_key_value"]
    assert not os.path.exists(os.path.join(out, "checkpoint", "policy"))  # no merged copy unless asked
    second = run(*flags, "--total_trajectories", "96", "--resume", "true")
    assert second.returncode == 0 and "resumed" in second.stderr + second.stdout, second.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2]

    cfg = tiny_cfg(tmp_path, output_dir=out, total_trajectories=128, d_attn=32, beta=0.1)  # the preset's β
    rm = r2m.R2MRewardModel(tiny.build_reward_model(tokenizer, seed=1), d_policy=64, d_attn=32)
    cases = [
        (lambda: checkpoints.load_checkpoint(out, tiny.build_policy(tokenizer), rm, {}, {}, cfg), "holds a LoRA adapter"),
        (lambda: checkpoints.load_checkpoint(out, lora.add_lora(tiny.build_policy(tokenizer), 8, 32, "query_key_value,dense"),
                                     rm, {}, {}, cfg), "written with LoRA r = 4, not 8"),
        (lambda: launch_flags.parse_flags(launch_flags.TLDRArgs, launch_flags.TLDR_PRESETS, ["--preset", "tiny", "--merge_on_save", "true",
                                                                               "--output_dir", str(tmp_path / "o")]),
         "--merge_on_save needs --lora_r"),
        (lambda: lora.add_lora(tiny.build_policy(tokenizer), 4, 8, "q_proj"), "not found"),
    ]
    for call, message in cases:
        with pytest.raises(SystemExit) as e:
            call()
        assert str(e.value).startswith("error:") and message in str(e.value) and "\n" not in str(e.value)


def test_missing_peft_is_one_clear_line(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(SystemExit) as e:
        lora.add_lora(tiny.build_policy(tokenizer), 4, 8, "all-linear")
    assert str(e.value) == "error: --lora_r needs the peft package: pip install peft"
