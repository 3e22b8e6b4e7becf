"""Judge-based evaluation, as the R2M paper measures it (SPEC §5).

1. Generate (optional): a policy (hub name, or the `checkpoint/policy` folder a training run wrote) writes
   responses for the evaluation prompts -> responses.jsonl. Or pass --responses with ones already made.
2. Judge each response against its reference with one of three judges:
     api  any OpenAI-compatible chat-completions endpoint (key from an environment variable; standard library)
     hf   a local Hugging Face causal LM, comparing its probability of answering "A" vs "B"
     rm   a reward model scoring both (the vanilla RM, or an R2M reward model with policy feedback)
3. Report: win rate (ties count half), ties / unparseable / failed counted separately, 95% Wilson interval;
   judgments.jsonl (one line per example, appended as they arrive) and summary.json.
Plus --mode rm_accuracy: on a preference file, the fraction with r(chosen) > r(rejected), for the vanilla RM
and for the R2M reward model with feedback from a policy (ω at t = T).

    python eval_judge.py --policy runs/r2m/checkpoint/policy --judge api --api_model gpt-4o
    python eval_judge.py --task ultrafeedback --policy runs/r2m_ultrafeedback/checkpoint/policy --judge hf --judge_model Qwen/Qwen2.5-7B-Instruct
    python eval_judge.py --mode rm_accuracy --preference_file prefs.jsonl --judge_model trl-lib/pythia-2.8b-deduped-tldr-rm --r2m_checkpoint runs/r2m/checkpoint

Re-running with the same --output_dir skips every example already judged by the same judge (failed ones are
tried again), so an interrupted run resumes at no extra cost.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

import r2m
import runner

# ----------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------


@dataclass
class EvalArgs:
    mode: str = field(default="judge", metadata={"help": "'judge' (win rate vs references) or 'rm_accuracy'."})
    task: str = field(default="tldr", metadata={"help": "'tldr' (summaries) or 'ultrafeedback' (dialogue)."})
    output_dir: str = field(default="runs/eval", metadata={"help": "Where responses, judgments and summary go."})
    # --- 1. generation ---------------------------------------------------------------------------------
    policy: Optional[str] = field(default=None, metadata={"help": "Policy to generate with (hub name or folder); omit to use --responses."})
    responses: Optional[str] = field(default=None, metadata={"help": "Existing responses (.jsonl: id, prompt, response[, reference])."})
    dataset: Optional[str] = field(default=None, metadata={"help": "Evaluation prompts: hub data set or .jsonl (default per task)."})
    dataset_split: Optional[str] = field(default=None, metadata={"help": "Split (default: 'test' for tldr, 'test_prefs' for ultrafeedback)."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    reference_column: Optional[str] = field(default=None, metadata={"help": "Column holding the reference (default: 'completion' / 'chosen')."})
    references: Optional[str] = field(default=None, metadata={"help": "Separate reference file: .jsonl (id, reference) or alpaca_eval JSON (instruction, output)."})
    limit: Optional[int] = field(default=None, metadata={"help": "Evaluate only the first N prompts."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature for generation; 0 = greedy."})
    max_new_tokens: int = field(default=53, metadata={"help": "Longest generated response."})
    max_prompt_tokens: int = field(default=512, metadata={"help": "Prompt cap (TL;DR keeps its 'TL;DR:' suffix)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts generated / scored at once."})
    generator_name: Optional[str] = field(default=None, metadata={"help": "Name written as alpaca_eval's 'generator' (default: the policy)."})
    # --- 2. judging ------------------------------------------------------------------------------------
    judge: str = field(default="api", metadata={"help": "'api', 'hf' or 'rm'."})
    judge_model: Optional[str] = field(default=None, metadata={"help": "hf: judge LM; rm / rm_accuracy: the reward model (hub name or folder)."})
    api_base_url: str = field(default="https://api.openai.com/v1", metadata={"help": "OpenAI-compatible base URL (…/v1)."})
    api_model: str = field(default="gpt-4o", metadata={"help": "Model name sent to the API."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the API key (never printed or written)."})
    api_timeout: float = field(default=60.0, metadata={"help": "Seconds before an API call counts as timed out."})
    max_retries: int = field(default=5, metadata={"help": "Retries per example on HTTP 429/5xx or timeout; then it is recorded as failed."})
    retry_backoff: float = field(default=2.0, metadata={"help": "First retry delay in seconds; doubles each retry."})
    r2m_checkpoint: Optional[str] = field(default=None, metadata={"help": "rm judge / rm_accuracy: a training checkpoint/ folder; adds the R2M head with feedback from its policy."})
    preference_file: Optional[str] = field(default=None, metadata={"help": "rm_accuracy: .jsonl with prompt, chosen, rejected."})
    seed: int = field(default=0, metadata={"help": "Seed of the per-example A/B order (and of sampling)."})
    device: str = field(default="auto", metadata={"help": "'auto', 'cuda' or 'cpu'."})


TASK_DEFAULTS = {
    "tldr": {"dataset": "trl-lib/tldr", "dataset_split": "test", "reference_column": "completion"},
    "ultrafeedback": {"dataset": "HuggingFaceH4/ultrafeedback_binarized", "dataset_split": "test_prefs",
                      "reference_column": "chosen"},
}

# ----------------------------------------------------------------------------------------------------
# Judge prompts (our own wording of the DPO paper's TL;DR comparison prompt) and verdict parsing
# ----------------------------------------------------------------------------------------------------

TLDR_JUDGE_PROMPT = """You are comparing two summaries of the same forum post.

