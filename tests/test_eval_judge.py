"""eval_judge.py: verdicts, arithmetic, the API judge against a local server, resume, and the local judges."""

import http.server
import json
import os
import threading
import time

import pytest
import torch

import eval_judge
import r2m
import tiny

KEY = "sk-test-SECRET-9f8e7d"


class ScriptedServer:
    """An OpenAI-compatible /chat/completions on 127.0.0.1. `script` is a list of actions taken one per
    request ('500', 'sleep', 'garbled', or reply text); when it runs out, `default` answers."""

    def __init__(self, default="The first is tighter.\nPreferred: A"):
        self.script, self.default, self.requests = [], default, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"auth": self.headers.get("Authorization"), "body": body})
                action = outer.script.pop(0) if outer.script else outer.default
                if action == "500":
                    self.send_response(500)
                    self.end_headers()
                    return
                if action == "sleep":
                    time.sleep(1.0)  # longer than the client's timeout
                    action = outer.default
                reply = {"choices": [{"message": {"role": "assistant", "content": action}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    s = ScriptedServer()
    yield s
    s.close()


def write_responses(path, n=6):
    rows = [{"id": f"ex{i}", "prompt": f"POST: post number {i}\n\nTL;DR:", "response": f" policy summary {i}",
             "reference": f" reference summary {i}"} for i in range(n)]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def api_args(tmp_path, server, responses, **kw):
    base = ["--responses", str(responses), "--judge", "api", "--api_base_url", server.url, "--api_model", "judge-x",
            "--api_key_env", "TEST_JUDGE_KEY", "--output_dir", str(tmp_path / "out"), "--api_timeout", "0.5",
            "--retry_backoff", "0.01", "--max_retries", "2"]
    for k, v in kw.items():
        base += [f"--{k}", str(v)]
    return base


def judgments(tmp_path):
    return eval_judge.read_jsonl(str(tmp_path / "out" / "judgments.jsonl"))


def test_verdict_parsing():
    assert eval_judge.parse_verdict("A is vaguer.\nPreferred: B") == "B"
    assert eval_judge.parse_verdict("Preferred: **A**") == "A"
    assert eval_judge.parse_verdict('preferred:"b"') == "B"
    assert eval_judge.parse_verdict("Preferred: A\nOn reflection... Preferred: B") == "B"  # the last one counts
    assert eval_judge.parse_verdict("I prefer A") is None
    assert eval_judge.parse_verdict("Preferred: Both") is None
    assert eval_judge.parse_verdict("") is None


def test_order_unflipping():
    assert eval_judge.policy_outcome("A", policy_is_a=True) == "win"
    assert eval_judge.policy_outcome("A", policy_is_a=False) == "loss"
    assert eval_judge.policy_outcome("B", policy_is_a=False) == "win"
    assert eval_judge.policy_outcome(None, policy_is_a=True) == "unparseable"
    sides = [eval_judge.policy_is_a(0, str(i)) for i in range(200)]
    assert 70 < sum(sides) < 130  # randomised ...
    assert sides == [eval_judge.policy_is_a(0, str(i)) for i in range(200)]  # ... with a fixed seed


def test_win_rate_and_wilson_hand_case():
    records = [{"verdict": v} for v in ["win"] * 7 + ["loss"] * 2 + ["tie"] + ["unparseable"] * 3 + ["failed"]]
    s = eval_judge.summarise(records)
    assert s["win_rate"] == pytest.approx(0.75)  # (7 + 0.5) / 10: ties half, unparseable/failed left out
    assert (s["judged"], s["wins"], s["losses"], s["ties"], s["unparseable"], s["failed"]) == (10, 7, 2, 1, 3, 1)
    # Wilson, p = 0.75, n = 10, z = 1.96: centre 0.680618, half-width 0.238442
    assert s["ci95"] == pytest.approx([0.442176, 0.919054], abs=1e-5)
    assert eval_judge.wilson_interval(0, 0) == (0.0, 1.0)


def test_api_judge_unflips_order_and_never_writes_the_key(tmp_path, server, capsys):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses)
    summary = eval_judge.main(api_args(tmp_path, server, responses))  # the server always answers "A"
    recs = judgments(tmp_path)
    assert [r["verdict"] for r in recs] == ["win" if r["policy_is_a"] else "loss" for r in recs]
    assert summary["wins"] == sum(r["policy_is_a"] for r in recs) and summary["judged"] == 6
    # what the judge saw: both texts, in the recorded order, in the TL;DR comparison prompt
    for req, rec in zip(server.requests, recs):
        content = req["body"]["messages"][0]["content"]
        first, second = ("policy", "reference") if rec["policy_is_a"] else ("reference", "policy")
        assert content.index(f"Summary A:\n {first}") < content.index(f"Summary B:\n {second}")
        assert req["auth"] == f"Bearer {KEY}" and req["body"]["model"] == "judge-x"
    out = capsys.readouterr()
    for root, _, files in os.walk(tmp_path):
        for name in files:
            assert KEY not in open(os.path.join(root, name), errors="replace").read(), name
    assert KEY not in out.out + out.err


def test_retry_after_500_and_after_timeout_then_failed_and_unparseable(tmp_path, server):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=4)
    # ex0: 500 then fine; ex1: timeout then fine; ex2: three 500s (max_retries 2) -> failed; ex3: no verdict
    server.script = ["500", "Preferred: A", "sleep", "Preferred: A", "500", "500", "500", "I cannot decide."]
    summary = eval_judge.main(api_args(tmp_path, server, responses))
    recs = {r["id"]: r for r in judgments(tmp_path)}
    assert recs["ex0"]["verdict"] in ("win", "loss") and recs["ex1"]["verdict"] in ("win", "loss")
    assert recs["ex2"]["verdict"] == "failed" and recs["ex2"]["error"] == "HTTP 500"
    assert recs["ex3"]["verdict"] == "unparseable" and recs["ex3"]["raw"] == "I cannot decide."
    assert (summary["failed"], summary["unparseable"], summary["judged"]) == (1, 1, 2)
    assert len(server.requests) == 8
    # resume: finished examples cost nothing; only the failed one is asked again
    server.requests.clear()
    summary = eval_judge.main(api_args(tmp_path, server, responses))
    assert len(server.requests) == 1 and "post number 2" in server.requests[0]["body"]["messages"][0]["content"]
    assert (summary["failed"], summary["unparseable"], summary["judged"]) == (0, 1, 3)
    server.requests.clear()
    eval_judge.main(api_args(tmp_path, server, responses))
    assert server.requests == []


@pytest.mark.parametrize("case", ["missing_column", "id_mismatch", "empty", "repeated_ids", "no_key"])
def test_bad_input_fails_before_any_judge_call(tmp_path, server, monkeypatch, case):
    responses = tmp_path / "responses.jsonl"
    rows = write_responses(responses, n=3)
    extra = {}
    if case == "missing_column":
        responses.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "response"}) for r in rows))
    elif case == "id_mismatch":
        refs = tmp_path / "refs.jsonl"
        refs.write_text("\n".join(json.dumps({"id": f"other{i}", "reference": "x"}) for i in range(3)))
        extra["references"] = refs
    elif case == "empty":
        responses.write_text("")
    elif case == "repeated_ids":
        responses.write_text("\n".join(json.dumps({**r, "id": "same"}) for r in rows))
    else:
        monkeypatch.delenv("TEST_JUDGE_KEY")
    with pytest.raises(SystemExit) as e:
        eval_judge.main(api_args(tmp_path, server, responses, **extra))
    assert str(e.value).startswith("error:")
    assert server.requests == []


