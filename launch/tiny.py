"""Offline building blocks for `--preset tiny` and the tests: a tokenizer built in code, tiny randomly
initialised models built from configs, and small synthetic data files in the real data sets' formats.

Nothing here downloads anything. The synthetic files under data/ are written by `python -m launch.tiny` (fixed
seed, so the committed files are reproducible); they imitate the *format* of trl-lib/tldr and
UltraFeedback, never their content.
"""

from __future__ import annotations

import json
import os
import random

import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
TLDR_TINY = os.path.join(DATA_DIR, "tldr_tiny.jsonl")  # prompts (+ reference summaries) for training
TLDR_TINY_TEST = os.path.join(DATA_DIR, "tldr_tiny_test.jsonl")  # held-out prompts + references, for eval
PREFERENCES_TINY = os.path.join(DATA_DIR, "preferences_tiny.jsonl")  # {prompt, chosen, rejected} pairs
ULTRAFEEDBACK_TINY = os.path.join(DATA_DIR, "ultrafeedback_tiny.jsonl")  # UltraFeedback-binarized format
ALPACA_EVAL_TINY = os.path.join(DATA_DIR, "alpaca_eval_tiny.json")  # AlpacaEval 2's alpaca_eval.json format
MT_BENCH_TINY = os.path.join(DATA_DIR, "mt_bench_tiny.jsonl")  # FastChat's MT-Bench question.jsonl format

SUBREDDITS = ["relationships", "AskReddit", "personalfinance", "cooking", "running", "jobs"]
NOUNS = ["roommate", "boss", "dog", "landlord", "sister", "car", "apartment", "garden", "bike", "friend",
         "budget", "recipe", "marathon", "interview", "neighbour", "laptop", "kitchen", "cat", "coworker", "rent"]
VERBS = ["borrowed", "broke", "forgot", "cooked", "sold", "painted", "ignored", "fixed", "lost", "found",
         "cancelled", "moved", "trained", "argued about", "cleaned"]
ADJECTIVES = ["angry", "late", "new", "old", "noisy", "quiet", "expensive", "tired", "happy", "weird"]

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _sentence(rng: random.Random) -> str:
    return (f"my {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"the {rng.choice(NOUNS)} {rng.choice(['yesterday', 'again', 'last week', 'today', 'twice'])}.")


def synthetic_tldr_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows in trl-lib/tldr's format: `prompt` ends in "TL;DR:", `completion` is a short summary."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        post = " ".join(_sentence(rng) for _ in range(rng.randint(2, 5)))
        title = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} problem"
        prompt = f"SUBREDDIT: r/{rng.choice(SUBREDDITS)}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
        completion = " " + _sentence(rng)
        rows.append({"prompt": prompt, "completion": completion})
    return rows


QUESTIONS = ["How do I fix my {n}?", "Can you suggest a plan for my {n}?", "Why is my {n} so {a}?",
             "What should I tell my {n}?", "Give me three tips about a {a} {n}."]


def synthetic_ultrafeedback_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows in UltraFeedback-binarized format: `prompt`, and `chosen` / `rejected` chats whose last message
    is the assistant's reply."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = rng.choice(QUESTIONS).format(n=rng.choice(NOUNS), a=rng.choice(ADJECTIVES))
        good = "Sure. " + " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
        bad = " ".join([rng.choice(NOUNS)] * rng.randint(3, 8))
        chat = lambda reply: [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]  # noqa
        rows.append({"prompt": prompt, "chosen": chat(good), "rejected": chat(bad)})
    return rows


def synthetic_preference_rows(n: int, seed: int = 0, contradictory: float = 0.0) -> list[dict]:
    """TL;DR-style preference pairs {prompt, chosen, rejected, kind}.

    'consistent' pairs: a well-formed summary is always preferred over a repeated-word one.
    'contradictory' pairs (a fraction `contradictory`): two shouted (upper-case) summaries with a coin-flip
    label, so the same kind of pair is labelled both ways: a good uncertainty model is unsure there."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = synthetic_tldr_rows(1, seed=rng.randrange(10**9))[0]["prompt"]
        if rng.random() < contradictory:
            a, b = " " + _sentence(rng).upper(), " " + _sentence(rng).upper()
            rows.append({"prompt": prompt, "chosen": a, "rejected": b, "kind": "contradictory"})
        else:
            spam = " " + " ".join([rng.choice(NOUNS)] * rng.randint(3, 8))
            rows.append({"prompt": prompt, "chosen": " " + _sentence(rng), "rejected": spam, "kind": "consistent"})
    return rows


def synthetic_alpaca_eval_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows in the format of AlpacaEval 2's alpaca_eval.json: instruction, output (the reference model's answer),
    generator (that model's name), dataset (the instruction's source)."""
    rows = synthetic_ultrafeedback_rows(n, seed)
    return [{"instruction": r["prompt"], "output": r["chosen"][-1]["content"], "generator": "tiny_reference",
             "dataset": ["helpful_base", "oasst", "koala"][i % 3]} for i, r in enumerate(rows)]