Post:
{prompt}

Summary A:
{a}

Summary B:
{b}

Which summary states the post's important points more precisely and more concisely, leaving out what does not
matter? Give one sentence of comparison first. Then, on its own last line, write "Preferred:" followed by A or B.

Comparison:"""

DIALOGUE_JUDGE_PROMPT = """You are comparing two assistant replies to the same user message.

User message:
{prompt}

Reply A:
{a}

Reply B:
{b}

Which reply is more helpful, correct and harmless for the user? Give one sentence of comparison first. Then, on
its own last line, write "Preferred:" followed by A or B.

Comparison:"""

VERDICT = re.compile(r"preferred\s*:\s*[\*\"'`\[\(]*\s*([AB])\b", re.IGNORECASE)


def parse_verdict(text: str) -> Optional[str]:
    """'A', 'B' or None (unparseable). The last 'Preferred: X' wins, so a judge may reason before it."""
    found = VERDICT.findall(text or "")
    return found[-1].upper() if found else None


def policy_outcome(letter: Optional[str], policy_is_a: bool) -> str:
    """Un-flip the randomised order: 'win' / 'loss' for the policy, or 'unparseable'."""
    if letter is None:
        return "unparseable"
    return "win" if (letter == "A") == policy_is_a else "loss"


def policy_is_a(seed: int, example_id: str) -> bool:
    """Which side the policy's response is shown on: a fixed coin per (seed, example), whatever the order of
    evaluation or resumption."""
    return random.Random(f"{seed}:{example_id}").random() < 0.5


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (successes may be fractional: ties count half)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarise(records: list[dict]) -> dict:
    """Win rate over the decided examples (win, loss, tie). Choice: ties count half, as AlpacaEval does;
    unparseable and failed ones are counted apart and left out of the rate, never scored."""
    counts = {k: sum(r["verdict"] == k for r in records) for k in ("win", "loss", "tie", "unparseable", "failed")}
    judged = counts["win"] + counts["loss"] + counts["tie"]
    score = counts["win"] + 0.5 * counts["tie"]
    low, high = wilson_interval(score, judged)
    return {"win_rate": score / judged if judged else None, "ci95": [low, high], "judged": judged,
            "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"],
            "unparseable": counts["unparseable"], "failed": counts["failed"], "examples": len(records)}


# ----------------------------------------------------------------------------------------------------
# The three judges. Each maps (prompt, text A, text B) -> {"raw": ..., "letter": "A" | "B" | None | "tie"}.
# ----------------------------------------------------------------------------------------------------


class JudgeFailed(Exception):
    """Raised when an example could not be judged (retries used up); the run records it and goes on."""


class APIJudge:
    """OpenAI-compatible chat completions over urllib. The key is read from the environment at start-up, sent
    only in the Authorization header, and never printed, logged or written."""

    def __init__(self, args: EvalArgs, template: str):
        key = os.environ.get(args.api_key_env)
        if not key:
            raise SystemExit(f"error: the api judge needs an API key in the environment variable {args.api_key_env}")
        self._key, self.args, self.template = key, args, template
        self.name = f"api:{args.api_model}"

    def _post(self, body: dict) -> dict:
        request = urllib.request.Request(
            self.args.api_base_url.rstrip("/") + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"},
        )
        with urllib.request.urlopen(request, timeout=self.args.api_timeout) as response:
            return json.loads(response.read())

    def __call__(self, prompt: str, a: str, b: str) -> dict:
        body = {"model": self.args.api_model, "temperature": 0.0, "max_tokens": 256,
                "messages": [{"role": "user", "content": self.template.format(prompt=prompt, a=a, b=b)}]}
        delay, last_error = self.args.retry_backoff, ""
        for attempt in range(self.args.max_retries + 1):
            try:
                text = self._post(body)["choices"][0]["message"]["content"]
                return {"raw": text, "letter": parse_verdict(text)}
            except urllib.error.HTTPError as e:
                last_error = f"HTTP {e.code}"
                if e.code != 429 and e.code < 500:
                    break  # a 4xx other than 429 will not get better by waiting
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, ValueError) as e:
                last_error = f"malformed response: {type(e).__name__}"
            if attempt < self.args.max_retries:
                time.sleep(delay)
                delay *= 2
        raise JudgeFailed(last_error.replace(self._key, "***"))


class HFJudge:
    """A local causal LM as judge: after the prompt and 'Preferred:', which continuation is likelier, ' A' or
    ' B'? Each is scored as a whole (sum of its tokens' log-probs), so any tokenizer works."""

    def __init__(self, args: EvalArgs, template: str, device: torch.device):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(args.judge_model)
        self.model = AutoModelForCausalLM.from_pretrained(args.judge_model).to(device).eval()
        self.template, self.device, self.name = template, device, f"hf:{args.judge_model}"
        self.options = [self.tokenizer(x, add_special_tokens=False)["input_ids"] for x in (" A", " B")]

    @torch.no_grad()
    def __call__(self, prompt: str, a: str, b: str) -> dict:
        text = self.template.format(prompt=prompt, a=a, b=b) + " The two differ.\nPreferred:"
        context = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, mask = r2m.pad_right([context + option for option in self.options], r2m.pad_token_id(self.tokenizer))
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # (2, S, V); position s predicts token s+1
        scores = []
        for row, option in enumerate(self.options):
            positions = torch.arange(len(context) - 1, len(context) - 1 + len(option))
            scores.append(logprobs[row, positions, torch.tensor(option)].sum().item())
        lp_a, lp_b = scores
        letter = "tie" if lp_a == lp_b else ("A" if lp_a > lp_b else "B")
        return {"raw": f"log P(A)={lp_a:.4f} log P(B)={lp_b:.4f}", "letter": letter}


class RewardScorer:
    """Scores (prompt, response) with a reward model, optionally as R2M with feedback from a policy.

    With --r2m_checkpoint the R2M head (cross-attention + score head) comes from the checkpoint's state.pt and the
    policy from its policy/ folder; the policy reads the prompt and the response in its own tokens and its
    last-layer hidden states feed the cross-attention at ω(T) = Ω, the end of training."""

    def __init__(self, args: EvalArgs, device: torch.device):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        if not args.judge_model:
            raise SystemExit("error: --judge_model (the reward model) is required for the rm judge and rm_accuracy")
        self.device, self.args = device, args
        self.rm_tokenizer = AutoTokenizer.from_pretrained(args.judge_model)
        rm = AutoModelForSequenceClassification.from_pretrained(args.judge_model, num_labels=1).to(device).eval()
        render = runner.chat_render(self.rm_tokenizer) if args.task == "ultrafeedback" else None
        self.rm_view = r2m.make_rm_view(self.rm_tokenizer, render)
        self.policy = None
        if args.r2m_checkpoint:
            state = torch.load(os.path.join(args.r2m_checkpoint, "state.pt"), map_location="cpu", weights_only=False)
            if "policy_feedback" not in state["reward_model"]:
                raise SystemExit(f"error: {args.r2m_checkpoint} holds no R2M head (was it trained with --reward r2m?)")
            policy_dir = os.path.join(args.r2m_checkpoint, "policy")
            self.policy = AutoModelForCausalLM.from_pretrained(policy_dir).to(device).eval()
            self.policy_tokenizer = AutoTokenizer.from_pretrained(policy_dir)
            d_attn = state["config"]["d_attn"]
            self.omega = state["config"]["omega_floor"]  # ω(T) = max(½cos(π)+½, Ω) = Ω
            self.model = r2m.R2MRewardModel(rm, d_policy=self.policy.get_output_embeddings().in_features, d_attn=d_attn)
            self.model.load_trainable_state_dict(state["reward_model"])
        else:
            self.model = r2m.R2MRewardModel(rm, d_policy=1, d_attn=1)  # feedback path unused: the vanilla RM
        self.model.to(device).eval()
        self.name = ("r2m:" if self.policy is not None else "rm:") + args.judge_model

    @torch.no_grad()
    def _feedback(self, policy_prompts: list[list[int]], responses: list[str]):
        """The policy's last-layer states over its own tokens of prompt + response -> (h, h_mask)."""
        eos = self.policy_tokenizer.eos_token_id
        seqs = [p + self.policy_tokenizer(r, add_special_tokens=False)["input_ids"] + [eos]
                for p, r in zip(policy_prompts, responses)]
        ids, mask = r2m.pad_left(seqs, r2m.pad_token_id(self.policy_tokenizer))
        return r2m.policy_hidden_states(self.policy, ids.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], policy_prompts: Optional[list[list[int]]] = None) -> torch.Tensor:
        """(B,) rewards. Without `policy_prompts` (the prompts in the policy's tokens): the vanilla RM's own
        reward; with them (needs an R2M checkpoint): R2M's reward with the policy's feedback at ω(T)."""
        ids, mask = r2m.pad_right([self.rm_view(p, r) for p, r in zip(prompts, responses)],
                                  r2m.pad_token_id(self.rm_tokenizer))
        rte = self.model.reward_token_embedding(ids.to(self.device), mask.to(self.device))
        if policy_prompts is None:
            return self.model.rewards_from_embedding(rte).cpu()
        h, h_mask = self._feedback(policy_prompts, responses)
        return self.model.rewards_from_embedding(rte, h, h_mask, self.omega).cpu()