def test_generate_then_hf_judge_end_to_end_and_alpaca_format(tmp_path):
    paths = tiny.save_models(str(tmp_path / "models"))
    prompts = tmp_path / "prompts.jsonl"
    rows = tiny.synthetic_ultrafeedback_rows(5, seed=4)
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    summary = eval_judge.main(["--task", "ultrafeedback", "--policy", paths["policy"], "--dataset", str(prompts),
                               "--judge", "hf", "--judge_model", paths["judge"], "--max_new_tokens", "6",
                               "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--generator_name", "tiny"])
    assert summary["judged"] + summary["unparseable"] == 5 and summary["judge"].startswith("hf:")
    generated = eval_judge.read_jsonl(str(tmp_path / "out" / "responses.jsonl"))
    assert len(generated) == 5 and all(g["temperature"] == 0.0 for g in generated)
    with open(tmp_path / "out" / "alpaca_eval_outputs.json") as f:
        alpaca = json.load(f)
    assert [a["instruction"] for a in alpaca] == [r["prompt"] for r in rows]
    assert all(set(a) == {"instruction", "output", "generator"} and a["generator"] == "tiny" for a in alpaca)
    assert all(r["raw"].startswith("log P(A)=") for r in judgments(tmp_path))


@pytest.fixture(scope="module")
def r2m_checkpoint(tmp_path_factory):
    """A tiny R2M training run's checkpoint, whose RM equals tiny.save_models' reward_model."""
    root = tmp_path_factory.mktemp("r2m_ckpt")
    paths = tiny.save_models(str(root / "models"))
    tok = tiny.build_tokenizer()
    policy = tiny.build_policy(tok, seed=0)
    rm = tiny.build_reward_model(tok, seed=1)
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"][-40:] for r in tiny.synthetic_tldr_rows(8)]
    cfg = r2m.R2MConfig(queries_per_step=4, group_size=2, total_trajectories=16, max_new_tokens=4, d_attn=16,
                        policy_minibatch_size=8, micro_batch_size=4, rm_lr=1e-2, device="cpu",
                        output_dir=str(root / "run"), save_every=1, sample_every=0)
    import copy

    r2m.train(policy, copy.deepcopy(policy), r2m.R2MRewardModel(rm, 64, 16), tok, prompts, cfg)
    return paths, str(root / "run" / "checkpoint")


