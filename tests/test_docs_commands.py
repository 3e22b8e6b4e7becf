"""Every command in the README and docs/ still works: each one names a script that exists and flags that script
has (checked against its --help), and the ones that run on a CPU (the tiny presets, the tiny models, plots and
evaluations of tiny runs, config files) are run, in order, as written (the tiny training runs cut to 2 steps),
from a folder that looks like the checkout (its code and data linked in) with runs/ of its own."""

import functools
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from helpers import ENV, ROOT

DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
LINKED = ["r2m.py", "brme.py", "train_tldr.py", "train_ultrafeedback.py", "eval_judge.py", "plot_run.py", "launch",
          "plumbing", "benchmarks", "experiments", "data", "requirements.txt"]
EXTERNAL = ("pip", "alpaca_eval", "tensorboard", "wandb", "bash", "cat", "git")  # not ours: not checked


def commands(doc: str) -> list[str]:
    """The shell commands of a document's ```bash blocks: continuation lines joined, comments dropped, a here-doc
    kept with its command."""
    text = open(os.path.join(ROOT, doc)).read()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines, i = block.splitlines(), 0
        while i < len(lines):
            line = lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            heredoc = re.search(r"<<'?(\w+)'?", line)
            if heredoc:
                body = []
                while i + 1 < len(lines) and lines[i + 1] != heredoc.group(1):
                    i += 1
                    body.append(lines[i])
                i += 1
                line = "\n".join([line, *body, heredoc.group(1)])
            command = line if heredoc else re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                found.append(command)
            i += 1
    return found


def words(command: str) -> list[str]:
    """The command's words, environment assignments (A=b) and a time limit (timeout N) dropped."""
    tokens = shlex.split(command.split("\n")[0], comments=True)
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
        tokens.pop(0)
    if tokens[:1] == ["timeout"]:
        tokens = tokens[2:]
    return tokens


def script_and_flags(command: str) -> tuple[list[str], list[str], list[str]]:
    """-> (the script as it is run: [path] or ["-m", module]; its --flags; torchrun's own --flags)."""
    tokens = words(command)
    launcher = []
    if tokens[0] == "torchrun":
        cut = next(i for i, t in enumerate(tokens) if t.endswith(".py"))
        launcher, tokens = tokens[1:cut], tokens[cut:]
    else:
        tokens = tokens[1:]  # python
    script = tokens[:2] if tokens[0] == "-m" else tokens[:1]
    flags = [t.split("=")[0] for t in tokens[len(script):] if t.startswith("--")]
    return script, flags, [t.split("=")[0] for t in launcher if t.startswith("--")]


@functools.lru_cache(maxsize=None)
def help_text(*script: str) -> str:
    if script[0] == "-m":
        command = [sys.executable, *script]
    else:
        command = [sys.executable, os.path.join(ROOT, script[0])]
    proc = subprocess.run([*command, "--help"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (script, proc.stderr[-2000:])
    return proc.stdout


def runs_on_cpu(command: str) -> bool:
    if any(w.startswith("benchmarks/") for w in words(command)[:2]):
        return False  # the benchmarks are run by tests/test_shipped_scripts.py (fewer repeats: the suite's time)
    marks = ("--preset tiny", "--size tiny", "launch.tiny --save-models", "plot_run.py", "cat > ", "--config my_run.yaml",
             "--config runs/from_yaml")
    return any(mark in command for mark in marks) or ("eval_judge.py" in command and "tiny" in command)


DOCS_RUN_ON_CPU = [doc for doc in DOCS if any(runs_on_cpu(c) for c in commands(doc))]  # the others: flags only


def test_every_documented_command_names_a_script_and_flags_that_exist():
    checked = 0
    for doc in DOCS:
        for command in commands(doc):
            tokens = words(command)
            if not tokens or tokens[0] in EXTERNAL:
                continue
            assert tokens[0] in ("python", "torchrun"), (doc, command)
            script, flags, launcher = script_and_flags(command)
            assert script[0] == "-m" or os.path.isfile(os.path.join(ROOT, script[0])), (doc, command)
            if script == ["-m", "launch.tiny"]:  # no --help of its own: its two forms are run below or in its test
                assert flags in ([], ["--save-models"], ["--build-world"]), (doc, command)
                continue
            text = help_text(*script)
            missing = [f for f in flags if f not in text]
            assert not missing, f"{doc}: {command!r} uses {missing}, which {script[-1]} does not have"
            if launcher:
                torchrun = help_text("-m", "torch.distributed.run")
                assert all(f in torchrun for f in launcher), (doc, command)
            checked += 1
    assert checked > 40  # the docs hold the commands; a parsing slip would check none


def test_the_commands_that_run_on_a_cpu_are_found():
    assert {"README.md", "docs/training.md", "docs/evaluation.md", "docs/scale.md"} <= set(DOCS_RUN_ON_CPU)


# The optional packages a documented command needs (README: each is imported only where used): without it, the
# command is not run and the test ends as skipped, naming the package, once every other command has passed.
OPTIONAL = {"--report_to wandb": "wandb", "--report_to tensorboard": "tensorboard", "--lora_r": "peft",
            "plot_run.py": "matplotlib"}


def missing_packages(command: str) -> list[str]:
    missing = []
    for mark, package in OPTIONAL.items():
        if mark in command:
            try:
                importlib.import_module(package)
            except ImportError:
                missing.append(package)
    return missing


@pytest.mark.parametrize("doc", DOCS_RUN_ON_CPU)
def test_the_commands_that_run_on_a_cpu_run(tmp_path, doc):
    todo = [c for c in commands(doc) if runs_on_cpu(c)]
    not_run = {c: missing_packages(c) for c in todo if missing_packages(c)}
    todo = [c for c in todo if c not in not_run]
    for name in LINKED:  # a checkout to run the commands in, as written; what they write stays in tmp_path
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "docs").mkdir()
    env = {**ENV, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PATH": os.path.dirname(sys.executable) + os.pathsep
           + ENV.get("PATH", "")}
    for command in todo:
        command = re.sub(r"^(\s*(?:[A-Z_]+=\S+\s+)*)torchrun ", r"\1python -m torch.distributed.run ", command)
        command = re.sub(r"^pip install [^&]*&&\s*", "", command)  # the environment is the suite's own
        if "--preset tiny" in command and "--total_trajectories" not in command:
            command += " --total_trajectories 64"  # 2 steps, not 16: the same code paths in an eighth of the time
        if "--preset tiny" in command and "--output_dir" not in command and "--resume" not in command:
            for default in ("runs/tiny_tldr", "runs/tiny_ultrafeedback"):  # each example starts where the quick start
                shutil.rmtree(tmp_path / default, ignore_errors=True)     # left off, not on top of the one before
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{doc}: {command}\n{(proc.stdout + proc.stderr)[-3000:]}"
    if not_run:
        packages = sorted({p for missing in not_run.values() for p in missing})
        pytest.skip(f"{doc}: {len(todo)} commands ran; {len(not_run)} need {', '.join(packages)}: "
                    f"pip install {' '.join(packages)}")
