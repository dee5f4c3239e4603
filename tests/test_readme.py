"""The README's commands as written: every `graphopt ...` line in its shell blocks parses with the
command line graphopt ships (so an option renamed or removed breaks this test, not a user's first
hour), and the recipes on bundled models run in order in an empty directory (`slow`: minutes)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from graphopt.front import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def shell_commands() -> list[str]:
    """Each command of the README's ```sh blocks: continuations joined, comments and `&&` split."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


def graphopt_commands() -> list[list[str]]:
    return [shlex.split(c)[1:] for c in shell_commands() if c.startswith("graphopt ")]


def test_the_readme_has_the_recipes_it_promises():
    names = {argv[0] for argv in graphopt_commands()}
    assert {"inspect", "optimize", "compile", "run", "bench", "serve", "tune", "evaluate"} <= names, names
    assert any(c.startswith("python3 -m pytest") for c in shell_commands())


@pytest.mark.parametrize("argv", graphopt_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv):
    parser = cli.build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's answer to an unknown option or a bad value
        pytest.fail(f"README command 'graphopt {' '.join(argv)}' does not parse (exit {e.code})")
    assert args.command == argv[0]


def _runnable(argv: list[str]) -> bool:
    """Commands on bundled models or on files an earlier README command writes; not serve (it runs
    until stopped) nor loadtest (it needs that server), and not the searches (tune, search: 20 minutes each)
    or what reads their results."""
    return argv[0] not in ("serve", "loadtest", "tune", "search") and not any(
        a in ("model.onnx", "in.npz", "db/", "search/best.json") for a in argv)


@pytest.mark.slow
def test_readme_recipes_on_bundled_models_run_in_order(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ran = []
    for argv in graphopt_commands():
        if not _runnable(argv):
            continue
        proc = subprocess.run([sys.executable, "-m", "graphopt.front.cli", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"graphopt {' '.join(argv)}\n{proc.stderr[-2000:]}"
        ran.append(argv[0])
    assert {"compile", "bench", "optimize", "evaluate"} <= set(ran), ran