def test_rm_judge_vanilla_and_with_policy_feedback(tmp_path, r2m_checkpoint):
    paths, ckpt = r2m_checkpoint
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=4)
    for extra, prefix in [([], "rm:"), (["--r2m_checkpoint", ckpt], "r2m:")]:
        out = str(tmp_path / prefix.strip(":"))
        summary = eval_judge.main(["--responses", str(responses), "--judge", "rm", "--judge_model",
                                   paths["reward_model"], "--output_dir", out, "--device", "cpu", *extra])
        assert summary["judge"].startswith(prefix) and summary["judged"] == 4
        recs = eval_judge.read_jsonl(os.path.join(out, "judgments.jsonl"))
        for r in recs:  # the verdict follows the scores, un-flipped
            r_a, r_b = (float(x.split("=")[1]) for x in r["raw"].split())
            policy_score = r_a if r["policy_is_a"] else r_b
            reference_score = r_b if r["policy_is_a"] else r_a
            assert r["verdict"] == ("win" if policy_score > reference_score else "loss")


def test_rm_accuracy_on_a_tiny_preference_file(tmp_path, r2m_checkpoint):
    paths, ckpt = r2m_checkpoint
    prefs = tmp_path / "prefs.jsonl"
    rows = tiny.synthetic_preference_rows(20, seed=8)
    prefs.write_text("\n".join(json.dumps(r) for r in rows))
    summary = eval_judge.main(["--mode", "rm_accuracy", "--preference_file", str(prefs), "--judge_model",
                               paths["reward_model"], "--r2m_checkpoint", ckpt, "--output_dir", str(tmp_path / "o"),
                               "--device", "cpu", "--batch_size", "7"])
    # the vanilla number, computed independently with the RM's own forward
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["reward_model"])
    rm = AutoModelForSequenceClassification.from_pretrained(paths["reward_model"]).eval()
    view = r2m.make_rm_view(tok)
    with torch.no_grad():
        def score(col):
            return torch.cat([rm(input_ids=torch.tensor([view(r["prompt"], r[col])])).logits[:, 0] for r in rows])
        expected = (score("chosen") > score("rejected")).float().mean().item()
    assert summary["pairs"] == 20 and summary["vanilla_accuracy"] == pytest.approx(expected)
    assert 0.0 <= summary["r2m_accuracy"] <= 1.0 and summary["omega"] == 0.6
    assert json.load(open(tmp_path / "o" / "rm_accuracy.json"))["vanilla_accuracy"] == summary["vanilla_accuracy"]