class RMJudge:
    """The reward model as judge: the higher-scored text is preferred (equal scores: a tie)."""

    def __init__(self, scorer: RewardScorer, policy_prompt: Callable[[str], list[int]]):
        self.scorer, self.policy_prompt, self.name = scorer, policy_prompt, scorer.name

    def __call__(self, prompt: str, a: str, b: str) -> dict:
        pp = [self.policy_prompt(prompt)] * 2 if self.scorer.policy is not None else None
        r_a, r_b = self.scorer.score([prompt, prompt], [a, b], pp).tolist()
        return {"raw": f"r(A)={r_a:.6f} r(B)={r_b:.6f}", "letter": "tie" if r_a == r_b else ("A" if r_a > r_b else "B")}


# ----------------------------------------------------------------------------------------------------
# Data: evaluation prompts and references, responses, checks before any judge call
# ----------------------------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise SystemExit(f"error: no such file: {path}")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise SystemExit(f"error: {path} line {n} is not valid JSON")
    return rows


def read_references(path: str) -> dict[str, str]:
    """id -> reference, from .jsonl rows {id, reference} or an alpaca_eval JSON list {instruction, output}
    (then keyed by the instruction text)."""
    if path.endswith(".json"):
        with open(path) as f:
            rows = json.load(f)
        key, value = "instruction", "output"
    else:
        rows = read_jsonl(path)
        key, value = "id", "reference"
    if not rows:
        raise SystemExit(f"error: reference file {path} is empty")
    if any(key not in r or value not in r for r in rows):
        raise SystemExit(f"error: every row of {path} needs '{key}' and '{value}'")
    return {str(r[key]): runner.response_text(r[value]) for r in rows}


