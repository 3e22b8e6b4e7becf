"""R2M on TL;DR summarisation with Pythia-2.8B, on one GPU or several (the paper's first task, SPEC §5).

    python train_tldr.py                                  # paper settings: RLOO + R2M, 122 steps of 2048 x 4
    python train_tldr.py --algo grpo --reward vanilla     # a baseline
    python train_tldr.py --preset tiny                    # offline, CPU, tiny random models, < 2 minutes
    torchrun --nproc_per_node 8 train_tldr.py             # the same run on 8 GPUs (README "More than one GPU")

Everything algorithmic lives in r2m.py; this file loads data and models and calls `r2m.train`.
Defaults: policy trl-lib/pythia-2.8b-deduped-tldr-sft, RM trl-lib/pythia-2.8b-deduped-tldr-rm
(safetensors mirrors of the cleanrl Pythia TL;DR SFT / RM checkpoints), prompts from trl-lib/tldr.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import r2m
import runner
import tiny


@dataclass
class TLDRArgs(runner.RunOptions):  # + --config, --report_to, --lora_* (runner.RunOptions)
    preset: str = field(default="paper", metadata={"help": "'paper' (SPEC §5 settings) or 'tiny' (offline CPU smoke run)."})
    policy_model: str = field(
        default="trl-lib/pythia-2.8b-deduped-tldr-sft", metadata={"help": "SFT policy: hub name or local folder."}
    )
    reward_model: str = field(
        default="trl-lib/pythia-2.8b-deduped-tldr-rm", metadata={"help": "Scalar reward model: hub name or local folder."}
    )
    dataset: str = field(default="trl-lib/tldr", metadata={"help": "Prompts: hub data set or a local .jsonl file."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub data set."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt (ends in 'TL;DR:')."})
    max_prompt_tokens: int = field(default=512, metadata={"help": "Cap on prompt length; the post is cut, never 'TL;DR:'."})


PRESETS = {
    "paper": {},
    # Same code path, fully offline: tiny random GPT-NeoX policy and RM, a tokenizer built in code and the
    # shipped synthetic prompt file. Learning rates are large because the models are tiny and random.
    "tiny": dict(
        dataset=tiny.TLDR_TINY, queries_per_step=8, group_size=4, total_trajectories=8 * 4 * 16, max_new_tokens=4,
        policy_lr=1e-2, rm_lr=1e-3, d_attn=32, policy_minibatch_size=16, micro_batch_size=8, forward_batch_size=32,
        generation_batch_size=32, rm_minibatch_groups=4, save_every=4, sample_every=4, device="cpu",
        output_dir="runs/tiny_tldr", max_prompt_tokens=128,
        brme_preference_file=tiny.PREFERENCES_TINY, brme_epochs=10, brme_lr=3e-2,
        pretrain_rm_preference_file=tiny.PREFERENCES_TINY, pretrain_rm_epochs=2, pretrain_rm_lr=1e-3,
    ),
}


TLDR_SUFFIX = "TL;DR:"


def tokenize_prompt(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Prompt ids of at most max_tokens. A long post is truncated; the final 'TL;DR:' cue never is, because
    the policy was trained to write its summary right after it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return ids
    cut = text.rfind(TLDR_SUFFIX)
    head, tail = (text[:cut], text[cut:]) if cut >= 0 else (text, "")
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"][: max(0, max_tokens - len(tail_ids))]
    return head_ids + tail_ids


def main(argv=None) -> list[dict]:
    cfg, args = runner.parse_flags(TLDRArgs, PRESETS, argv)
    rows = runner.load_rows(args.dataset, args.dataset_split, [args.prompt_column])
    if args.preset == "tiny":
        tokenizer = rm_tokenizer = tiny.build_tokenizer()
        policy, rm = tiny.build_policy(tokenizer, seed=cfg.seed), tiny.build_reward_model(tokenizer, seed=cfg.seed + 1)
        ref_policy = copy.deepcopy(policy)
    else:
        policy, ref_policy, rm, tokenizer, rm_tokenizer = runner.load_pretrained(
            args.policy_model, args.reward_model, cfg, reference=not args.lora_r)  # LoRA: π_ref is the policy itself
    texts = [str(row[args.prompt_column]) for row in rows]
    prompts = [tokenize_prompt(tokenizer, text, args.max_prompt_tokens) for text in texts]
    return runner.run(cfg, policy, ref_policy, rm, tokenizer, rm_tokenizer, prompts, texts, options=args)


if __name__ == "__main__":
    main()
