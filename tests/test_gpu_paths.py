"""The GPU run's dtype and memory paths, run on the CPU: `--bf16 true` means on a CPU what it means on a GPU
(bf16 frozen models, bf16 autocast for what trains, float32 where the code says so), so its logic is tested here.

- the frozen models' rotary frequencies stay float32 (a module-wide .to(bf16) would round them);
- BRME's rewards are float32 under autocast, as R2M's;
- the Pretrained RM keeps no gradients after its fine-tuning, and each batch is cut to its own longest row;
- a step's hidden states live in host memory in chunks, written and read by row, never concatenated, and the
  previous step's are released before the next rollout;
- a checkpoint keeps the CUDA generator of the process's own device only (a resume may see fewer GPUs).
"""

import copy
import gc
import os
import sys
import weakref

import pytest
import torch

import brme
import baselines
import r2m
import train_tldr
from launch import flags as launch_flags
from launch import tiny
from plumbing import checkpoints, data, devices, distributed


def bf16_cfg(tmp_path, **overrides) -> r2m.R2MConfig:
    return tiny.loop_config(**{"output_dir": str(tmp_path / "run"), "bf16": True, **overrides})


def long_context_llama(tokenizer, seed=0):
    """A tiny Llama with Llama-3's rotary base (5e5) whose outputs depend on positions: sharp attention (q, k x 8)
    and a sharp LM head (x 30), so a rotation-angle error shows in its log-probs."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny.llama_config(tokenizer, hidden_size=64)
    config.rope_theta, config.max_position_embeddings = 500000.0, 2048
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(8.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 30.0 if "lm_head" in name else 1.0)
    return model


def test_bf16_is_the_same_choice_on_cpu_and_gpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert devices.on_for_cuda(None, cuda) and not devices.on_for_cuda(None, cpu)  # the default
    assert devices.on_for_cuda(True, cpu) and not devices.on_for_cuda(False, cuda)  # as asked, on either device
    rt = devices.make_runtime(r2m.R2MConfig(device="cpu", bf16=True, gradient_checkpointing=True))
    assert rt.autocast_dtype == torch.bfloat16 and rt.frozen_dtype == torch.bfloat16 and rt.gradient_checkpointing
    assert not rt.pin_memory  # pinned host memory only serves copies to a GPU
    rt = devices.make_runtime(r2m.R2MConfig(device="cpu"))
    assert rt.autocast_dtype is None and rt.frozen_dtype == torch.float32 and not rt.gradient_checkpointing


def test_tiny_preset_runs_with_bf16_true_on_cpu(tmp_path, capsys):
    history = train_tldr.main(["--preset", "tiny", "--bf16", "true", "--gradient_checkpointing", "true",
                               "--total_trajectories", "64", "--save_every", "2", "--output_dir", str(tmp_path / "run")])
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["reward/mean"])) for h in history)
    assert checkpoints.has_checkpoint(str(tmp_path / "run"))


@pytest.mark.parametrize("arch", ["gptneox", "llama"])
def test_frozen_models_keep_float32_rotary_frequencies(tmp_path, tokenizer, arch):
    """prepare_models stores the reference policy and the RM body in bf16, their parameters only: the rotary
    `inv_freq` buffers stay float32, as from_pretrained(dtype=bfloat16) leaves them."""
    policy = tiny.build_policy(tokenizer, arch=arch, hidden_size=64)
    ref = copy.deepcopy(policy)
    reward_model = r2m.R2MRewardModel(tiny.build_reward_model(tokenizer, arch=arch), d_policy=64, d_attn=16)
    rt = devices.make_runtime(bf16_cfg(tmp_path))
    devices.prepare_models(policy, ref, reward_model, rt)
    for model in (ref, reward_model.reward_model):
        frequencies = [b for name, b in model.named_buffers() if name.endswith("inv_freq")]
        assert frequencies and all(b.dtype == torch.float32 for b in frequencies)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert all(p.dtype == torch.float32 for p in reward_model.policy_feedback.parameters())
    assert all(p.dtype == torch.float32 for p in reward_model.score_head.parameters())
    # and the frozen models rotate positions exactly as the policy does, far into a sequence
    x = torch.zeros(1, 1, 16)
    positions = torch.tensor([[0, 560, 1500]])
    rotary = (lambda m: m.model.rotary_emb) if arch == "llama" else (lambda m: m.gpt_neox.rotary_emb)
    for ours, theirs in zip(rotary(ref)(x, positions), rotary(policy)(x, positions)):
        assert torch.equal(ours, theirs)


def test_reference_log_probs_track_the_policy_on_a_long_sequence(tmp_path, tokenizer):
    """At step 0 the bf16 reference and the float32 policy are the same model: their log-probs differ by bf16
    rounding only, which does not grow along a 600-token sequence. With rotary frequencies rounded to bf16
    (a module-wide cast) the gap grows with position: 1.4x from the first to the last 100 tokens here."""
    policy = long_context_llama(tokenizer)
    ref, rm = copy.deepcopy(policy), tiny.build_reward_model(tokenizer)
    rt = devices.make_runtime(bf16_cfg(tmp_path))
    devices.prepare_models(policy, ref, r2m.R2MRewardModel(rm, d_policy=64, d_attn=16), rt)
    torch.manual_seed(1)
    ids = torch.randint(5, len(tokenizer), (4, 600))
    mask = torch.ones_like(ids)
    with torch.no_grad(), rt.autocast():
        gap = (r2m.sequence_logprobs(policy, ids, mask, 1, 0.7) - r2m.sequence_logprobs(ref, ids, mask, 1, 0.7)).abs()
    early, late = gap[:, :100].mean().item(), gap[:, -100:].mean().item()
    assert late < 1.15 * early, (early, late)
    assert early < 0.1  # bf16 rounding of a sharp model, not a different model


def test_brme_rewards_are_float32_under_autocast(tokenizer):
    ensemble = brme.BRMEReward(tiny.build_reward_model(tokenizer), num_heads=3)
    torch.manual_seed(0)
    rte = 3.0 * torch.randn(6, 48)
    with torch.no_grad():
        exact = ensemble.rewards_from_embedding(rte)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = ensemble.rewards_from_embedding(rte.bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, ensemble.rewards_from_embedding(rte.bfloat16().float()), atol=1e-6, rtol=0)
    assert (mixed - exact).abs().max() < 0.05  # only the bf16 embedding's own rounding, not the heads'


def test_pretrained_rm_frees_its_gradients_and_cuts_each_batch_to_its_longest_row(tmp_path, tokenizer):
    rm = tiny.build_reward_model(tokenizer)
    reward_model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16)
    view = data.make_rm_view(tokenizer)
    rows = tiny.synthetic_preference_rows(24, seed=4)
    rows[0]["chosen"] = " " + " ".join(["dog"] * 60)  # one long row: only its own batches may be that long
    chosen, rejected = (data.pad_right([view(r["prompt"], r[c]) for r in rows], 0) for c in ("chosen", "rejected"))
    lengths = []
    rm.base_model.register_forward_pre_hook(lambda m, a, k: lengths.append(k["input_ids"].shape), with_kwargs=True)
    cfg = bf16_cfg(tmp_path, reward="pretrained_rm", pretrain_rm_preference_file="x", pretrain_rm_batch_size=4,
                   forward_batch_size=8, pretrain_rm_epochs=1)
    baselines.pretrain_reward_model(reward_model, chosen, rejected, cfg, devices.make_runtime(cfg))
    assert all(p.grad is None for p in reward_model.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in rm.parameters())  # frozen, stored in bf16
    longest = chosen[1].sum(1).max().item()
    assert max(shape[1] for shape in lengths) == longest  # the batches holding the long row ...
    assert sum(shape[1] == longest for shape in lengths) == 3  # ... and only those: accuracy before/after, a minibatch
    assert min(shape[1] for shape in lengths) < longest


def test_host_rows_hold_each_row_at_its_own_length_in_chunks(monkeypatch):
    monkeypatch.setattr(devices, "PINNED_CHUNK_BYTES", 15 * 4 * 4)  # 15 positions of 4 float32 features per chunk
    lengths = [5, 5, 5, 4, 2, 7, 1, 3]
    x = torch.randn(8, 9, 4)
    mask = torch.zeros(8, 9, dtype=torch.bool)  # each row's real positions: one run, left and right padding around
    for i, n in enumerate(lengths):
        mask[i, 9 - n - i % 2 : 9 - i % 2] = True
    store = devices.HostRows(lengths, 4, torch.float32)
    assert [c.shape[0] for c in store.chunks] == [15, 14, 3]  # whole rows, in order, no padding stored
    store.scatter(torch.tensor([7, 0, 3]), x[[7, 0, 3]], mask[[7, 0, 3]])
    store.scatter(torch.tensor([1, 2, 4, 5, 6]), x[[1, 2, 4, 5, 6]], mask[[1, 2, 4, 5, 6]])
    h, kept = store.gather(torch.tensor([6, 2, 5]), torch.device("cpu"))  # from position 0, zero-padded
    assert h.shape == (3, 7, 4) and kept.sum(1).tolist() == [1, 5, 7]
    torch.testing.assert_close(h[kept], x[[6, 2, 5]][mask[[6, 2, 5]]], rtol=0, atol=0)
    assert not h[~kept].any()
    with pytest.raises(ValueError, match="room"):  # more positions than the row was given
        store.scatter(torch.tensor([6]), x[[5]], mask[[5]])
    bf16 = devices.HostRows([9, 9], 4, torch.bfloat16)
    bf16.scatter(torch.arange(2), x[:2], torch.ones(2, 9, dtype=torch.bool))  # converted where the values are
    assert bf16.gather(torch.arange(2), torch.device("cpu"))[0].dtype == torch.bfloat16
    # what pinning reserves: each chunk rounded up to a power of two, as PyTorch's pinned allocator does
    assert devices.pinned_bytes(91_900_000) == 2**27 and devices.pinned_bytes(2**28) == 2**28
    assert devices.HostRows.reserved_bytes(lengths, 4, torch.float32) == 256 + 256 + 64  # 240, 224, 48 bytes


def test_a_step_never_concatenates_its_hidden_states_and_the_last_step_is_released_first(tmp_path, tokenizer, prompts):
    policy, rm = tiny.build_policy(tokenizer), tiny.build_reward_model(tokenizer)
    cfg = tiny.loop_config(output_dir=str(tmp_path / "run"), total_trajectories=32 * 3, forward_batch_size=8)
    reward_model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16)
    stores, alive_at_next_rollout = [], []
    original = r2m.rollout

    def rollout(*args, **kwargs):
        gc.collect()
        alive_at_next_rollout.append([ref() is not None for ref in stores])
        ro = original(*args, **kwargs)
        stores.append(weakref.ref(ro.hidden))
        return ro

    cats = []
    real_cat = torch.cat

    def counting_cat(tensors, *args, **kwargs):
        if any(t.dim() == 3 and t.shape[-1] == 64 and t.shape[0] == cfg.forward_batch_size for t in tensors):
            cats.append([t.shape for t in tensors])
        return real_cat(tensors, *args, **kwargs)

    try:
        r2m.rollout, torch.cat = rollout, counting_cat
        r2m.train(policy, copy.deepcopy(policy), reward_model, tokenizer, prompts, cfg)
    finally:
        r2m.rollout, torch.cat = original, real_cat
    assert alive_at_next_rollout == [[], [False], [False, False]]  # no step's rows live while the next are sampled
    assert cats == []  # no (forward batch, S, D_p) pieces concatenated into one copy


def test_checkpoints_keep_the_cuda_generator_of_the_process_own_device_only(tmp_path, tokenizer, prompts, monkeypatch):
    """Saved under torchrun on 8 GPUs, resumed where one GPU is visible: one state, set on the current device."""
    states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(8)}
    restored = []

    def set_rng_state(state, device="cuda"):
        index = torch.device(device).index or 0
        if index >= visible[0]:
            raise IndexError(f"no CUDA device {index}")
        restored.append(int(state[0]))

    visible = [8]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[3])  # this process: GPU 3
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [states[i] for i in range(visible[0])])
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: [set_rng_state(s, i) for i, s in enumerate(new)])
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: None)
    policy, rm = tiny.build_policy(tokenizer), tiny.build_reward_model(tokenizer)
    cfg = tiny.loop_config(output_dir=str(tmp_path / "run"), total_trajectories=32, save_every=1)
    r2m.train(policy, copy.deepcopy(policy), r2m.R2MRewardModel(rm, 64, 16), tokenizer, prompts, cfg)
    saved = torch.load(os.path.join(cfg.output_dir, "checkpoint", "state.pt"), weights_only=False)["rng"]["cuda"]
    assert torch.equal(saved, states[3])  # one device's state, not eight
    visible[0] = 1
    fresh = tiny.build_policy(tokenizer)
    checkpoints.load_checkpoint(cfg.output_dir, fresh, r2m.R2MRewardModel(tiny.build_reward_model(tokenizer), 64, 16),
                                {}, {}, cfg)
    assert restored == [3]


def test_process_group_waits_long_enough_for_a_checkpoint_write(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    distributed.setup("cpu")
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() >= 3600


def test_lora_under_torchrun_is_refused_before_anything_loads(tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="pip install peft (.ci/run installs it)")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        launch_flags.parse_flags(launch_flags.TLDRArgs, launch_flags.TLDR_PRESETS,
                           ["--preset", "tiny", "--lora_r", "4", "--output_dir", str(tmp_path / "o")])
    assert str(e.value).startswith("error: --lora_r runs on one process only") and "\n" not in str(e.value)


def test_local_data_files_load_without_the_datasets_package(tmp_path, monkeypatch):
    """The GPU image has torch and transformers only: the scripts' local .jsonl / .json files need no `datasets`."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails, as if it were not installed
    rows = data.load_rows(tiny.TLDR_TINY, "train", ["prompt"])
    assert len(rows) == 64 and rows[0]["prompt"].endswith("TL;DR:")
    assert len(data.load_rows(tiny.ALPACA_EVAL_TINY, "train", ["instruction"])) == 6  # one JSON list
    with pytest.raises(SystemExit) as e:
        data.load_rows("trl-lib/tldr", "train", ["prompt"])
    assert str(e.value) == "error: data set 'trl-lib/tldr' is a hub name, which needs the datasets package: pip install datasets"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(SystemExit) as e:
        data.load_rows(str(tmp_path / "bad.jsonl"), "train", ["prompt"])
    assert str(e.value).startswith("error: data set") and "is not JSON lines" in str(e.value)