def synthetic_mt_bench_questions() -> list[dict]:
    """Questions in the format of FastChat's MT-Bench question.jsonl: question_id, category, two turns, and a
    reference answer per turn for the categories graded against one (math, reasoning, coding)."""
    return [
        {"question_id": 81, "category": "writing", "turns": ["Write a short note to my landlord about the rent.",
                                                               "Now make it more polite."]},
        {"question_id": 111, "category": "math", "turns": ["What is 3 + 4?", "And 3 times 4?"],
         "reference": ["7", "12"]},
        {"question_id": 91, "category": "roleplay", "turns": ["Pretend to be my dog and tell me about your day.",
                                                                "What did you think of the cat?"]},
    ]


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _corpus() -> list[str]:
    rows = synthetic_tldr_rows(400, seed=1234)
    texts = [r["prompt"] + r["completion"] for r in rows]
    texts += [r["chosen"][-1]["content"] + r["prompt"] for r in synthetic_ultrafeedback_rows(200, seed=99)]
    texts += [r["chosen"] for r in synthetic_preference_rows(100, seed=98, contradictory=0.5)]
    texts += ["Preferred: A", "Preferred: B", "Which summary is better? Summary A: Summary B:",
              "### User: ### Assistant:"]
    return texts


RM_CHAT_TEMPLATE = (  # a second, different chat format, for a reward model that is not the policy's family
    "{% for m in messages %}### {{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}{{ eos_token }}"
)


def build_tokenizer(vocab_size: int = 512, chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained in code on the synthetic corpus (deterministic, ~0.1 s).
    Byte-level, so any text round-trips through encode/decode, like GPT-NeoX's and Llama-3's tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN, "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    fast.chat_template = chat_template
    return fast


def gptneox_config(tokenizer, hidden_size: int = 64, layers: int = 2, num_labels: int = 1):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=2 * hidden_size, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, num_labels=num_labels,
        hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False,
    )


def llama_config(tokenizer, hidden_size: int = 48, layers: int = 2, num_labels: int = 1):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden_size,
        max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, num_labels=num_labels,
    )


def build_policy(tokenizer, seed: int = 0, hidden_size: int = 64, arch: str = "gptneox"):
    """A tiny randomly initialised causal LM (GPT-NeoX, as Pythia; or Llama-style)."""
    from transformers import GPTNeoXForCausalLM, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(llama_config(tokenizer, hidden_size))
    return GPTNeoXForCausalLM(gptneox_config(tokenizer, hidden_size))


def build_reward_model(tokenizer, seed: int = 1, hidden_size: int = 48, arch: str = "gptneox"):
    """A tiny randomly initialised scalar reward model (*ForSequenceClassification, one label)."""
    from transformers import GPTNeoXForSequenceClassification, LlamaForSequenceClassification

    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForSequenceClassification(llama_config(tokenizer, hidden_size))
    else:
        model = GPTNeoXForSequenceClassification(gptneox_config(tokenizer, hidden_size))
    # A random score head of PyTorch's default init gives rewards of ~0.1 spread; scale it so the tiny runs
    # have a reward signal of order 1 to learn from.
    with torch.no_grad():
        model.score.weight.mul_(10.0)
    return model


def loop_config(**overrides):
    """An `r2m.R2MConfig` for a tiny loop on CPU (8 prompts x 4 per step, 2 steps, short responses, no
    checkpoints, no samples printed), with `overrides` (output_dir among them) on top: the tests' common
    starting point."""
    import r2m

    base = dict(
        queries_per_step=8, group_size=4, total_trajectories=8 * 4 * 2, max_new_tokens=8, policy_lr=1e-3,
        rm_lr=1e-2, d_attn=16, policy_minibatch_size=16, micro_batch_size=8, forward_batch_size=16,
        generation_batch_size=32, rm_minibatch_groups=4, device="cpu", save_every=0, sample_every=0,
    )
    return r2m.R2MConfig(**{**base, **overrides})


