"""The nmtserve command dispatcher and the settings helpers."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nmtserve.settings import add_settings_arguments, settings_from_args


def nmtserve(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nmtserve.cli", *args], capture_output=True, text=True, **kwargs)


def test_help_lists_every_command():
    result = nmtserve("--help")
    assert result.returncode == 0
    for command in ("train", "evaluate", "plot", "export", "import-marian", "translate", "bench-engine", "corpus"):
        assert command in result.stdout


def test_unknown_command_is_an_error():
    result = nmtserve("fly")
    assert result.returncode == 2 and "invalid choice: 'fly'" in result.stderr


def test_missing_extra_is_named():
    code = "import sys; sys.modules['torch'] = None; from nmtserve.cli import main; sys.exit(main(['train']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert "install the 'train' extra: pip install -e '.[train]' in the nmtserve checkout" in result.stderr


@dataclass
class Example:
    out: Path = field(default=Path("x"), metadata={"help": "where"})
    steps: int = field(default=3, metadata={"help": "how many"})
    rate: float = field(default=0.5, metadata={"help": "how fast"})
    resume: bool = field(default=False, metadata={"help": "again"})
    mode: str = field(default="quiet", metadata={"help": "how loud", "choices": ("quiet", "chatty")})
    port: int | None = field(default=None, metadata={"help": "where else"})


def parse(args: list[str]) -> Example:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, Example)
    return settings_from_args(Example, parser.parse_args(args))


def test_settings_flags_environment_and_defaults(monkeypatch):
    assert parse([]) == Example()
    monkeypatch.setenv("NMTSERVE_STEPS", "7")
    monkeypatch.setenv("NMTSERVE_RESUME", "true")
    assert parse([]) == Example(steps=7, resume=True)
    assert parse(["--steps", "9", "--no-resume", "--out", "y"]) == Example(out=Path("y"), steps=9, resume=False)
    # An empty variable is unset, as a templated manifest leaves one: not "", ".", or a number that fails to parse.
    for variable in ("NMTSERVE_STEPS", "NMTSERVE_RESUME", "NMTSERVE_OUT", "NMTSERVE_MODE"):
        monkeypatch.setenv(variable, "")
    assert parse([]) == Example()


def test_an_empty_flag_unsets_an_optional_setting_the_environment_set(monkeypatch):
    monkeypatch.setenv("NMTSERVE_PORT", "9")
    assert parse([]) == Example(port=9)
    assert parse(["--port="]) == Example(port=None)
    with pytest.raises(SystemExit):
        parse(["--steps="])  # a setting that must have a value keeps needing one


@pytest.mark.parametrize("value", ["1_000", "\u0661\u0662", "nan", "inf", "-Infinity", "0x10", "", "1e999"])
def test_numbers_are_plain_decimals(capsys, value):
    # int() and float() take these; no setting means them, and 1_000 read as 1000 hides a typo.
    for flag in ("--steps", "--rate"):
        with pytest.raises(SystemExit) as exited:
            parse([f"{flag}={value}"])
        assert exited.value.code == 2 and "invalid" in capsys.readouterr().err
    assert parse(["--steps", "-12", "--rate", "1.5e-3"]) == Example(steps=-12, rate=1.5e-3)
    assert parse(["--rate", ".5"]) == Example(rate=0.5)


def test_the_commands_own_numeric_flags_read_numbers_as_the_settings_do():
    for command, flag_ in (("translate", "--wait"), ("translate", "--max-length"), ("bench-serve", "--streams")):
        result = nmtserve(command, flag_, "1_0", "Friday")
        assert result.returncode == 2 and f"argument {flag_}: invalid" in result.stderr, (command, flag_)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [("NMTSERVE_RATE", "fast", "NMTSERVE_RATE='fast' is not a valid float"),
     ("NMTSERVE_STEPS", "1_000", "NMTSERVE_STEPS='1_000' is not a valid int"),
     ("NMTSERVE_MODE", "loud", "NMTSERVE_MODE='loud' is not one of quiet, chatty")],
)
def test_bad_environment_value_is_a_usage_error_naming_the_variable(monkeypatch, capsys, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        parse([])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_environment_value_hides_neither_the_help_nor_a_flag_given_instead(monkeypatch, capsys):
    monkeypatch.setenv("NMTSERVE_RATE", "fast")
    monkeypatch.setenv("NMTSERVE_RESUME", "maybe")
    # An image's variables, overridden on the command line.
    assert parse(["--rate", "0.25", "--no-resume"]) == Example(rate=0.25, resume=False)
    with pytest.raises(SystemExit) as exited:
        parse(["--help"])
    help_text = capsys.readouterr().out
    assert exited.value.code == 0 and "[env NMTSERVE_RATE; default: fast]" in help_text and "default: maybe]" in help_text
    with pytest.raises(SystemExit) as exited:
        parse(["--rate", "0.25"])
    assert exited.value.code == 2 and "NMTSERVE_RESUME='maybe' is not a boolean" in capsys.readouterr().err


def test_a_directory_flag_is_refused_where_a_file_or_a_dangling_link_is_in_the_way(tmp_path, monkeypatch):
    from nmtserve.settings import directory_problem

    (tmp_path / "afile").write_text("notes")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    monkeypatch.chdir(tmp_path)
    assert directory_problem("--out", Path("afile"), "it") == "--out afile is a file; name a directory for it"
    assert directory_problem("--out", Path("afile/run"), "it") == "--out afile/run is inside afile, a file; name a directory for it"
    assert directory_problem("--out", Path("dangling"), "it").startswith("--out dangling is a link to nothing")
    for fine in ("new/run", ".", ".."):
        assert directory_problem("--out", Path(fine), "it") is None, fine
