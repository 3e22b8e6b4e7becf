"""The R2M reward model, the cross-attention and the hidden-state hook."""

import torch

import baselines
import r2m
from launch import tiny
from plumbing import data


def _batch(tokenizer, texts, side="right"):
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = data.pad_right if side == "right" else data.pad_left
    return pad(ids, tokenizer.pad_token_id)


def test_omega_one_reproduces_the_wrapped_rm_exactly(tokenizer, models):
    _, _, rm = models
    rm.eval()
    ids, mask = _batch(tokenizer, ["a short post. TL;DR: fine", "my dog ate the cat food again. TL;DR: dog"])
    own = rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # the RM's own score, same inputs
    model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16)
    h = torch.randn(2, 7, 64)
    h_mask = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        ours = model(ids, mask, h, h_mask, omega=r2m.omega(0, 10, 0.6))
        no_feedback = model(ids, mask)
    torch.testing.assert_close(ours, own, rtol=0, atol=1e-6)
    torch.testing.assert_close(no_feedback, own, rtol=0, atol=1e-6)
    # and below ω = 1 the feedback path does change the reward
    with torch.no_grad():
        assert not torch.allclose(model(ids, mask, h, h_mask, omega=0.6), own)


def test_reward_does_not_depend_on_padding_side(tokenizer, models):
    _, _, rm = models
    model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=16).eval()
    texts = ["one two three", "a much longer text with many more tokens in it than the first"]
    with torch.no_grad():
        right = model(*_batch(tokenizer, texts, "right"))
        left = model(*_batch(tokenizer, texts, "left"))
        alone = torch.cat([model(*_batch(tokenizer, [t])) for t in texts])
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, right, atol=1e-5, rtol=0)


def test_cross_attention_ignores_masked_positions():
    torch.manual_seed(0)
    attn = r2m.PolicyFeedbackAttention(d_rm=12, d_policy=20, d_attn=8)
    rte, h = torch.randn(3, 12), torch.randn(3, 5, 20)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    base = attn(rte, h, mask)
    # extra padded positions (any values, masked) on either side change nothing
    junk = 1e3 * torch.randn(3, 4, 20)
    padded_h = torch.cat([junk[:, :2], h, junk[:, 2:]], dim=1)
    padded_mask = torch.cat([torch.zeros(3, 2, dtype=torch.bool), mask, torch.zeros(3, 2, dtype=torch.bool)], 1)
    torch.testing.assert_close(attn(rte, padded_h, padded_mask), base, atol=1e-6, rtol=0)
    # hand computation of Eq. 3 for row 1
    q = rte[1] @ attn.W_q.weight.T
    k = h[1, :3] @ attn.W_k.weight.T
    v = h[1, :3] @ attn.W_v.weight.T
    expected = torch.softmax(k @ q / 8**0.5, dim=0) @ v @ attn.W_o.weight.T
    torch.testing.assert_close(base[1], expected, atol=1e-5, rtol=0)


def test_hook_captures_last_hidden_state_without_extra_forward(tokenizer):
    for arch in ("gptneox", "llama"):
        policy = tiny.build_policy(tokenizer, arch=arch).eval()
        ids, mask = _batch(tokenizer, ["hello there", "a longer prompt here"], "left")
        calls = []
        counter = policy.register_forward_hook(lambda *a: calls.append(1))
        with torch.no_grad(), r2m.HiddenStateCapture(policy) as cap:
            out = policy(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        counter.remove()
        assert len(calls) == 1
        assert torch.equal(cap.hidden, out.hidden_states[-1])
        assert cap.hidden.shape == (2, ids.shape[1], policy.config.hidden_size)
        # the hook is removed on exit
        with torch.no_grad():
            policy(input_ids=ids)
        assert len(policy.get_output_embeddings()._forward_hooks) == 0
        # the evaluation-time helper: the last hidden states of a forward numbered as generate() numbers
        # left-padded rows, minus the last position, with the matching mask
        with torch.no_grad():
            numbered = policy(input_ids=ids, attention_mask=mask, position_ids=r2m.position_ids_from_mask(mask),
                              output_hidden_states=True)
        h, h_mask = r2m.policy_hidden_states(policy, ids, mask)
        assert torch.equal(h, numbered.hidden_states[-1][:, :-1])
        assert torch.equal(h_mask, r2m.hidden_state_mask(mask))


def test_logprobs_are_those_of_the_sampling_distribution(tokenizer):
    """Old log-probs must be the temperature-scaled distribution that generate() sampled from."""
    from transformers import GenerationConfig

    policy = tiny.build_policy(tokenizer).eval()
    ids, mask = _batch(tokenizer, ["hi", "a longer prompt here"], "left")
    gc = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=5,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = policy.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        full_mask = torch.cat([mask, torch.ones(2, out.sequences.shape[1] - ids.shape[1], dtype=torch.long)], 1)
        ours = r2m.sequence_logprobs(policy, out.sequences, full_mask, ids.shape[1], 0.7)
    scores = torch.stack(out.scores, 1).log_softmax(-1)  # (B, R, V), already divided by the temperature
    theirs = scores.gather(-1, out.sequences[:, ids.shape[1]:, None]).squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_truncate_after_eos_and_hidden_mask():
    resp = torch.tensor([[5, 6, 1, 7, 8], [5, 6, 7, 8, 9], [1, 3, 3, 3, 3]])
    out, mask = r2m.truncate_after_eos(resp, eos_id=1, pad_id=0)
    assert out.tolist() == [[5, 6, 1, 0, 0], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    am = torch.tensor([[0, 1, 1, 1, 0]])
    assert r2m.hidden_state_mask(am).tolist() == [[False, True, True, False]]


def test_gaussian_noise_matches_moments():
    torch.manual_seed(0)
    h = 3.0 + 2.0 * torch.randn(2, 4000, 3)
    mask = torch.ones(2, 4000, dtype=torch.bool)
    noise = baselines.gaussian_like(h, mask)
    assert not torch.allclose(noise, h)
    torch.testing.assert_close(noise.mean(1), h.mean(1), atol=0.15, rtol=0)
    torch.testing.assert_close(noise.std(1), h.std(1), atol=0.15, rtol=0)
