"""eval_judge.py: verdicts, arithmetic, the API judge against a local server, resume, and the local judges."""

import http.server
import json
import os
import socket
import threading
import time

import pytest
import torch

import eval_judge
import r2m
from launch import tiny
from plumbing import data

KEY = "sk-test-SECRET-9f8e7d"


class ScriptedServer:
    """An OpenAI-compatible /chat/completions on 127.0.0.1. `script` is a list of actions taken one per
    request; when it runs out, `default` answers (reply text, or a function of the request body giving it).
    Actions: reply text; '500'; 'sleep' (longer than the client's timeout, then the default); or a dict:
    {"status": code[, "location": url][, "retry_after": s]} an error or redirect with an empty body;
    {"body": json} a 200 with that JSON; {"raw_body": bytes} a 200 with those bytes;
    {"cut_body": True} a 200 announcing 328 bytes that closes after 109; {"trickle": s} the whole reply
    (headers included) one byte every s seconds."""

    def __init__(self, default="The first is tighter.\nPreferred: A"):
        self.script, self.default, self.requests = [], default, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):  # only a followed redirect would come here
                outer.requests.append({"method": "GET", "auth": self.headers.get("Authorization"), "time": time.monotonic()})
                self._send(200, json.dumps({"choices": [{"message": {"content": "Preferred: B"}}]}).encode())

            def _send(self, status, data, headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"method": "POST", "auth": self.headers.get("Authorization"), "body": body,
                                       "time": time.monotonic()})
                action = outer.script.pop(0) if outer.script else outer.default
                if callable(action):
                    action = action(body)
                if action == "500":
                    self.send_response(500)
                    self.end_headers()
                    return
                if action == "sleep":
                    time.sleep(1.0)  # longer than the client's timeout
                    action = outer.default
                if isinstance(action, dict) and "status" in action:
                    headers = [("Location", action["location"])] if "location" in action else []
                    headers += [("Retry-After", action["retry_after"])] if "retry_after" in action else []
                    return self._send(action["status"], b"", headers)
                if isinstance(action, dict) and "body" in action:
                    return self._send(200, json.dumps(action["body"]).encode(), [("Content-Type", "application/json")])
                if isinstance(action, dict) and "raw_body" in action:
                    return self._send(200, action["raw_body"], [("Content-Type", "application/json")])
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "x" * 250}}]}).encode()
                if isinstance(action, dict) and "cut_body" in action:
                    self.send_response(200)
                    self.send_header("Content-Length", "328")
                    self.end_headers()
                    self.wfile.write(reply[:109])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if isinstance(action, dict) and "trickle" in action:
                    raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(reply)
                           + reply)
                    try:
                        for i in range(len(raw)):
                            self.wfile.write(raw[i : i + 1])
                            self.wfile.flush()
                            time.sleep(action["trickle"])
                    except OSError:
                        pass  # the client gave up, as it should
                    self.close_connection = True
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": action}}]}).encode()
                self._send(200, data, [("Content-Type", "application/json")])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    # the API judge's client is the optional `openai` package (.ci/run installs it)
    pytest.importorskip("openai", reason="the api judge needs `pip install openai`, which is not installed here")
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
    # decorations of a clear answer are accepted ...
    assert eval_judge.parse_verdict("**Preferred**: B") == "B"
    assert eval_judge.parse_verdict("Preferred: Summary B") == "B"
    assert eval_judge.parse_verdict("**Preferred:** Reply A.") == "A"
    assert eval_judge.parse_verdict("Preferred: (B), it is shorter") == "B"
    assert eval_judge.parse_verdict("Preferred: A is a tighter summary") == "A"
    # ... but naming both sides, or neither, is unparseable, never a guess
    assert eval_judge.parse_verdict("Preferred: A or B") is None
    assert eval_judge.parse_verdict("Preferred: A/B") is None
    assert eval_judge.parse_verdict("Preferred: Summary A over Summary B") is None
    assert eval_judge.parse_verdict("Preferred: neither") is None


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


