"""`python -m csrc_bench`'s front (every command listed, each command's own help) and `make bench` on a machine
without CUDA (says so, then runs the smoke runs)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from csrc_bench.__main__ import COMMANDS, main
from csrc_bench.report import SMOKE_COMMANDS

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_command_on_one_line():
    out = subprocess.run([sys.executable, "-m", "csrc_bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    lines = out.splitlines()
    assert set(COMMANDS) == {"report", "model", "train", "diffusion"}
    for name, text in COMMANDS.items():
        assert f"  {name:<10} {text}" in lines, name
    assert "--smoke" in out and "not performance figures" in out


@pytest.mark.parametrize("command", ["report", "train"])
def test_command_help_is_the_commands_own(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m csrc_bench {command} ")
    assert ("--from-json" if command == "report" else "--smoke") in out


def test_unknown_or_missing_command_is_refused(capsys):
    for argv in (["bogus"], []):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("gpu", [False, True])
def test_make_bench(tmp_path, gpu):
    """A stand-in for the venv's python records its calls; its answer to the CUDA check picks the branch."""
    calls = tmp_path / "calls"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n[ "$1" != -c ] || exit {0 if gpu else 1}\n')
    python.chmod(0o755)
    stamp = tmp_path / "installed"  # -o: taken as up to date, not made
    out = subprocess.run(["make", "-s", "-o", str(stamp), "bench", f"STAMP={stamp}", f"PY={python}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    check, *runs = calls.read_text().splitlines()
    assert check.startswith("-c ") and "torch.cuda.is_available()" in check
    if gpu:
        assert runs == ["-m csrc_bench report"] and "smoke" not in out
    else:
        assert out.startswith("No CUDA GPU on this machine: nothing can be measured. Running tiny CPU smoke runs "
                              "instead: they check the benchmark code paths, they are not performance figures.\n")
        assert runs == [f"-m csrc_bench {name} --smoke" for name in SMOKE_COMMANDS]