def save_models(directory: str, seed: int = 0) -> dict[str, str]:
    """Write the tiny policy, reward model and a tiny judge LM as Hugging Face folders (with the tokenizer),
    so tools that load by path (eval_judge.py) can be run offline end to end."""
    tokenizer = build_tokenizer()
    paths = {}
    for name, model in [("policy", build_policy(tokenizer, seed=seed)),
                        ("reward_model", build_reward_model(tokenizer, seed=seed + 1)),
                        ("judge", build_policy(tokenizer, seed=seed + 2))]:
        paths[name] = os.path.join(directory, name)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


# ----------------------------------------------------------------------------------------------------
# The quick start's world: a tiny "SFT" policy and a tiny trained RM, built once and shipped in data/tiny_models/
# ----------------------------------------------------------------------------------------------------

# The tiny RM's taste: summaries (and chat replies) of the form "my ADJ NOUN VERB the NOUN WHEN." are better the
# earlier their adjective comes in this list. The SFT policy writes every adjective alike, so RL has something to
# learn that costs the policy little KL: which adjective to write.
TASTE = ["happy", "quiet", "new", "tired", "old", "late", "noisy", "expensive", "weird", "angry"]
TINY_MODELS = os.path.join(DATA_DIR, "tiny_models")
TINY_MODEL_FOLDERS = {name: os.path.join(TINY_MODELS, name)
                      for name in ("tldr_policy", "tldr_reward_model", "chat_policy", "chat_reward_model")}


def _with_adjective(sentence: str, adjective: str) -> str:
    words = sentence.split(" ")
    return " ".join(words[:1] + [adjective] + words[2:])  # "my ADJ ..."


def _fine_tune(model, batches, steps: int, lr: float, loss_fn) -> None:
    """A few hundred AdamW steps on CPU (the models are tiny): batches() -> one batch; loss_fn(model, batch)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = loss_fn(model, batches())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _sft_loss(model, batch):
    ids, mask, prompt_lengths = batch
    labels = ids.masked_fill(mask == 0, -100)
    for i, length in enumerate(prompt_lengths):
        labels[i, :length] = -100  # learn the response, not the prompt
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _bt_loss(model, batch):
    (chosen, chosen_mask), (rejected, rejected_mask) = batch
    r_w = model(input_ids=chosen, attention_mask=chosen_mask).logits[:, 0]
    r_l = model(input_ids=rejected, attention_mask=rejected_mask).logits[:, 0]
    return -torch.nn.functional.logsigmoid(r_w - r_l).mean()


def _reward_scale(rm, factor: float) -> None:
    """Scale a trained RM's rewards (its score head): trained from the x10 init of build_reward_model they span about
    ±12; as real RMs' they should be of order 1, so that β·KL is not negligible beside the advantages."""
    with torch.no_grad():
        rm.score.weight.mul_(factor)
        if rm.score.bias is not None:
            rm.score.bias.mul_(factor)


