"""Every `lrnnx train` command the docs show trains to a clearly-above-chance result.

The commands are read from the fenced ```bash blocks of README.md, docs/README.md and
docs/tutorials/*.md (backslash continuations joined, comments dropped, ``NAME=value`` prefixes
such as ``LRNNX_BACKEND=torch`` moved into the environment, ``--out`` pointed at a temporary
directory) and run as written through ``python -m lrnnx.cli``.  A ``--resume`` command runs after
the command that started its ``--out``, in the same directory.  Each run must exit with 0 and end
with a test accuracy of at least ``MIN_RATIO`` times its task's chance level (``metrics.json``:
``final.test_acc`` against ``chance.acc``).

The training runs are long (about 7 minutes in all on two CPU cores, more on busy ones), so
they are marked slow: the default ``pytest`` leaves them out (``-m 'not slow'`` in pyproject's
addopts) and ``make test-slow`` (``pytest -m slow``) runs them.  Extracting the commands takes no
time and is checked on every run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    ROOT / "docs" / "README.md",
    *sorted((ROOT / "docs" / "tutorials").glob("*.md")),
]
#: the final test accuracy must be at least this many times the chance level
MIN_RATIO = 1.5
#: seconds one documented command may take (they are meant to take a few minutes at most)
TIMEOUT_S = 1800
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Command:
    where: str  # "docs/tutorials/02_event_data.md:183"
    text: str  # the command as documented, continuations joined
    env: dict
    args: list  # the arguments after `lrnnx train`

    @property
    def out(self) -> str | None:
        return _option(self.args, "--out")

    @property
    def resume(self) -> bool:
        return "--resume" in self.args


@dataclass
class Run:
    """A documented command and the `--resume` commands that continue its output directory."""

    first: Command
    resumes: list = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.first.where


def _option(args: list, name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _with_out(args: list, out: Path) -> list:
    """``args`` with ``--out`` (added if absent) set to ``out``."""
    res, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            res.append(arg)
    return [*res, "--out", str(out)]


def bash_commands(path: Path):
    """(line number, command) of every command in ``path``'s ```bash blocks, continuations
    joined; the line number is the command's first line."""
    text = path.read_text()
    for block in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        first_line = text.count("\n", 0, block.start(1)) + 1
        lines = block.group(1).split("\n")
        i = 0
        while i < len(lines):
            start, parts = i, [lines[i]]
            while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
                parts[-1] = parts[-1].rstrip()[:-1]
                i += 1
                parts.append(lines[i])
            i += 1
            command = " ".join(p.strip() for p in parts).strip()
            if command:
                yield first_line + start, command


def documented_train_commands() -> list:
    commands = []
    for path in DOCS:
        for line, text in bash_commands(path):
            if "lrnnx train" not in text:
                continue
            tokens = shlex.split(text, comments=True)
            env = {}
            while tokens and ENV_ASSIGNMENT.match(tokens[0]):
                name, value = tokens.pop(0).split("=", 1)
                env[name] = value
            where = f"{path.relative_to(ROOT).as_posix()}:{line}"
            assert len(tokens) >= 2 and Path(tokens[0]).name == "lrnnx" and tokens[1] == "train", (
                f"{where}: not an `lrnnx train` command: {text}"
            )
            commands.append(Command(where=where, text=text, env=env, args=tokens[2:]))
    return commands


def documented_runs() -> list:
    """The commands grouped into runs: a `--resume` command joins the latest earlier command of
    the same file with the same `--out`."""
    runs: list = []
    for cmd in documented_train_commands():
        if not cmd.resume:
            runs.append(Run(cmd))
            continue
        doc = cmd.where.rsplit(":", 1)[0]
        for run in reversed(runs):
            if run.first.where.rsplit(":", 1)[0] == doc and run.first.out == cmd.out:
                run.resumes.append(cmd)
                break
        else:
            raise AssertionError(
                f"{cmd.where}: --resume of {cmd.out!r}, but no earlier command of the same file "
                f"starts that directory: {cmd.text}"
            )
    return runs


RUNS = documented_runs()


def test_documented_commands_are_found():
    """The extraction sees every `lrnnx train` of the docs' bash blocks, and each resume
    continues a run started with the same options."""
    n_mentions = sum(text.count("lrnnx train") for path in DOCS for _, text in bash_commands(path))
    assert n_mentions == sum(1 + len(run.resumes) for run in RUNS) >= 5
    for run in RUNS:
        assert run.first.out is not None or not run.resumes, run.id
        for cmd in run.resumes:
            # the same options apart from --steps: a resume with another task or model would
            # train something else than the first command did
            assert _options_but_steps(cmd.args) == _options_but_steps(run.first.args), (
                f"{cmd.where} resumes {run.id} with other options"
            )
            assert int(_option(cmd.args, "--steps")) > int(_option(run.first.args, "--steps"))


def _options_but_steps(args: list) -> list:
    args = [a for a in _with_out(args, Path("out")) if a != "--resume"]
    kept = [
        a for i, a in enumerate(args) if a != "--steps" and (i == 0 or args[i - 1] != "--steps")
    ]
    return sorted(kept)


def _train(cmd: Command, out: Path) -> dict:
    env = {**os.environ, **cmd.env}
    argv = [sys.executable, "-m", "lrnnx.cli", "train", *_with_out(cmd.args, out)]
    try:
        proc = subprocess.run(
            argv,
            cwd=out.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{cmd.where}: still running after {TIMEOUT_S}s: {cmd.text}")
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"{cmd.where}: exit code {proc.returncode}: {cmd.text}\n{tail}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"] is not None, f"{cmd.where}: no final evaluation\n{tail}"
    steps = _option(cmd.args, "--steps")
    if steps is not None:
        assert metrics["steps_completed"] == int(steps), f"{cmd.where}\n{tail}"
    chance = metrics["chance"]
    if chance is not None:
        acc = metrics["final"]["test_acc"]
        assert acc >= MIN_RATIO * chance["acc"], (
            f"{cmd.where}: test accuracy {acc:.1%} is not {MIN_RATIO}x the chance level "
            f"{chance['acc']:.1%}: {cmd.text}\n{tail}"
        )
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS, ids=lambda run: run.id)
def test_documented_train_command(run: Run, tmp_path: Path):
    out = tmp_path / "run"
    _train(run.first, out)
    for cmd in run.resumes:
        _train(cmd, out)
