"""R2M on dialogue: UltraFeedback prompts, a chat policy and the Skywork reward model (SPEC §5, second task).

    python train_ultrafeedback.py                          # LLaMA3-8B-Instruct policy (lr 1e-6, Ω = 0.6)
    python train_ultrafeedback.py --preset qwen            # Qwen2.5-3B-Instruct policy (lr 6e-6, Ω = 0.7)
    python train_ultrafeedback.py --reward brme --brme_preference_file prefs.jsonl
    python train_ultrafeedback.py --preset tiny            # offline, CPU, tiny chat models, < 2 minutes
    torchrun --nproc_per_node 8 train_ultrafeedback.py     # the 8B preset on 8 GPUs (README "More than one GPU")

The policy reads each prompt through its own chat template; the RM (Skywork-Reward-V2-Llama-3.1-8B) reads the
raw prompt and the decoded response through *its* chat template and tokenizer. Policy and RM differ in
tokenizer and hidden size: R2M's cross-attention is what bridges them. All training logic is r2m.py's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import r2m
import runner
import tiny


@dataclass
class UltraFeedbackArgs(runner.RunOptions):  # + --config, --report_to, --lora_* (runner.RunOptions)
    preset: str = field(default="paper", metadata={"help": "'paper' (LLaMA3-8B-Instruct), 'qwen' (Qwen2.5-3B-Instruct) or 'tiny'."})
    policy_model: str = field(default="meta-llama/Meta-Llama-3-8B-Instruct", metadata={"help": "Chat policy: hub name or folder."})
    reward_model: str = field(default="Skywork/Skywork-Reward-V2-Llama-3.1-8B", metadata={"help": "Scalar chat RM: hub name or folder."})
    dataset: str = field(default="HuggingFaceH4/ultrafeedback_binarized", metadata={"help": "UltraFeedback: hub data set or local .jsonl."})
    dataset_split: str = field(default="train_prefs", metadata={"help": "Split of a hub data set."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the user prompt (text)."})
    chosen_column: str = field(default="chosen", metadata={"help": "Column holding the chosen reply (chat or text)."})
    max_chosen_tokens: int = field(default=512, metadata={"help": "Drop rows whose chosen reply is longer (policy tokens)."})
    max_prompt_tokens: int = field(default=1024, metadata={"help": "Drop rows whose templated prompt is longer."})


# Choice: 512 trajectories per step in minibatches of 128 (4 optimiser steps per epoch); the paper gives
# the step size, not the minibatch.
PAPER = dict(queries_per_step=64, group_size=8, total_trajectories=51_200, max_new_tokens=512, temperature=0.7,
             policy_epochs=2, policy_lr=1e-6, omega_floor=0.6, rm_lr=1e-6, policy_minibatch_size=128,
             micro_batch_size=4, forward_batch_size=8, generation_batch_size=64, output_dir="runs/r2m_ultrafeedback")
PRESETS = {
    "paper": PAPER,
    # Choice: micro-batches of 1 on the 3B policy. The memory plan predicts a 72.3 GiB peak with the paper preset's 4
    # (7.7 GiB spare on 80 GB, under the 10 GiB margin), 69.3 GiB with 1; the updates are the same.
    "qwen": {**PAPER, "policy_model": "Qwen/Qwen2.5-3B-Instruct", "policy_lr": 6e-6, "omega_floor": 0.7, "micro_batch_size": 1},
    "tiny": dict(
        dataset=tiny.ULTRAFEEDBACK_TINY, dataset_split="train", queries_per_step=8, group_size=4,
        total_trajectories=8 * 4 * 16, max_new_tokens=4, policy_lr=1e-2, rm_lr=1e-3, d_attn=32,
        policy_minibatch_size=16, micro_batch_size=8, forward_batch_size=32, generation_batch_size=32,
        rm_minibatch_groups=4, save_every=4, sample_every=4, device="cpu", output_dir="runs/tiny_ultrafeedback",
        max_chosen_tokens=64, max_prompt_tokens=128, brme_preference_file=tiny.ULTRAFEEDBACK_TINY,
        brme_epochs=10, brme_lr=3e-2,
        pretrain_rm_preference_file=tiny.ULTRAFEEDBACK_TINY, pretrain_rm_epochs=2, pretrain_rm_lr=1e-3,
    ),
}


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The policy's input: the user turn in the policy's own chat template, ready for the assistant reply."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already holds any BOS


def main(argv=None) -> list[dict]:
    cfg, args = runner.parse_flags(UltraFeedbackArgs, PRESETS, argv)
    rows = runner.load_rows(args.dataset, args.dataset_split, [args.prompt_column, args.chosen_column])
    if args.preset == "tiny":
        # Two different chat formats and tokenizers, and two widths, as with LLaMA3 / Qwen vs Skywork.
        tokenizer = tiny.build_tokenizer()
        rm_tokenizer = tiny.build_tokenizer(vocab_size=400, chat_template=tiny.RM_CHAT_TEMPLATE)
        policy = tiny.build_policy(tokenizer, seed=cfg.seed, hidden_size=64, arch="llama")
        ref_policy = copy.deepcopy(policy)
        rm = tiny.build_reward_model(rm_tokenizer, seed=cfg.seed + 1, hidden_size=48, arch="llama")
    else:
        policy, ref_policy, rm, tokenizer, rm_tokenizer = runner.load_pretrained(
            args.policy_model, args.reward_model, cfg, reference=not args.lora_r)  # LoRA: π_ref is the policy itself
    texts, prompts = [], []
    for row in rows:
        chosen = tokenizer(runner.response_text(row[args.chosen_column]), add_special_tokens=False)["input_ids"]
        ids = chat_prompt_ids(tokenizer, str(row[args.prompt_column]))
        # SPEC §5 drops rows whose chosen reply is long; Choice: also those whose templated prompt is long
        if len(chosen) <= args.max_chosen_tokens and len(ids) <= args.max_prompt_tokens:
            texts.append(str(row[args.prompt_column]))
            prompts.append(ids)
    print(f"{len(prompts)} of {len(rows)} prompts kept (chosen reply <= {args.max_chosen_tokens} tokens, "
          f"prompt <= {args.max_prompt_tokens} tokens)")
    return runner.run(cfg, policy, ref_policy, rm, tokenizer, rm_tokenizer, prompts, texts, render=runner.chat_render(rm_tokenizer),
                      options=args)


if __name__ == "__main__":
    main()