def build_tiny_world(seed: int = 0) -> dict[str, object]:
    """The four models of the tiny presets, trained from scratch on synthetic rows (about a minute on a CPU):
    TL;DR: a GPT-NeoX policy fine-tuned on posts -> one-sentence summaries, and a GPT-NeoX RM (another width, the same
    tokenizer) trained with Bradley-Terry on pairs that differ in the adjective only (TASTE); dialogue: the same with
    a Llama-style chat policy and a Llama-style RM of another tokenizer and chat format. -> {folder name: model}."""
    from plumbing.data import chat_prompt_ids, chat_render, pad_right

    rng = random.Random(seed)
    tokenizer, rm_tokenizer = build_tokenizer(), build_tokenizer(vocab_size=400, chat_template=RM_CHAT_TEMPLATE)
    eos = tokenizer.eos_token_id
    render = chat_render(rm_tokenizer)

    def sft_batches(prompt_ids, reply):
        def batch():
            rows = [(p, tokenizer(" " + reply(rng) if not c else reply(rng), add_special_tokens=False)["input_ids"] + [eos])
                    for p, c in (rng.choice(prompt_ids) for _ in range(32))]
            ids, mask = pad_right([p + r for p, r in rows], tokenizer.pad_token_id)
            return ids, mask, [len(p) for p, _ in rows]
        return batch

    def pair_batches(encode):
        def batch():
            pairs = []
            for _ in range(32):
                better, worse = sorted(rng.sample(range(len(TASTE)), 2))
                sentence, cut = _sentence(rng), rng.randint(2, 9)  # fragments too: RL scores unfinished responses
                pairs.append(tuple(encode(_with_adjective(sentence, TASTE[i]), cut) for i in (better, worse)))
            return tuple(pad_right([pair[k] for pair in pairs], 0) for k in (0, 1))
        return batch

    models = {}
    posts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in synthetic_tldr_rows(512, seed=seed + 1)]
    torch.manual_seed(seed)
    models["tldr_policy"] = build_policy(tokenizer, seed=seed)
    _fine_tune(models["tldr_policy"], sft_batches([(p, False) for p in posts], _sentence), 400, 3e-3, _sft_loss)

    def tldr_view(reply: str, cut: int) -> list[int]:  # the RM reads the policy's tokens: prompt + response [+ EOS]
        words = tokenizer(" " + reply, add_special_tokens=False)["input_ids"]
        return rng.choice(posts) + words[:cut] + ([eos] if cut >= len(words) else [])

    models["tldr_reward_model"] = build_reward_model(tokenizer, seed=seed + 1)
    _fine_tune(models["tldr_reward_model"], pair_batches(tldr_view), 300, 1e-3, _bt_loss)
    _reward_scale(models["tldr_reward_model"], 0.1)
    questions = [r["prompt"] for r in synthetic_ultrafeedback_rows(256, seed=seed + 2)]
    chats = [chat_prompt_ids(tokenizer, q) for q in questions]
    models["chat_policy"] = build_policy(tokenizer, seed=seed, hidden_size=64, arch="llama")
    _fine_tune(models["chat_policy"], sft_batches([(c, True) for c in chats], lambda r: "Sure. " + _sentence(r)), 400, 3e-3,
               _sft_loss)

    def chat_view(reply: str, cut: int) -> list[int]:  # the RM reads the raw prompt and the reply in its own template
        words = ("Sure. " + reply).split(" ")
        text = " ".join(words[: cut + 1])
        return rm_tokenizer(render(rng.choice(questions), text), add_special_tokens=False)["input_ids"]

    models["chat_reward_model"] = build_reward_model(rm_tokenizer, seed=seed + 1, hidden_size=48, arch="llama")
    _fine_tune(models["chat_reward_model"], pair_batches(chat_view), 300, 1e-3, _bt_loss)
    _reward_scale(models["chat_reward_model"], 0.1)
    return {"models": models, "tokenizers": {"tldr_policy": tokenizer, "tldr_reward_model": tokenizer,
                                             "chat_policy": tokenizer, "chat_reward_model": rm_tokenizer}}


def save_tiny_world(folder: str = TINY_MODELS, seed: int = 0) -> None:
    world = build_tiny_world(seed)
    for name, model in world["models"].items():
        model.save_pretrained(os.path.join(folder, name))
        world["tokenizers"][name].save_pretrained(os.path.join(folder, name))
        print(f"wrote {os.path.join(folder, name)}")


def main() -> None:
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--save-models":
        for name, path in save_models(sys.argv[2]).items():
            print(f"wrote tiny {name} to {path}")
        return
    if sys.argv[1:] == ["--build-world"]:  # the tiny presets' trained models (data/tiny_models/)
        save_tiny_world()
        return
    files = {
        TLDR_TINY: synthetic_tldr_rows(64, seed=0),
        TLDR_TINY_TEST: synthetic_tldr_rows(24, seed=7),
        PREFERENCES_TINY: synthetic_preference_rows(256, seed=1),
        ULTRAFEEDBACK_TINY: synthetic_ultrafeedback_rows(64, seed=2),
    }
    files[MT_BENCH_TINY] = synthetic_mt_bench_questions()
    for path, rows in files.items():
        write_jsonl(path, rows)
        print(f"wrote {path} ({len(rows)} rows)")
    with open(ALPACA_EVAL_TINY, "w") as f:  # AlpacaEval's files are one JSON list, not JSON lines
        json.dump(synthetic_alpaca_eval_rows(6, seed=5), f, indent=1)
    print(f"wrote {ALPACA_EVAL_TINY} (6 rows)")


if __name__ == "__main__":
    main()
