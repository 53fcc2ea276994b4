"""Every command answers --help; user errors are one line with exit code 2."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_vit.cli.main import build_parser, main

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
    # the console script pip installed beside this interpreter: a venv's bin/ need not be on PATH
    script = str(Path(sys.executable).parent / "ssl-vit")
    for argv in ([script, "--help"], [sys.executable, "-m", "ssl_vit", "--help"]):
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        assert "pretrain" in out and "make-shards" in out


def test_config_error_is_one_line(capsys):
    assert main(["pretrain", "--set", "model.dpeth=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ssl-vit pretrain: error: unknown config key 'model.dpeth'; did you mean 'model.depth'?"


def test_missing_shards_named(tmp_path, capsys):
    assert main(["knn", "--backbone", str(tmp_path), "--train", "x", "--val", "y"]) == 2
    assert f"no backbone weights at {tmp_path / 'backbone.safetensors'}" in capsys.readouterr().err


def test_config_prints_pretraining_and_fine_tuning_recipes(capsys):
    assert main(["config", "finetune_vit_base_p16", "--set", "optim.layer_decay=0.5"]) == 0
    out = capsys.readouterr().out
    assert "backbone: runs/mae_vit_base_p16" in out and "layer_decay: 0.5" in out
    assert main(["config", "mae_demo_tiny"]) == 0
    assert "objective: mae" in capsys.readouterr().out
    # a typo in a fine-tuning recipe's key is named against the fine-tuning keys
    assert main(["config", "finetune_demo_tiny", "--set", "optim.layer_decayy=1"]) == 2
    assert "did you mean 'optim.layer_decay'?" in capsys.readouterr().err


def test_a_fine_tuning_recipe_is_told_by_its_keys_whatever_their_order(tmp_path, capsys):
    # its first section (data.val, augment) is no pretraining key: the error must still be the fine-tuning one
    recipes = {"data_first.yaml": "data: {val: x.tar, train: y.tar}\nmodel: {backbone: runs/mae_demo}\n",
               "augment_first.yaml": "augment: {mixup: 0.8}\nmodel: {backbone: runs/mae_demo}\n"}
    for name, text in recipes.items():
        (tmp_path / name).write_text(text)
    assert main(["config", str(tmp_path / "data_first.yaml"), "--set", "optim.layr_decay=0.7"]) == 2
    assert "did you mean 'optim.layer_decay'?" in capsys.readouterr().err
    assert main(["config", str(tmp_path / "augment_first.yaml"), "--set", "augment.mixupp=0.5"]) == 2
    assert "did you mean 'augment.mixup'?" in capsys.readouterr().err
    # no fine-tuning-only key in the recipe but its data.val, the backbone given on the command line
    (tmp_path / "no_backbone.yaml").write_text("data: {val: x.tar, num_classes: 10}\ntrain: {epochs: 5}\n")
    assert main(["config", str(tmp_path / "no_backbone.yaml"), "--set", "model.backbone=runs/x"]) == 0
    assert "backbone: runs/x" in capsys.readouterr().out


def test_pretrain_refuses_a_fine_tuning_recipe_naming_the_command(capsys):
    assert main(["pretrain", "finetune_demo_tiny"]) == 2
    assert capsys.readouterr().err.strip() == ("ssl-vit pretrain: error: finetune_demo_tiny is a fine-tuning recipe: "
                                               "run `ssl-vit finetune finetune_demo_tiny`")


def test_finetune_refuses_a_pretraining_recipe_naming_the_command(capsys):
    # the mirror of the case above; it used to say "unknown config key 'objective'"
    assert main(["finetune", "mae_demo_tiny"]) == 2
    assert capsys.readouterr().err.strip() == ("ssl-vit finetune: error: mae_demo_tiny is a pretraining recipe: "
                                               "run `ssl-vit pretrain mae_demo_tiny`")


def test_a_mistyped_recipe_name_names_the_closest_recipe(capsys):
    assert main(["config", "mae_vit_bse_p16"]) == 2
    assert capsys.readouterr().err.strip() == ("ssl-vit config: error: recipe not found: mae_vit_bse_p16; "
                                               "did you mean 'mae_vit_base_p16'?")
    assert main(["config", "nothing_like_any_recipe"]) == 2
    assert capsys.readouterr().err.strip() == "ssl-vit config: error: recipe not found: nothing_like_any_recipe"


def test_config_refuses_a_value_that_would_train_wrongly(capsys):
    assert main(["config", "--set", "model.patch_size=0"]) == 2  # was a ZeroDivisionError traceback
    assert capsys.readouterr().err.strip() == "ssl-vit config: error: model.patch_size: must be at least 1, got 0"


def test_missing_knn_shards_fail_before_training(tmp_path, capsys):
    run_dir, shards = tmp_path / "run", tmp_path / "shards"
    shards.mkdir()
    argv = ["pretrain", "--set", f"train.run_dir={run_dir}", "--set", f"data.train={shards}",
            "--set", f"eval.knn_train={shards}", "--set", f"eval.knn_val={tmp_path / 'missing.tar'}"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == ("ssl-vit pretrain: error: eval.knn_train: no *.tar shards in "
                                               f"directory {shards}")
    (shards / "a.tar").write_bytes(b"")
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == ("ssl-vit pretrain: error: eval.knn_val: shard not found: "
                                               f"{tmp_path / 'missing.tar'}")
    assert not run_dir.exists()  # nothing trained, nothing written


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints/.tmp_step_5/model.safetensors"),
     "No space left on device: runs/x/checkpoints/.tmp_step_5/model.safetensors"),
    (OSError(errno.EROFS, "Read-only file system", "runs/x"), "Read-only file system: runs/x"),
    (PermissionError(errno.EACCES, "Permission denied", "runs/x/config.yaml"), "Permission denied: runs/x/config.yaml"),
    (FileExistsError(errno.EEXIST, "File exists", "runs/x"), "File exists: runs/x"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "runs/x/log.jsonl"), "Not a directory: runs/x/log.jsonl"),
])
def test_a_filesystem_error_is_one_line_with_exit_1(monkeypatch, capsys, error, line):
    def fails(args):
        raise error

    monkeypatch.setattr("ssl_vit.cli.main._cmd_config", fails)
    assert main(["config"]) == 1
    assert capsys.readouterr().err.strip() == f"ssl-vit config: error: {line}"


def test_a_real_filesystem_error_is_one_line(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "src" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "cat" / "a.png")
    afile = tmp_path / "afile"
    afile.write_text("x")  # the output folder's parent is a file
    assert main(["make-shards", str(tmp_path / "src"), str(afile / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"ssl-vit make-shards: error: Not a directory: {afile / 'out'}"


def test_a_missing_folder_the_os_names_is_one_line_without_errno(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "src" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "cat" / "a.png")
    assert main(["make-shards", str(tmp_path / "src"), "/proc/ssl_vit_no_such/out"]) == 2  # /proc takes no folder
    err = capsys.readouterr().err.strip()
    assert err == "ssl-vit make-shards: error: No such file or directory: /proc/ssl_vit_no_such"


def test_a_bug_is_not_hidden_as_a_filesystem_error(monkeypatch):
    def buggy(args):
        raise TypeError("a real bug")

    monkeypatch.setattr("ssl_vit.cli.main._cmd_config", buggy)
    with pytest.raises(TypeError, match="a real bug"):
        main(["config"])


def test_ctrl_c_during_startup_is_one_line_with_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("ssl_vit.cli.main._cmd_config", interrupted)
    assert main(["config"]) == 130
    assert capsys.readouterr().err.strip() == "ssl-vit config: interrupted"


_EVAL = ["--backbone", "b", "--train", "t", "--val", "v"]


@pytest.mark.parametrize("argv, rule", [
    # `--lr nan` / `--lr -1` trained and reported a best head with exit code 0
    (["linear-probe", *_EVAL, "--lr", "nan"], "a finite number > 0"),
    (["linear-probe", *_EVAL, "--lr", "0.1", "-1"], "a finite number > 0"),
    (["linear-probe", *_EVAL, "--lr", "inf"], "a finite number > 0"),
    (["linear-probe", *_EVAL, "--wd", "nan"], "a finite number ≥ 0"),
    (["linear-probe", *_EVAL, "--wd", "-0.05"], "a finite number ≥ 0"),
    (["linear-probe", *_EVAL, "--epochs", "0"], "an integer ≥ 1"),
    (["linear-probe", *_EVAL, "--epochs", "two"], "an integer ≥ 1"),
    (["linear-probe", *_EVAL, "--warmup-epochs", "-1"], "an integer ≥ 0"),
    (["linear-probe", *_EVAL, "--batch-size", "0"], "an integer ≥ 1"),
    (["linear-probe", *_EVAL, "--extract-batch-size", "0"], "an integer ≥ 1"),
    (["linear-probe", *_EVAL, "--train-size", "0"], "an integer ≥ 1"),
    (["linear-probe", *_EVAL, "--num-workers", "-1"], "an integer ≥ 0"),
    (["linear-probe", *_EVAL, "--n-last-blocks", "0"], "an integer ≥ 1"),
    (["linear-probe", *_EVAL, "--crop-ratio", "1.5"], "a finite number in (0, 1]"),
    (["knn", *_EVAL, "--k", "20", "0"], "an integer ≥ 1"),
    (["knn", *_EVAL, "--temperature", "nan"], "a finite number > 0"),
    (["knn", *_EVAL, "--temperature", "0"], "a finite number > 0"),
    (["knn", *_EVAL, "--batch-size", "0"], "an integer ≥ 1"),
    (["knn", *_EVAL, "--num-workers", "-2"], "an integer ≥ 0"),
    (["knn", *_EVAL, "--crop-ratio", "0"], "a finite number in (0, 1]"),
    (["knn", *_EVAL, "--random-init", "--seed", "99999999999999999999"], "an integer in [0, 9223372036854775807]"),
    (["linear-probe", *_EVAL, "--seed", "-1"], "an integer in [0, 9223372036854775807]"),
    (["visualize", "--seed", "1" + "0" * 400], "an integer in [0, 9223372036854775807]"),  # no OverflowError
    (["visualize", "--n", "0"], "an integer ≥ 1"),
    (["visualize", "--keep", "1.5"], "a finite number in (0, 1]"),
    (["visualize", "--scale", "0"], "an integer ≥ 1"),
    (["visualize", "--crop-ratio", "nan"], "a finite number in (0, 1]"),
    (["make-shards", "src", "out", "--max-size-mb", "nan"], "a finite number > 0"),
    (["make-shards", "src", "out", "--max-count", "0"], "an integer ≥ 1"),
    (["benchmark-suite", "--steps", "0"], "an integer ≥ 1"),
    (["benchmark-suite", "--case-timeout", "0"], "a finite number > 0"),
    (["benchmark", "--steps", "0"], "an integer ≥ 1"),
    (["benchmark", "--peak-tflops", "-1"], "a finite number > 0"),
])
def test_a_number_that_can_never_work_is_refused_at_parse_time_in_one_line(capsys, argv, rule):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    flag = next(a for a in reversed(argv) if a.startswith("--"))  # the refused value is the last one
    assert capsys.readouterr().err == f"ssl-vit {argv[0]}: error: argument {flag}: must be {rule}, got {argv[-1]}\n"


@pytest.mark.parametrize("argv, message", [
    # the benchmark ran to the end, then its JSON was lost ("[Errno 21] Is a directory"); the suite said "File exists"
    (["benchmark", "--out", "{d}"], "--out {d} is a folder; give a file path, e.g. {d}/benchmark.json"),
    (["benchmark", "--out", "{f}/b.json"], "--out {f}/b.json: {f} is a file, not a folder"),
    (["benchmark-suite", "--quick", "--out", "{f}"], "--out {f} is a file, not a folder"),
])
def test_benchmark_outputs_are_checked_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    def no_run(*args, **kwargs):
        raise AssertionError("ran before the output was checked")

    monkeypatch.setattr("ssl_vit.bench.benchmark.run_benchmark", no_run)
    monkeypatch.setattr("ssl_vit.bench.suite.run_suite", no_run)
    d, f = tmp_path / "dir", tmp_path / "file"
    d.mkdir()
    f.write_text("")
    argv = [a.format(d=d, f=f) for a in argv]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"ssl-vit {argv[0]}: error: {message.format(d=d, f=f)}\n"


def test_benchmark_json_goes_into_a_folder_yet_to_be_made(tmp_path):
    out = tmp_path / "new" / "b.json"
    argv = ["benchmark", "--loader-only", "--steps", "1", "--decode-samples", "5", "--loader-rounds", "1"]
    assert main([*argv, "--out", str(out)]) == 0  # was FileNotFoundError after the benchmark had run
    assert json.loads(out.read_text())["steps"] == 1
