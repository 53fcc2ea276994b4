"""Every command answers --help; user errors are one line with exit code 2."""

import subprocess
import sys

import pytest

from ssl_vit.cli import build_parser, main

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_commands_listed():
    assert {"pretrain", "make-shards", "export", "knn"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: ssl-vit {command}" in capsys.readouterr().out


def test_entry_points():
    for argv in (["ssl-vit", "--help"], [sys.executable, "-m", "ssl_vit", "--help"]):
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        assert "pretrain" in out and "make-shards" in out


def test_config_error_is_one_line(capsys):
    assert main(["pretrain", "--set", "model.dpeth=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ssl-vit pretrain: error: unknown config key 'model.dpeth'; did you mean 'model.depth'?"


def test_missing_shards_named(tmp_path, capsys):
    assert main(["knn", "--backbone", str(tmp_path), "--train", "x", "--val", "y"]) == 2
    assert f"no backbone weights at {tmp_path / 'backbone.safetensors'}" in capsys.readouterr().err
