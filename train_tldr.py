"""R2M on TL;DR summarisation with Pythia-2.8B, on one GPU or several (the paper's first task, §5).

    python train_tldr.py                                  # paper settings: RLOO + R2M, 122 steps of 2048 x 4
    python train_tldr.py --algo grpo --reward vanilla     # a baseline
    python train_tldr.py --preset tiny                    # offline, CPU, the shipped tiny models (README)
    torchrun --nproc_per_node 8 train_tldr.py             # the same run on 8 GPUs (docs/scale.md)

Everything algorithmic lives in r2m.py; this file loads data and models and calls `r2m.train` (through
launch/runner.py). Its flags and presets (`TLDRArgs`, `TLDR_PRESETS`) are in launch/flags.py.
Defaults: policy trl-lib/pythia-2.8b-deduped-tldr-sft, RM trl-lib/pythia-2.8b-deduped-tldr-rm
(safetensors mirrors of the cleanrl Pythia TL;DR SFT / RM checkpoints), prompts from trl-lib/tldr.
"""

from __future__ import annotations

import os

# A run grows and frees the generation cache every step at a new prompt length: expandable segments keep the CUDA
# allocator from fragmenting over 122 steps. Set before CUDA starts; a user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from launch import runner  # noqa: E402
from launch.flags import TLDR_PRESETS, TLDRArgs, parse_flags  # noqa: E402  (this script's flags and presets)
from plumbing import data  # noqa: E402


def main(argv=None) -> list[dict]:
    cfg, args = parse_flags(TLDRArgs, TLDR_PRESETS, argv)
    rows = data.load_rows(args.dataset, args.dataset_split, [args.prompt_column])
    policy, ref_policy, rm, tokenizer, rm_tokenizer = runner.load_pretrained(
        args.policy_model, args.reward_model, cfg, reference=not args.lora_r)  # LoRA: π_ref is the policy itself
    texts = [str(row[args.prompt_column]) for row in rows]
    prompts = [data.tokenize_prompt(tokenizer, text, args.max_prompt_tokens) for text in texts]  # never cut "TL;DR:"
    return runner.run(cfg, policy, ref_policy, rm, tokenizer, rm_tokenizer, prompts, texts, options=args, task="tldr")


if __name__ == "__main__":
    main()
