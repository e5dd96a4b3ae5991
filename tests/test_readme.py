"""Every code block of the README runs as written: the Python blocks are executed (on CPU they pick the CPU and
stay small), and every ``dcae`` command of the shell blocks is accepted by the real command-line parser."""
import re
import shlex
from pathlib import Path

import pytest

from dcae.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(language: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(README.read_text()) if lang == language]


def dcae_commands() -> list[list[str]]:
    """The argument lists of every ``dcae ...`` command in the shell blocks (also after ``torchrun ... -m``)."""
    commands = []
    for code in blocks("sh"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0])
            if words[:1] == ["dcae"]:
                commands.append(words[1:])
            elif words[:1] == ["torchrun"] and "-m" in words and words[words.index("-m") + 1] == "dcae":
                commands.append(words[words.index("-m") + 2:])
    return commands


def test_the_readme_has_code():
    assert len(blocks("python")) >= 3 and len(dcae_commands()) >= 8


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks("python")[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("argv", dcae_commands(), ids=lambda argv: " ".join(argv[:3]))
def test_dcae_command_parses(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.func)
