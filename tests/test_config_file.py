"""Config files (--config my_run.yaml / .json) and the resolved config.json a run writes at start."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import train_tldr
import train_ultrafeedback
from launch import flags as launch_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers import ENV  # noqa: E402  (the scripts' environment, PYTHONPATH included)


def parse(*argv, script=train_tldr):
    return launch_flags.parse_flags(launch_flags.TLDRArgs if script is train_tldr else launch_flags.UltraFeedbackArgs,
                             launch_flags.TLDR_PRESETS if script is train_tldr else launch_flags.ULTRAFEEDBACK_PRESETS, list(argv))


def test_yaml_config_over_preset_defaults_under_command_line_flags(tmp_path):
    path = tmp_path / "my_run.yaml"
    # PyYAML reads 3e-3 (no dot) as a string: it must still become the float flag
    path.write_text("preset: tiny\nreward: vanilla\ntotal_trajectories: 64\npolicy_lr: 3e-3\nbeta: 0.1\n"
                    "report_to: tensorboard\ngradient_checkpointing: false\n")
    out = ["--output_dir", str(tmp_path / "run")]  # never a default folder: it may hold a user's run
    cfg, args = parse("--config", str(path), "--reward", "r2m", "--beta", "0.2", *out)
    assert args.preset == "tiny" and cfg.queries_per_step == 8 and cfg.device == "cpu"  # the preset's defaults
    assert cfg.total_trajectories == 64 and cfg.policy_lr == 3e-3 and isinstance(cfg.policy_lr, float)  # the file's
    assert cfg.gradient_checkpointing is False and args.report_to == "tensorboard"
    assert cfg.reward == "r2m" and cfg.beta == 0.2  # the command line wins
    cfg, args = parse("--config", str(path), "--preset", "paper", "--total_trajectories", "8192", *out)  # and its --preset
    assert args.preset == "paper" and cfg.queries_per_step == 2048 and cfg.reward == "vanilla"


def test_json_config_for_the_dialogue_script(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "qwen", "group_size": 4, "lora_r": 16}))
    cfg, args = parse("--config", str(path), "--output_dir", str(tmp_path / "run"), script=train_ultrafeedback)
    assert args.policy_model == "Qwen/Qwen2.5-3B-Instruct" and cfg.omega_floor == 0.7  # qwen preset beneath
    assert cfg.group_size == 4 and args.lora_r == 16


@pytest.mark.parametrize("content,name,message", [
    ("reward: vanilla\nomega_flor: 0.5\n", "typo.yaml", "unknown flag(s) ['omega_flor']"),
    ("- a\n- b\n", "list.yaml", "must hold a mapping"),
    ("{not json", "bad.json", "could not read --config"),
    ("preset: huge\n", "preset.yaml", "--preset must be one of"),
    ("group_size: 1\n", "bad_value.yaml", "group_size must be at least 2"),
])
def test_bad_config_files_are_one_clear_line(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        parse("--config", str(path), "--output_dir", str(tmp_path / "run"))
    assert str(e.value).startswith("error:") and message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        parse("--config", str(tmp_path / "missing.yaml"), "--output_dir", str(tmp_path / "run"))
    assert "could not read --config" in str(e.value)


def test_run_writes_its_resolved_config_and_the_file_replays_it(tmp_path):
    path = tmp_path / "my_run.yaml"
    out = tmp_path / "first"
    path.write_text(f"preset: tiny\nreward: vanilla\ntotal_trajectories: 32\noutput_dir: {out}\n")
    cfg, args = parse("--config", str(path), "--seed", "3")  # before the run: then the folder holds one
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_tldr.py"), "--config", str(path), "--seed", "3"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "config.json") as f:
        written = json.load(f)
    # every flag of both dataclasses, resolved: preset defaults, then the file, then the command line
    assert written == {**{k: v for k, v in vars(args).items() if k != "config"}, **vars(cfg)}
    assert written["seed"] == 3 and written["reward"] == "vanilla" and written["queries_per_step"] == 8
    # a written config.json is itself a config file that repeats the run
    cfg2, args2 = parse("--config", str(out / "config.json"), "--overwrite", "true")  # into the same folder
    assert (cfg2, {k: v for k, v in vars(args2).items() if k != "config"}) == (
        dataclasses.replace(cfg, overwrite=True), {k: v for k, v in vars(args).items() if k != "config"})
