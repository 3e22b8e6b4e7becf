"""What the tests share: where the checkout is, the scratch folder they run in, the environment of the scripts
they launch. Not collected by pytest (no test_ prefix).

No test reads or writes the checkout. The suite runs from SCRATCH, a fresh folder whose runs/ already holds a
finished run at every default --output_dir of the scripts (conftest.py fills it), so a test that forgets to
give its own output folder fails on every machine, not only after someone ran the quick start; and conftest
checks at the end that nothing in the checkout was added or changed.
"""

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRATCH = os.environ.setdefault("R2M_TEST_SCRATCH", tempfile.mkdtemp(prefix="r2m-tests-"))
# Scripts run as a user runs them, from the scratch folder; PYTHONPATH lets `python -c "import ..."` find the project.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
# Seed offset and CPU threads of the learning tests: `R2M_TEST_SEED=1 R2M_TEST_THREADS=1 pytest -m learning`
# re-runs every learning assertion on other seeds and thread counts (how their margins were measured).
LEARNING_SEED = int(os.environ.get("R2M_TEST_SEED", "0"))
THREADS = int(os.environ.get("R2M_TEST_THREADS", "2"))


def script(name: str) -> list[str]:
    """The command that runs one of the project's scripts (a path relative to the checkout)."""
    return [sys.executable, os.path.join(ROOT, name)]


def learned(observed: float, needed: float) -> bool:
    """observed > needed. Also prints `learning margin <test>: observed vs needed (ratio)`, which
    `pytest -s -m learning` collects when the margins are measured over seeds and thread counts."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    print(f"\nlearning margin {test} seed {LEARNING_SEED} threads {THREADS}: {observed:.4g} vs {needed:.4g} needed "
          f"({observed / needed if needed else float('inf'):.2f}x)")
    return observed > needed


def below(observed: float, bound: float) -> bool:
    """observed < bound, printing the margin bound / observed as `learned` does."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    print(f"\nlearning margin {test} seed {LEARNING_SEED} threads {THREADS}: {observed:.4g} vs under {bound:.4g} "
          f"({bound / observed if observed > 0 else float('inf'):.2f}x)")
    return observed < bound