def check_responses(rows: list[dict], source: str) -> None:
    if not rows:
        raise SystemExit(f"error: {source} holds no responses")
    for column in ("id", "prompt", "response"):
        if any(column not in r for r in rows):
            raise SystemExit(f"error: every row of {source} needs '{column}' (columns: id, prompt, response[, reference])")
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"error: {source} repeats ids")


def attach_references(rows: list[dict], references: Optional[dict[str, str]], source: str) -> None:
    """Give every response its reference; ids (or prompts, for alpaca_eval files) must all match."""
    if references is not None:
        by_prompt = not any(str(r["id"]) in references for r in rows)
        missing = [str(r["id"]) for r in rows if (r["prompt"] if by_prompt else str(r["id"])) not in references]
        if missing:
            raise SystemExit(f"error: {len(missing)} responses have no matching reference (first ids: {missing[:5]})")
        for r in rows:
            r["reference"] = references[r["prompt"] if by_prompt else str(r["id"])]
    if any(not r.get("reference") for r in rows):
        raise SystemExit(f"error: {source} has responses without a reference; pass --references")


# ----------------------------------------------------------------------------------------------------
# 1. Generation
# ----------------------------------------------------------------------------------------------------


def policy_prompt_fn(task: str, tokenizer, max_prompt_tokens: int) -> Callable[[str], list[int]]:
    """How the policy reads a prompt: TL;DR as in train_tldr.py, dialogue through its chat template."""
    if task == "tldr":
        from train_tldr import tokenize_prompt

        return lambda text: tokenize_prompt(tokenizer, text, max_prompt_tokens)
    from train_ultrafeedback import chat_prompt_ids

    return lambda text: chat_prompt_ids(tokenizer, text)


