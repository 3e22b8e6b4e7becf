"""plot_run.py: curves of runs from metrics.jsonl alone, one panel per quantity, one line per run."""

import json
import sys

import pytest

import plot_run


def write_run(folder, records):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


@pytest.fixture
def two_runs(tmp_path):
    """An R2M run as the loop logs it today (KL per sequence only) with a feedback diagnostic, and a vanilla
    run that logs the per-token KL itself and has no reward-model step."""
    r2m_run = [{"step": s, "omega": 1.0 - 0.1 * s, "reward/mean": 0.1 * s, "kl/sequence": 2.0 * s,
                "response/length": 4.0, "policy/loss": -0.01 * s, "rm/grebt": 0.5 - 0.01 * s, "rm/bt": 0.3,
                "feedback/attention_entropy": 1.5, "time/step": 0.2} for s in range(4)]
    vanilla = [{"step": s, "omega": 1.0, "reward/mean": 0.05 * s, "kl/sequence": 3.0 * s, "kl/token": 0.25 * s,
                "response/length": 6.0, "policy/loss": -0.02 * s, "time/step": 0.1} for s in range(3)]
    return write_run(tmp_path / "r2m", r2m_run), write_run(tmp_path / "vanilla", vanilla)


def test_two_runs_make_one_png_with_the_expected_panels(tmp_path, two_runs):
    pytest.importorskip("matplotlib", reason="pip install matplotlib (.ci/run installs it)")
    out = tmp_path / "plots" / "compare.png"
    drawn = plot_run.main([*two_runs, "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert drawn == {
        "reward (mean)": ["r2m", "vanilla"],
        "KL to reference, per token": ["r2m", "vanilla"],
        "ω(t)": ["r2m", "vanilla"],
        "policy loss": ["r2m", "vanilla"],
        "GREBT loss": ["r2m"],  # vanilla has no reward-model step: no line, but the panel stays
        "response length (tokens)": ["r2m", "vanilla"],
        "feedback/attention_entropy": ["r2m"],
        "rm/bt": ["r2m"],
    }


def test_kl_per_token_is_logged_or_derived(two_runs):
    r2m_records, vanilla_records = (plot_run.read_metrics(run) for run in two_runs)
    assert plot_run.series(r2m_records, plot_run.kl_per_token) == ([0, 1, 2, 3], [0.0, 0.5, 1.0, 1.5])  # 2s / 4
    assert plot_run.series(vanilla_records, plot_run.kl_per_token) == ([0, 1, 2], [0.0, 0.25, 0.5])  # kl/token


def test_extra_keys_and_missing_inputs(tmp_path, two_runs):
    pytest.importorskip("matplotlib", reason="pip install matplotlib (.ci/run installs it)")
    drawn = plot_run.plot_runs([two_runs[0]], str(tmp_path / "one.svg"), extra_keys=("time/step", "gold/reward"))
    assert drawn["time/step"] == ["r2m"] and "gold/reward" not in drawn  # a panel no run logged is left out
    assert "GREBT loss" in drawn and (tmp_path / "one.svg").stat().st_size > 0
    with pytest.raises(SystemExit) as e:
        plot_run.main([str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.png")])
    assert str(e.value).startswith("error:") and "has no metrics.jsonl" in str(e.value)


def test_missing_matplotlib_is_one_clear_line(tmp_path, two_runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as e:
        plot_run.plot_runs(list(two_runs), str(tmp_path / "x.png"))
    assert str(e.value) == "error: plot_run.py needs matplotlib: pip install matplotlib"
