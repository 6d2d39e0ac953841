"""The README cannot drift: every ```python block in README.md is a complete program, run here as written on
the CPU (torch reference backend, Triton in the interpreter), outside the checkout; the demo options the
README lists are the demo's options."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _blocks(lang: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block of ``lang`` in README.md."""
    with open(README) as f:
        text = f.read()
    return [(text[:m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)]


SNIPPETS = _blocks("python")


def test_readme_has_its_snippets():
    assert len(SNIPPETS) >= 3, "README.md lost its python snippets (or the extraction broke)"


@pytest.mark.parametrize("line,code", SNIPPETS, ids=[f"README.md:{n}" for n, _ in SNIPPETS])
def test_readme_snippet_runs(line, code, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_INTERPRET="1",
               OMP_NUM_THREADS="1")  # tiny shapes: threads only contend
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert out.returncode == 0, f"README.md line {line}:\n{code}\n--- stderr ---\n{out.stderr[-4000:]}"


def test_readme_demo_options_exist():
    """Every ``--option`` the README's command-line section names is an option of ``pd-kernels demo``."""
    from pd_kernels.cli import COMMANDS, build_parser

    with open(README) as f:
        text = f.read()
    section = text[text.index("### The command line"):]
    section = section[:section.index("\n## ")]
    named = set(re.findall(r"`(--[a-z][a-z-]*)", section))
    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    known = {o for p in (parser, demo) for a in p._actions for o in a.option_strings}
    assert named and named <= known, f"README names options the demo does not have: {sorted(named - known)}"
    assert "demo" in COMMANDS
