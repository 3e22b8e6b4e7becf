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
    R = cfg.max_new_tokens
    # each row holds its own positions: prompts of PROMPT_TOKENS or one fewer tokens, responses of R
    assert fake["row_lengths"] == real["row_lengths"] and set(fake["row_lengths"]) == {PROMPT_TOKENS + R - 2,
                                                                                        PROMPT_TOKENS + R - 1}
    rows = devices.HostRows.reserved_bytes(fake["row_lengths"], 64, torch.bfloat16)
    assert fake["host_peak"] == real["host_peak"] == rows
    host = memory_plan.host_plan(fake, cfg, [n - R + 1 for n in fake["row_lengths"][:: cfg.group_size]])
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


def test_fit_finds_the_largest_batch_sizes_and_the_fewest_checkpointed_layers_that_fit():
    """--fit's search against a stand-in plan whose phase peaks grow linearly with their batch sizes, and fall by a
    layer's activations for each checkpointed layer (of 8)."""
    GiB = memory_plan.GiB
    tried = []

    def run(c):
        tried.append(c)
        layers = 8 if c.checkpoint_layers < 0 else c.checkpoint_layers
        peaks = {"generation": 1.0 * c.generation_batch_size / 8, "old/ref log-probs": 0.5 * c.forward_batch_size,
                 "RM annotation": 0.25 * c.forward_batch_size, "policy AdamW step": 1.0, "RM update (GREBT)": 1.0,
                 "policy forward/backward": 0.5 * c.micro_batch_size + 0.25 * (8 - layers)}
        return {"peaks": {(2, p): int(v * GiB) for p, v in peaks.items()}}

    cfg = _cfg(queries_per_step=256, group_size=2, policy_minibatch_size=64, generation_batch_size=64,
               checkpoint_layers=-1)
    chosen, result = memory_plan.fit(cfg, run, budget_gib=5.0, layers=8, log=lambda s: None)
    # generation: 40/8 = 5 GiB fits (capped at 128 in any case); forward: 8 x 0.5 fits, 16 does not (multiples of 8
    # above 8); micro-batch: 8 x 0.5 + 4 layers' activations fits, 16 does not (divisors of 64); then the fewest
    # checkpointed layers for micro-batches of 8: 0.5 x 8 + 0.25 x (8 - k) <= 5 -> k = 4
    assert (chosen.generation_batch_size, chosen.forward_batch_size, chosen.micro_batch_size) == (40, 8, 8)
    assert chosen.checkpoint_layers == 4
    assert result["peaks"][(2, "generation")] == 5 * GiB and len(tried) <= 16
    capped, _ = memory_plan.fit(cfg, run, budget_gib=100.0, flags=["generation_batch_size"], layers=8,
                                log=lambda s: None)
    assert capped.generation_batch_size == memory_plan.GENERATION_CAP == 128


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


def test_the_step_cost_counts_the_batches_the_code_runs(tmp_path):
    """The plan's count of a step's work (step_cost) against a real step on real tensors: every forward's rows x
    columns, per phase, recorded by hooks on the models, with prompts of many lengths."""
    from types import SimpleNamespace

    build = _configs(tmp_path)
    cfg = _cfg(queries_per_step=8, group_size=2, total_trajectories=16, policy_minibatch_size=8, micro_batch_size=2,
               generation_batch_size=4, forward_batch_size=4, output_dir=str(tmp_path / "run"), save_every=0,
               sample_every=0, device="cpu")
    lengths = [21, 9, 30, 14, 26, 12, 17, 24]
    policy, ref_policy, rm, vocab = build()
    slots = {p: 0 for p in memory_plan.COST_PHASES}
    where = ["old/ref log-probs"]

    def record(phase_of):
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and ids.shape[1] > 1:  # a decoding step's one new token is not a forward batch
                slots[phase_of()] += ids.numel()
        return hook

    generate = policy.generate

    def generating(*a, **k):
        where[0] = "generation"
        try:
            return generate(*a, **k)
        finally:
            where[0] = "old/ref log-probs"

    policy.generate = generating
    policy.get_decoder().register_forward_pre_hook(
        record(lambda: "policy update" if policy.training and torch.is_grad_enabled() else where[0]), with_kwargs=True)
    ref_policy.get_decoder().register_forward_pre_hook(record(lambda: "old/ref log-probs"), with_kwargs=True)
    rm.base_model.register_forward_pre_hook(record(lambda: "RM annotation"), with_kwargs=True)
    prompts = [[1 + (3 * i + j) % (vocab - 2) for j in range(n)] for i, n in enumerate(lengths)]
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=vocab + 1, decode=lambda *a, **k: "")  # no EOS
    torch.manual_seed(0)
    r2m.train(policy, ref_policy, r2m.R2MRewardModel(rm, d_policy=64, d_attn=32), tokenizer, prompts, cfg)
    chosen = r2m.step_prompt_indices(len(prompts), cfg.queries_per_step, 0, cfg.seed)
    cost = memory_plan.step_cost(cfg, [lengths[i] for i in chosen], memory_plan.flop_rates(build, cfg.d_attn))
    for phase in ("generation", "old/ref log-probs", "RM annotation"):  # the same batches, exactly
        assert cost.slots[phase] == slots[phase], (phase, cost.slots[phase], slots[phase])
    # the update's minibatches are random draws: the count's and the run's differ in composition, not in scale
    assert abs(cost.slots["policy update"] - slots["policy update"]) <= 0.15 * slots["policy update"]
    padded = memory_plan.step_cost(cfg, [lengths[i] for i in chosen], memory_plan.flop_rates(build, cfg.d_attn),
                                   padded=True)
    assert padded.padding > 0.2 > cost.padding and padded.step_seconds > cost.step_seconds
    assert sum(cost.real.values()) == sum(padded.real.values())  # the same real tokens, in fewer slots