@torch.no_grad()
def generate(args: EvalArgs, rows: list[dict], device: torch.device, path: str) -> list[dict]:
    """Generate a response per row (batched, progress bar) and write them to `path` as they are made."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.policy)
        policy = AutoModelForCausalLM.from_pretrained(args.policy).to(device).eval()
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"error: could not load policy {args.policy!r}: {type(e).__name__}: {e}")
    to_ids = policy_prompt_fn(args.task, tokenizer, args.max_prompt_tokens)
    pad, eos = r2m.pad_token_id(tokenizer), tokenizer.eos_token_id
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if args.temperature > 0 else dict(do_sample=False)
    gen_config = GenerationConfig(max_new_tokens=args.max_new_tokens, pad_token_id=pad, eos_token_id=eos, **sampling)
    torch.manual_seed(args.seed)
    out = []
    with open(path, "w") as f:
        for s in tqdm(range(0, len(rows), args.batch_size), desc="generate"):
            batch = rows[s : s + args.batch_size]
            ids, mask = r2m.pad_left([to_ids(r["prompt"]) for r in batch], pad)
            seqs = policy.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config)
            responses, resp_mask = r2m.truncate_after_eos(seqs[:, ids.shape[1] :].cpu(), eos, pad)
            for r, resp, m in zip(batch, responses, resp_mask):
                row = {**r, "response": tokenizer.decode(resp[m.bool()], skip_special_tokens=True),
                       "generator": args.generator_name or args.policy, "temperature": args.temperature}
                f.write(json.dumps(row) + "\n")
                out.append(row)
    return out


def write_alpaca_eval(rows: list[dict], path: str, generator: str) -> None:
    """The file alpaca_eval reads: a JSON list of {instruction, output, generator}."""
    with open(path, "w") as f:
        json.dump([{"instruction": r["prompt"], "output": r["response"], "generator": r.get("generator", generator)}
                   for r in rows], f, indent=1)


# ----------------------------------------------------------------------------------------------------
# 2-3. Judge and report
# ----------------------------------------------------------------------------------------------------


def load_done(path: str, judge_name: str) -> dict[str, dict]:
    """Examples this judge already decided (or found unparseable) in an earlier run; failed ones are redone."""
    done = {}
    if os.path.exists(path):
        for r in read_jsonl(path):
            if r.get("judge") == judge_name and r["verdict"] != "failed":
                done[str(r["id"])] = r
    return done


def judge_all(rows: list[dict], judge, args: EvalArgs, path: str) -> list[dict]:
    """Judge every row not done yet, appending each judgment to `path` as soon as it arrives."""
    done = load_done(path, judge.name)
    records = []
    todo = [r for r in rows if str(r["id"]) not in done]
    if done:
        tqdm.write(f"{len(done)} examples already judged by {judge.name} in {path}: skipped")
    with open(path, "a") as f:
        for r in tqdm(todo, desc=f"judge ({judge.name})"):
            a_is_policy = policy_is_a(args.seed, str(r["id"]))
            a, b = (r["response"], r["reference"]) if a_is_policy else (r["reference"], r["response"])
            record = {"id": str(r["id"]), "judge": judge.name, "prompt": r["prompt"], "policy_response": r["response"],
                      "reference": r["reference"], "policy_is_a": a_is_policy}
            try:
                result = judge(r["prompt"], a, b)
                record["raw"] = result["raw"]
                record["verdict"] = "tie" if result["letter"] == "tie" else policy_outcome(result["letter"], a_is_policy)
            except JudgeFailed as e:
                record["raw"], record["verdict"], record["error"] = None, "failed", str(e)
            f.write(json.dumps(record) + "\n")
            f.flush()
            done[record["id"]] = record
            records.append(record)
    return [done[str(r["id"])] for r in rows]


def load_eval_rows(args: EvalArgs) -> list[dict]:
    """Prompts (+ references) of the evaluation set, with ids = row numbers."""
    d = TASK_DEFAULTS[args.task]
    dataset, split = args.dataset or d["dataset"], args.dataset_split or d["dataset_split"]
    ref_col = args.reference_column or d["reference_column"]
    columns = [args.prompt_column] + ([] if args.references else [ref_col])
    data = runner.load_rows(dataset, split, columns)[: args.limit]
    return [{"id": str(i), "prompt": str(row[args.prompt_column]),
             **({} if args.references else {"reference": runner.response_text(row[ref_col])})}
            for i, row in enumerate(data)]


def run_judge(args: EvalArgs) -> dict:
    os.makedirs(args.output_dir, exist_ok=True)
    device = r2m.resolve_device(args.device)
    template = TLDR_JUDGE_PROMPT if args.task == "tldr" else DIALOGUE_JUDGE_PROMPT
    references = read_references(args.references) if args.references else None
    # 1. responses: generated now, or read — and checked, before any judge is built or called
    if args.policy:
        rows = load_eval_rows(args)
        attach_references(rows, references, "the evaluation set")
        rows = generate(args, rows, device, os.path.join(args.output_dir, "responses.jsonl"))
    elif args.responses:
        rows = read_jsonl(args.responses)[: args.limit]
        check_responses(rows, args.responses)
        attach_references(rows, references, args.responses)
    else:
        raise SystemExit("error: give --policy (to generate) or --responses (already generated)")
    if args.task == "ultrafeedback":
        write_alpaca_eval(rows, os.path.join(args.output_dir, "alpaca_eval_outputs.json"), args.generator_name or "policy")
    # 2. the judge
    if args.judge == "api":
        judge = APIJudge(args, template)
    elif args.judge == "hf":
        if not args.judge_model:
            raise SystemExit("error: the hf judge needs --judge_model")
        judge = HFJudge(args, template, device)
    elif args.judge == "rm":
        scorer = RewardScorer(args, device)
        pp = policy_prompt_fn(args.task, scorer.policy_tokenizer, args.max_prompt_tokens) if scorer.policy is not None else None
        judge = RMJudge(scorer, pp)
    else:
        raise SystemExit(f"error: --judge must be 'api', 'hf' or 'rm', got {args.judge!r}")
    records = judge_all(rows, judge, args, os.path.join(args.output_dir, "judgments.jsonl"))
    # 3. report
    summary = {"task": args.task, "judge": judge.name, "temperature": args.temperature if args.policy else None,
               "seed": args.seed, **summarise(records)}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    rate = "n/a" if summary["win_rate"] is None else f"{100 * summary['win_rate']:.1f}%"
    print(f"win rate {rate} (95% CI {100 * summary['ci95'][0]:.1f}-{100 * summary['ci95'][1]:.1f}) over "
          f"{summary['judged']} judged: {summary['wins']} wins, {summary['losses']} losses, {summary['ties']} ties; "
          f"{summary['unparseable']} unparseable, {summary['failed']} failed")
    return summary


# ----------------------------------------------------------------------------------------------------
# RM accuracy on held-out preference pairs (SPEC §5)
# ----------------------------------------------------------------------------------------------------


def run_rm_accuracy(args: EvalArgs) -> dict:
    if not args.preference_file:
        raise SystemExit("error: --mode rm_accuracy needs --preference_file (prompt, chosen, rejected)")
    rows = runner.load_rows(args.preference_file, "train", ["prompt", "chosen", "rejected"])[: args.limit]
    device = r2m.resolve_device(args.device)
    scorer = RewardScorer(args, device)
    pp = policy_prompt_fn(args.task, scorer.policy_tokenizer, args.max_prompt_tokens) if scorer.policy is not None else None
    correct = {"vanilla": 0, "r2m": 0}
    for s in tqdm(range(0, len(rows), args.batch_size), desc="rm accuracy"):
        batch = rows[s : s + args.batch_size]
        prompts = [str(r["prompt"]) for r in batch]
        chosen = [runner.response_text(r["chosen"]) for r in batch]
        rejected = [runner.response_text(r["rejected"]) for r in batch]
        correct["vanilla"] += int((scorer.score(prompts, chosen) > scorer.score(prompts, rejected)).sum())
        if pp is not None:
            pol = [pp(p) for p in prompts]
            correct["r2m"] += int((scorer.score(prompts, chosen, pol) > scorer.score(prompts, rejected, pol)).sum())
    summary = {"pairs": len(rows), "vanilla_accuracy": correct["vanilla"] / len(rows),
               "r2m_accuracy": correct["r2m"] / len(rows) if pp is not None else None,
               "omega": scorer.omega if pp is not None else None, "reward_model": args.judge_model}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "rm_accuracy.json"), "w") as f:
        json.dump(summary, f, indent=1)
    r2m_part = f", R2M with policy feedback {summary['r2m_accuracy']:.3f}" if pp is not None else ""
    print(f"RM accuracy on {len(rows)} pairs: vanilla {summary['vanilla_accuracy']:.3f}{r2m_part}")
    return summary


def main(argv=None) -> dict:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(EvalArgs).parse_args_into_dataclasses(args=argv)
    if args.task not in TASK_DEFAULTS:
        raise SystemExit(f"error: --task must be one of {sorted(TASK_DEFAULTS)}, got {args.task!r}")
    if args.mode == "rm_accuracy":
        return run_rm_accuracy(args)
    if args.mode != "judge":
        raise SystemExit(f"error: --mode must be 'judge' or 'rm_accuracy', got {args.mode!r}")
    return run_judge(args)


if __name__ == "__main__":
    main()
