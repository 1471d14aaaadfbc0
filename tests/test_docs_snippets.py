"""The code on the docs pages runs as written, so that docs and code cannot drift apart.

Each checked page's fenced blocks run in order, in one fresh folder (``$TUCKER_FX_CACHE_DIR`` points
into it, so ``tune=True`` never writes to the user's timing cache):

- a ```python block whose first line is ``# file: NAME`` is written to NAME (not run; NAME may hold
  folders, ``mypkg/models.py``);
- a ```python block whose first line is ``# new process`` runs in a new interpreter;
- any other ```python block runs in this process, all of a page's blocks sharing one namespace;
- in a ```bash block, each ``$ COMMAND`` line runs in a shell (``tucker-fx`` is this environment's
  console script); it must exit 0, or N when the line ends with ``# exit code N``; the lines after a
  command (its shown output) must each appear in what it printed, so show only what is deterministic
  (counts, names, messages), never timings or measured floats;
- a block (python or bash) whose first line is ``# not run: REASON`` is not run: the reason is on the
  page, for the reader too. Use it only for what cannot run here in reasonable time (a 12-minute
  training run, an install); prefer a cheap but real command (smaller sizes, fewer epochs) that runs.

Commands are shown in fenced ```bash blocks with ``$ ``, never as indented text, so that this test
sees them (``test_commands_are_fenced``).

``PAGES`` lists every page in docs/ with what is checked; a page not checked here says why. A page
whose check takes over ~20 s on a 2-core CPU is in ``SLOW``: marked ``slow``, run by ``--run-slow``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"

# page -> None (every block runs, but those marked ``# not run: REASON`` on the page) or the reason the
# page is not run at all. A page with no code block is run too, so that code added to it is checked.
PAGES: dict[str, str | None] = {
    "own_model.md": None,
    "compress.md": None,
    "analysis.md": None,
    "demo.md": None,
    "lowering.md": None,
    "backend.md": None,
    "dtypes.md": None,
    "bad_inputs.md": None,
    "training.md": None,
    "mlp_example.md": None,
    "index.md": None,
    "design.md": None,
    "benchmarks.md": None,
    "budget.md": None,
}

# pages whose check takes over ~20 s, or whose code the fast loop runs elsewhere already. Measured as CPU
# seconds on the project's 2-core CPU (wall time on an idle machine is about the same or less); the
# other checked pages take 1-15 s each (backend.md ~15, lowering.md ~12, analysis.md ~9, bad_inputs.md ~5).
SLOW: dict[str, str] = {
    "own_model.md": "~45 s: a training stand-in, compress, save, reload in a new process, pt2 and ONNX exports, the CLI",
    "compress.md": "~30 s: the full-size THETIS net, and the CLI on a 3D ResNet-18",
    "demo.md": "~50 s: three runs of the demo",
    "training.md": "~50 s: fine-tuning, torchrun with 2 processes, a small tucker-fx train, the linear probe",
    "benchmarks.md": "~40 s: a THETIS bench (the zoo runs are marked not run: minutes)",
    "budget.md": "~70 s: trains a small CNN, three budgeted compressions, the max_metric_drop search",
    "mlp_example.md": "~10 s, but tests/test_training.py::test_mlp_example_runs runs its code in the fast loop already",
}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"#\s*not run:\s*(\S.*)$")
COMMAND = re.compile(r"^ {4,}(\$ )?(tucker-fx|python3?|pytest|pip|torchrun)\b")


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, text) of each fenced python/bash block, in order."""
    return [(lang, text) for lang, text in FENCE.findall(page.read_text(encoding="utf-8")) if lang in ("python", "bash")]


def _env(folder: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(folder), "MPLBACKEND": "Agg",
           "TUCKER_FX_CACHE_DIR": str(folder / ".tucker_fx_cache")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _run_bash(text: str, folder: Path) -> None:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("$ "):
            continue
        command = line[2:]
        m = re.search(r"#\s*exit code (\d+)\s*$", command)
        expected_rc = int(m.group(1)) if m else 0
        r = subprocess.run(command, shell=True, cwd=folder, capture_output=True, text=True, env=_env(folder),
                           timeout=600)
        assert r.returncode == expected_rc, f"{command!r} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        shown = []
        for out in lines[i + 1:]:
            if out.startswith("$ "):
                break
            shown.append(out)
        for out in filter(None, (s.strip() for s in shown)):
            assert out in r.stdout + r.stderr, f"{command!r} did not print {out!r}:\n{r.stdout}\n{r.stderr}"


def run_page(page: Path, folder: Path) -> list[str]:
    """Runs the page's blocks in ``folder``; returns the reasons of the blocks marked ``# not run``."""
    namespace: dict[str, object] = {"__name__": "__docs__"}
    not_run = []
    for lang, text in blocks(page):
        first = text.splitlines()[0] if text.strip() else ""
        if first.lstrip().startswith("# not run"):
            m = NOT_RUN.match(first.strip())
            assert m, f"{page.name}: a '# not run' block must say why ('# not run: REASON'):\n{text}"
            not_run.append(m.group(1))
        elif lang == "bash":
            _run_bash(text, folder)
        elif first.startswith("# file:"):
            path = folder / first.split(":", 1)[1].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        elif first.startswith("# new process"):
            r = subprocess.run([sys.executable, "-c", text], cwd=folder, capture_output=True, text=True,
                               env=_env(folder), timeout=600)
            assert r.returncode == 0, f"{page.name}: a '# new process' block failed:\n{text}\n{r.stderr}"
        else:
            try:
                exec(compile(text, f"{page.name} block", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{page.name}: this block failed with {exc!r}:\n{text}") from exc
    return not_run


def test_every_page_is_listed():
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(PAGES)
    assert set(SLOW) <= {name for name, why in PAGES.items() if why is None}


@pytest.mark.parametrize("name", [name for name, why in PAGES.items() if why is None])
def test_commands_are_fenced(name):
    """A command shown as indented text would escape this test: commands go in ```bash blocks."""
    text = FENCE.sub("", (DOCS / name).read_text(encoding="utf-8"))
    hidden = [line.strip() for line in text.splitlines() if COMMAND.match(line)]
    assert not hidden, f"{name}: commands outside a fenced ```bash block (write them as '$ COMMAND'): {hidden}"


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [])
                                  for name, why in PAGES.items() if why is None])
def test_page_runs_as_written(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TUCKER_FX_CACHE_DIR", str(tmp_path / ".tucker_fx_cache"))
    for lang, text in blocks(DOCS / name):  # a module of that name imported by another test would shadow the file
        if text.startswith("# file:"):
            top = Path(text.splitlines()[0].split(":", 1)[1].strip()).parts[0].removesuffix(".py")
            monkeypatch.delitem(sys.modules, top, raising=False)
    before = set(sys.modules)
    threads = torch.get_num_threads()
    try:
        run_page(DOCS / name, tmp_path)
    finally:
        torch.set_num_threads(threads)  # mlp_example.md sets 1 thread, for its tiny layers
        for module in set(sys.modules) - before:  # the page's own files (mymodel.py, ...), imported from tmp_path
            if str(tmp_path) in str(getattr(sys.modules[module], "__file__", None) or ""):
                del sys.modules[module]
