"""The code on the docs pages runs as written, so that docs and code cannot drift apart.

Each checked page's fenced blocks run in order, in one fresh folder:

- a ```python block whose first line is ``# file: NAME`` is written to NAME (not run);
- a ```python block whose first line is ``# new process`` runs in a new interpreter;
- any other ```python block runs in this process, all of a page's blocks sharing one namespace;
- in a ```bash block, each ``$ COMMAND`` line runs in a shell (``tucker-fx`` is this environment's
  console script); it must exit 0, or N when the line ends with ``# exit code N``; the lines after a
  command (its shown output) must appear in what it printed.

``PAGES`` lists every page in docs/ with what is checked; a page not checked here says why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

# page -> None (run every block) or the reason it is not run yet. Add a page here once its blocks run
# as written within the test's time (a block needing minutes, a GPU or files not present: say so).
PAGES: dict[str, str | None] = {
    "own_model.md": None,
    "index.md": "no code",
    "design.md": "no runnable code (design notes)",
    "compress.md": "not yet checked by this runner (its examples are doctested elsewhere?)",
    "analysis.md": "not yet checked by this runner",
    "demo.md": "runs the demo: about a minute (tests/test_compress.py runs it)",
    "lowering.md": "not yet checked by this runner",
    "backend.md": "not yet checked by this runner (inductor compiles: minutes on a small CPU)",
    "benchmarks.md": "benchmark commands: minutes",
    "dtypes.md": "not yet checked by this runner",
    "bad_inputs.md": "not yet checked by this runner",
    "training.md": "training runs: minutes",
    "mlp_example.md": "not yet checked by this runner (needs scikit-learn's digits)",
}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, text) of each fenced python/bash block, in order."""
    return [(lang, text) for lang, text in FENCE.findall(page.read_text(encoding="utf-8")) if lang in ("python", "bash")]


def _env(folder: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(folder)}
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


def run_page(page: Path, folder: Path) -> None:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for lang, text in blocks(page):
        first = text.splitlines()[0] if text.strip() else ""
        if lang == "bash":
            _run_bash(text, folder)
        elif first.startswith("# file:"):
            (folder / first.split(":", 1)[1].strip()).write_text(text, encoding="utf-8")
        elif first.startswith("# new process"):
            r = subprocess.run([sys.executable, "-c", text], cwd=folder, capture_output=True, text=True,
                               env=_env(folder), timeout=600)
            assert r.returncode == 0, f"{page.name}: a '# new process' block failed:\n{text}\n{r.stderr}"
        else:
            try:
                exec(compile(text, f"{page.name} block", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{page.name}: this block failed with {exc!r}:\n{text}") from exc


def test_every_page_is_listed():
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(PAGES)


@pytest.mark.parametrize("name", [n for n, why in PAGES.items() if why is None])
def test_page_runs_as_written(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in [m for m in sys.modules if m == "mymodel"]:
        monkeypatch.delitem(sys.modules, module)
    try:
        run_page(DOCS / name, tmp_path)
    finally:
        sys.modules.pop("mymodel", None)
