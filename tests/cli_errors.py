"""Running `dcae.cli.main` in a test: its exit code, and the check that a bad command fails with exit code 2 and
one stderr line."""
from dcae.cli import main


def exit_code(argv) -> int:
    """main(argv), with argparse's own exits (usage errors) returned as their code."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def one_line_error(capsys, argv, message):
    """The command fails with exit code 2 and one stderr line holding ``message``."""
    code = exit_code(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err, err