@pytest.mark.parametrize("case", ["missing_column", "id_mismatch", "empty", "repeated_ids", "no_key", "not_an_object",
                                  "missing_references"])
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
    elif case == "not_an_object":  # valid JSON, but not a row
        responses.write_text(json.dumps(rows[0]) + "\n5\n")
    elif case == "missing_references":
        extra["references"] = tmp_path / "no_such_refs.json"  # an alpaca_eval-style reference file
    else:
        monkeypatch.delenv("TEST_JUDGE_KEY")
    with pytest.raises(SystemExit) as e:
        eval_judge.main(api_args(tmp_path, server, responses, **extra))
    assert str(e.value).startswith("error:") and "\n" not in str(e.value)
    assert server.requests == []


# ---- network faults, each against the scripted server ---------------------------------------------------------


def test_connection_dropped_mid_body_is_retried(tmp_path, server):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=2)
    server.script = [{"cut_body": True}, "Preferred: A", {"cut_body": True}, {"cut_body": True}, {"cut_body": True}]
    summary = eval_judge.main(api_args(tmp_path, server, responses))
    recs = {r["id"]: r for r in judgments(tmp_path)}
    assert recs["ex0"]["verdict"] in ("win", "loss")  # the second try succeeded
    assert recs["ex1"]["verdict"] == "failed" and "RemoteProtocolError" in recs["ex1"]["error"]
    assert summary["failed"] == 1 and len(server.requests) == 5


def test_reply_of_the_wrong_shape_is_a_failed_attempt(tmp_path, server):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=2)
    # ex0: choices null, a JSON list, not JSON at all, then a good reply; ex1: malformed every time
    server.script = [{"body": {"choices": None}}, {"body": [1, 2]}, {"raw_body": b"<html>busy</html>"}, "Preferred: A",
                     {"body": {"choices": [{"message": {"content": None}}]}}, {"body": 5}, {"body": {}}, {"body": "x"}]
    summary = eval_judge.main(api_args(tmp_path, server, responses, max_retries=3))
    recs = {r["id"]: r for r in judgments(tmp_path)}
    assert recs["ex0"]["verdict"] in ("win", "loss")
    assert recs["ex1"]["verdict"] == "failed" and recs["ex1"]["error"].startswith("malformed response")
    assert summary["failed"] == 1 and len(server.requests) == 8


@pytest.mark.parametrize("status", [302, 307])
def test_redirect_to_another_origin_stops_and_never_reaches_it(tmp_path, server, status):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=3)
    other = ScriptedServer(default="Preferred: B")
    try:
        server.script = [{"status": status, "location": other.url + "/chat/completions"}]
        with pytest.raises(SystemExit) as e:
            eval_judge.main(api_args(tmp_path, server, responses))
        assert other.requests == []  # neither the key nor the request went there
    finally:
        other.close()
    message = str(e.value)
    assert message.startswith("error:") and str(status) in message and "redirect" in message and KEY not in message
    assert len(server.requests) == 1
    assert not os.path.exists(tmp_path / "out" / "judgments.jsonl") or judgments(tmp_path) == []


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_not_found_stop_at_once_recording_nothing(tmp_path, server, status):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=3)
    server.default = {"status": status}
    with pytest.raises(SystemExit) as e:
        eval_judge.main(api_args(tmp_path, server, responses))
    message = str(e.value)
    assert message.startswith("error:") and "\n" not in message and KEY not in message
    assert f"HTTP {status}" in message and server.url + "/chat/completions" in message
    assert len(server.requests) == 1  # not retried, not tried for the other examples
    assert not os.path.exists(tmp_path / "out" / "judgments.jsonl") or judgments(tmp_path) == []


