"""The README runs as written (issue 15): every ```python block runs in a fresh interpreter in an
empty folder; every `ressformer` command in a ```bash block names a real command and real options;
the first two blocks set up exactly as CI (.ci/run) does."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ressformer.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(lang: str) -> list[str]:
    """The fenced blocks of one language (also those indented in a list item)."""
    out = []
    for m in re.finditer(rf"^( *)```{lang}\n(.*?)^\1```", README, re.S | re.M):
        indent = len(m.group(1))
        out.append("".join(ln[indent:] if ln[:indent].isspace() else ln for ln in m.group(2).splitlines(True)))
    return out


def ressformer_commands(block: str) -> list[list[str]]:
    """`ressformer ...` invocations in a bash block (also after && or ;, or a venv's bin/ressformer),
    as argument lists without the program name; comments dropped."""
    cmds = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        cur = None
        for w in words + ["&&"]:
            if w in ("&&", ";", "||", "|"):
                if cur is not None:
                    cmds.append(cur)
                cur = None
            elif cur is None and Path(w).name == "ressformer":
                cur = []
            elif cur is not None:
                cur.append(w)
    return cmds


def test_readme_has_blocks():
    assert len(blocks("python")) >= 1 and len(blocks("bash")) >= 4


@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_python_block_runs(i, tmp_path):
    code = blocks("python")[i]
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README python block {i} failed:\n{code}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


def test_bash_commands_parse():
    """Each `ressformer` command in the README: the subcommand exists (its --help works) and every
    option it passes is one of that subcommand's options (or the group's)."""
    ctx = click.Context(main)
    group_opts = {o for p in main.params for o in p.opts}
    seen = set()
    for block in blocks("bash"):
        for args in ressformer_commands(block):
            while args and args[0] in group_opts:  # ressformer -q demo
                args = args[1:]
            assert args, block
            name = args[0]
            cmd = main.get_command(ctx, name)
            assert cmd is not None, f"README uses `ressformer {name}`, which does not exist"
            if name not in seen:
                r = CliRunner().invoke(main, [name, "--help"])
                assert r.exit_code == 0, r.output
                seen.add(name)
            opts = {o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
            opts |= {"--help", "-h"}
            for a in args[1:]:
                if a.startswith("-") and not re.fullmatch(r"-\d.*", a):
                    assert a.split("=")[0] in opts, f"README: `ressformer {name}` has no option {a}"
    assert {"demo", "train", "export", "parity", "generate", "score"} <= seen


def test_first_blocks_are_what_ci_runs():
    """The two opening commands: set-up as .ci/run installs, then the demo / the test suite."""
    ci = (ROOT / ".ci" / "run").read_text()
    first, second = blocks("bash")[:2]
    setup = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
             "pip install -e '.[torch,dev]'")
    assert first.strip() == setup + " && ressformer demo"
    assert second.strip() == setup + " && (cd runtime/js && npm ci --no-audit --no-fund) && python -m pytest -q"
    for line in ("python3 -m venv .venv", "pip install -q torch==2.13.0", "pip install -q -e '.[torch,dev]'",
                 "(cd runtime/js && npm ci --no-audit --no-fund", "python -m pytest -q",
                 "python -m pytest -q -m browser tests/test_js.py"):
        assert line in ci, line


def test_readme_states_the_demo_time():
    m = re.search(r"measured: (\d+) ?min (\d+) ?s", README)
    assert m, "the README gives the demo's measured wall time"
    assert int(m.group(1)) * 60 + int(m.group(2)) <= 4 * 60
