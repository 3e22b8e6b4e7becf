"""The memory plan (benchmarks/memory_plan.py) against real runs, and the memory fixes it showed were needed.

The plan runs r2m.train on fake tensors; here the same two steps also run on real tensors (tiny models built
from the same configs, CPU, bf16 autocast as on a GPU), and the live-bytes counter's per-phase peaks must agree.
"""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from plumbing import devices  # noqa: E402
import memory_plan  # noqa: E402
import r2m  # noqa: E402
from launch import tiny  # noqa: E402

PROMPT_TOKENS = 24


def _configs(tmp_path):
    """A GPT-NeoX policy and a LLaMA RM of another width, as config files like the shipped ones."""
    policy = dict(model_type="gpt_neox", vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True,
                  tie_word_embeddings=False)
    rm = dict(model_type="llama", vocab_size=1000, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    paths = []
    for name, d in (("policy.json", policy), ("rm.json", rm)):
        paths.append(str(tmp_path / name))
        with open(paths[-1], "w") as f:
            json.dump(d, f)
    return memory_plan.config_builder(*paths, bf16=True)


def _cfg(**kw):
    base = dict(group_size=2, max_new_tokens=8, generation_batch_size=8, forward_batch_size=4, micro_batch_size=2,
                rm_minibatch_groups=2, d_attn=32, policy_lr=1e-3, rm_lr=1e-3)
    return r2m.R2MConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """The plan (fake tensors) and the real run of the same two steps, same prompts."""
    torch.manual_seed(0)
    build = _configs(tmp_path_factory.mktemp("configs"))
    cfg = _cfg()
    prompts = memory_plan.plan_prompts(16, PROMPT_TOKENS, 1000)
    fake = memory_plan.simulate(cfg, build, PROMPT_TOKENS, fake=True, prompts=prompts)
    real = memory_plan.simulate(cfg, build, PROMPT_TOKENS, fake=False, prompts=prompts)
    return fake, real, build, prompts


def test_plan_matches_the_real_runs_live_bytes_within_5_percent(plans):
    fake, real, _, _ = plans
    for step in (1, 2):
        for phase in memory_plan.PHASES:
            predicted, measured = fake["peaks"][(step, phase)], real["peaks"][(step, phase)]
            assert measured > 0
            assert abs(predicted - measured) <= 0.05 * measured, (step, phase, predicted, measured)
    for key in ("weights", "grads", "optimizer", "host"):
        assert fake["held"][(2, "generation")][key] == real["held"][(2, "generation")][key], key


@pytest.mark.parametrize("reward", ["pretrained_rm", "r2m_full_rm"])
def test_plan_covers_the_pretrained_rm_and_the_whole_rm_baseline(tmp_path, reward):
    """The Pretrained RM's fine-tuning before RL, and the whole-RM baseline's GREBT step (the RM body with
    gradients, micro-batched): predicted as the real run measures them."""
    build = _configs(tmp_path)
    cfg = _cfg(reward=reward, pretrain_rm_preference_file="pairs.jsonl", pretrain_rm_batch_size=4)
    prompts = memory_plan.plan_prompts(16, PROMPT_TOKENS, 1000)
    fake = memory_plan.simulate(cfg, build, PROMPT_TOKENS, fake=True, prompts=prompts)
    real = memory_plan.simulate(cfg, build, PROMPT_TOKENS, fake=False, prompts=prompts)
    phases = [memory_plan.BEFORE_RL] if reward == "pretrained_rm" else ["RM update (GREBT)"]
    for phase in phases:
        step = 0 if phase == memory_plan.BEFORE_RL else 2
        predicted, measured = fake["peaks"][(step, phase)], real["peaks"][(step, phase)]
        assert measured > 0 and abs(predicted - measured) <= 0.05 * measured, (phase, predicted, measured)
    held = fake["held"][(2, "generation")]
    if reward == "pretrained_rm":  # the fine-tuning's gradients and AdamW state are gone before RL
        assert held["grads"] == 0 and held["optimizer"] == real["held"][(2, "generation")]["optimizer"]
        assert held["optimizer"] <= 2 * 4 * sum(p.numel() for p in build()[0].parameters()) * 1.01  # the policy's only
    else:  # the GREBT step frees the whole RM's gradients after its last update, as the policy's
        assert held["grads"] == 0


def test_host_memory_is_the_hidden_states_as_pinned_chunks(plans):
    """The plan's host memory is what a real run allocates for a step's hidden states (chunks of whole rows, each
    counted as the pinned allocator reserves it), once: no concatenated copy, no previous step's rows beside it."""
    fake, real, _, _ = plans
    cfg, _ = memory_plan.plan_config(_cfg(), "unused")
    rows = devices.HostRows.reserved_bytes(cfg.trajectories_per_step, (PROMPT_TOKENS + cfg.max_new_tokens - 1, 64),
                                           torch.bfloat16)
    assert fake["host_peak"] == real["host_peak"] == rows
    host = memory_plan.host_plan(fake, cfg, PROMPT_TOKENS)
    assert host["hidden"] == rows and host["peak"] == max(host["models"], rows)
    assert host["models"] == fake["models_host_bytes"] > 0


def test_shortened_generation_has_the_peak_of_a_full_one(plans):
    """The plan simulates a generation's prefill and last decoding steps only; on real tensors that must give
    the same generation peak as decoding every token."""
    fake, real, build, prompts = plans
    cfg = _cfg()
    old = memory_plan.DECODE_STEPS
    memory_plan.DECODE_STEPS = cfg.max_new_tokens  # no shortcut: every token decoded
    try:
        full = memory_plan.simulate(cfg, build, PROMPT_TOKENS, fake=False, prompts=prompts)
    finally:
        memory_plan.DECODE_STEPS = old
    for step in (1, 2):
        shortened, measured = real["peaks"][(step, "generation")], full["peaks"][(step, "generation")]
        assert abs(shortened - measured) <= 0.05 * measured, (step, shortened, measured)
    assert full["kv_cache_bytes"] == real["kv_cache_bytes"]


def test_generation_keeps_a_bf16_kv_cache(plans):
    """bf16 weights for generation: under autocast alone the float32 master weights made a float32 KV cache."""
    fake, real, _, _ = plans
    assert fake["kv_cache_dtype"] == torch.bfloat16 and real["kv_cache_dtype"] == torch.bfloat16
    # 2 layers x (keys + values) x 64 features x bf16, for every position of the generation batch
    positions = _cfg().generation_batch_size * (PROMPT_TOKENS + _cfg().max_new_tokens - 1)
    assert fake["kv_cache_bytes"] == 2 * 2 * 64 * 2 * positions


def test_gradients_are_freed_between_steps_and_adamw_makes_no_full_size_temporaries(plans):
    fake, _, _, _ = plans
    held = fake["held"][(2, "generation")]
    policy_bytes = held["optimizer"] // 2  # AdamW: two float32 moments per weight (the RM head's are few)
    # at the next rollout only the RM head's gradients (a few hundred bytes here) may remain, not the policy's
    assert held["grads"] < 0.01 * policy_bytes, (held["grads"], policy_bytes)
    at_step = fake["peaks"][(2, "policy AdamW step")]
    # held + the grads (as large as the policy); the multi-tensor AdamW adds a full-size sqrt(v) on top
    assert at_step <= held["total"] + policy_bytes * 1.5, (at_step, held["total"], policy_bytes)


def _forward_peak(fn) -> int:
    with memory_plan.LiveBytes() as counter:
        out = fn()
    return counter.peaks[(0, "set-up")], out


def test_chunked_logprobs_equal_log_softmax_and_never_hold_all_float32_logits(monkeypatch):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    V, B, S, P = 20000, 4, 20, 4  # a large vocabulary, so the logits dominate memory as in a real model
    policy = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, max_position_embeddings=64))
    ids = torch.randint(0, V, (B, S))
    mask = torch.ones_like(ids)
    forward = lambda: policy(input_ids=ids, attention_mask=mask, position_ids=r2m.position_ids_from_mask(mask)).logits  # noqa: E731
    full_log_softmax = lambda: torch.log_softmax(forward()[:, P - 1 : -1].float() / 0.7, -1).gather(-1, ids[:, P:, None]).squeeze(-1)  # noqa: E731
    full_peak, expected = _forward_peak(full_log_softmax)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    # 2 positions per chunk: the 16 response positions take eight chunks
    monkeypatch.setattr(r2m, "LOGPROB_CHUNK_ELEMENTS", B * V * 2, raising=False)
    peak, ours = _forward_peak(lambda: r2m.sequence_logprobs(policy, ids, mask, P, 0.7))
    ours.sum().backward()
    torch.testing.assert_close(ours, expected.detach(), atol=1e-5, rtol=0)
    for got, want in zip([p.grad for p in policy.parameters()], expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # Beyond what the forward itself holds at its peak (logits (B, S, V) included), the full float32 log-softmax
    # holds at least one (B, R, V) float32 tensor, 8 chunks' worth; chunked, a couple of chunks at a time.
    base, _ = _forward_peak(forward)
    chunk = B * 2 * V * 4
    assert full_peak - base >= 7.5 * chunk
    assert peak - base <= 3 * chunk, (peak - base) / chunk


def test_hidden_state_capture_hands_over_its_states():
    """Captured states are released by pop(): the hook's float32 (B, S, D_p) copy is not kept through the next
    forward or a backward."""
    tokenizer = tiny.build_tokenizer()
    policy = tiny.build_policy(tokenizer)
    ids = torch.randint(3, 50, (2, 6))
    with torch.no_grad(), r2m.HiddenStateCapture(policy) as cap:
        policy(input_ids=ids)
    h = cap.pop()
    assert h.shape == (2, 6, policy.config.hidden_size) and cap.hidden is None


def test_fit_finds_the_largest_batch_sizes_whose_phases_fit():
    """--fit's search against a stand-in plan whose phase peaks grow linearly with their batch sizes."""
    GiB = memory_plan.GiB
    tried = []

    def run(c):
        tried.append((c.generation_batch_size, c.forward_batch_size, c.micro_batch_size))
        peaks = {"generation": 1.0 * c.generation_batch_size / 8, "old/ref log-probs": 0.5 * c.forward_batch_size,
                 "RM annotation": 0.25 * c.forward_batch_size, "policy forward/backward": 3.0 * c.micro_batch_size,
                 "policy AdamW step": 1.0, "RM update (GREBT)": 1.0}
        return {"peaks": {(2, p): int(v * GiB) for p, v in peaks.items()}}

    cfg = _cfg(queries_per_step=64, policy_minibatch_size=64)
    chosen, result = memory_plan.fit(cfg, run, budget_gib=5.0, log=lambda s: None)
    # generation: 32/8 = 4 GiB fits, 64/8 = 8 does not; forward: 8 x 0.5 = 4 fits, 16 does not; micro: 1 x 3 fits
    assert (chosen.generation_batch_size, chosen.forward_batch_size, chosen.micro_batch_size) == (32, 8, 1)
    assert result["peaks"][(2, "generation")] == 4 * GiB
    assert len(tried) <= 6


def test_autocast_keeps_no_bf16_copy_of_the_weights():
    """r2m's autocast region must not cache bf16 copies of float32 weights (a whole policy's worth)."""
    rt = devices.Runtime(device=torch.device("cpu"), autocast_dtype=torch.bfloat16)
    layer = torch.nn.Linear(1024, 1024, bias=False)  # 4 MiB float32, 2 MiB as a bf16 copy
    x = torch.randn(2, 1024)
    with torch.no_grad(), memory_plan.LiveBytes() as counter, rt.autocast():
        y = layer(x)
        live = counter.device
    assert y.dtype == torch.bfloat16
    assert live < 2**20, live  # the (2, 1024) output only, not the 2 MiB weight copy