def test_failed_examples_make_the_run_exit_non_zero(tmp_path, server, capsys):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=3)
    server.script = ["Preferred: A", "500", "500", "500"]  # ex1 fails every retry (max_retries 2)
    assert eval_judge.cli(api_args(tmp_path, server, responses)) == eval_judge.EXIT_FAILED_EXAMPLES
    err = capsys.readouterr().err
    assert "1 examples failed" in err and "same --output_dir" in err
    assert eval_judge.cli(api_args(tmp_path, server, responses)) == 0  # the re-run retries ex1 only, and succeeds
    assert len(server.requests) == 5 + 1


def test_retry_after_is_honoured_and_capped(tmp_path, server):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=2)
    server.script = [{"status": 429, "retry_after": "1"}, "Preferred: A", {"status": 503, "retry_after": "3600"}, "Preferred: A"]
    eval_judge.main(api_args(tmp_path, server, responses, retry_after_cap=1.5))  # back-off alone would be 0.01 s
    t = [r["time"] for r in server.requests]
    assert len(t) == 4 and 0.95 <= t[1] - t[0] < 1.4  # waited what the server asked
    assert 1.45 <= t[3] - t[2] < 2.5  # ... but never longer than the cap
    assert all(r["verdict"] in ("win", "loss") for r in judgments(tmp_path))


def test_a_trickling_server_cannot_hold_a_call_past_the_timeout(tmp_path, server):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=1)
    server.script = [{"trickle": 0.02}]  # about 8 s for the whole reply, each byte well inside the read timeout
    start = time.monotonic()
    summary = eval_judge.main(api_args(tmp_path, server, responses, max_retries=0, api_timeout=0.5))
    assert time.monotonic() - start < 3.0
    (rec,) = judgments(tmp_path)
    assert summary["failed"] == 1 and rec["verdict"] == "failed" and "Timeout" in rec["error"]


def test_a_dead_endpoint_stops_the_run_and_a_rerun_resumes(tmp_path, server):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=6)
    dead = ScriptedServer()
    dead.close()  # nothing listens on its port any more
    args = api_args(tmp_path, dead, responses, max_consecutive_failures=2)
    with pytest.raises(SystemExit) as e:
        eval_judge.main(args)
    assert str(e.value).startswith("error: 2 examples in a row failed") and "same --output_dir" in str(e.value)
    assert [r["verdict"] for r in judgments(tmp_path)] == ["failed", "failed"]  # kept; the rest never tried
    summary = eval_judge.main(api_args(tmp_path, server, responses))  # the endpoint is back
    assert summary["judged"] == 6 and summary["failed"] == 0 and len(server.requests) == 6


def test_resume_drops_a_cut_last_line_but_not_a_bad_middle_line(tmp_path, server, capsys):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=4)
    eval_judge.main(api_args(tmp_path, server, responses))
    path = tmp_path / "out" / "judgments.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][:40])  # a crash while appending the fourth
    server.requests.clear()
    summary = eval_judge.main(api_args(tmp_path, server, responses))
    assert "last line" in capsys.readouterr().err and len(server.requests) == 1  # only the cut example again
    assert summary["judged"] == 4 and [r["id"] for r in judgments(tmp_path)] == ["ex0", "ex1", "ex2", "ex3"]
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:40] + "\n" + "".join(lines[2:]))
    with pytest.raises(SystemExit) as e:
        eval_judge.main(api_args(tmp_path, server, responses))
    assert str(e.value).startswith("error:") and "line 2" in str(e.value)


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
    view = data.make_rm_view(tok)
    with torch.no_grad():
        def score(col):
            return torch.cat([rm(input_ids=torch.tensor([view(r["prompt"], r[col])])).logits[:, 0] for r in rows])
        expected = (score("chosen") > score("rejected")).float().mean().item()
    assert summary["pairs"] == 20 and summary["vanilla_accuracy"] == pytest.approx(expected)
    assert 0.0 <= summary["r2m_accuracy"] <= 1.0 and summary["omega"] == 0.6
    assert json.load(open(tmp_path / "o" / "rm_accuracy.json"))["vanilla_accuracy"] == summary["vanilla_accuracy"]
