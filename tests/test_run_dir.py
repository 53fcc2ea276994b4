"""What a run directory holds is never overwritten unasked, changed settings on a resume are named, and a damaged
checkpoint or backbone is a one-line error naming the file and what to fall back on."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from tiny_runs import TINY_MAE

from ssl_vit.config.pretrain import load_config
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.training.checkpoint import (
    complete_checkpoints,
    export_backbone,
    export_run,
    load_backbone,
    load_checkpoint,
    reading,
)
from ssl_vit.training.loop import pretrain
from ssl_vit.training.run_dir import FINETUNING, check_run_dir

TINY = TINY_MAE + [
    "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "optim.lr=1e-3",
    "train.warmup_steps=1", "train.log_every=1", "train.image_every=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), n_train=32, n_knn_train=8, n_knn_val=8).train


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shards):
    """A 4-step run with checkpoints at steps 2 and 4 and its exported backbone; copy it before changing it."""
    run = tmp_path_factory.mktemp("runs") / "finished"
    pretrain(load_config(None, TINY + [f"data.train={shards}", f"train.run_dir={run}", "train.total_steps=4",
                                       "train.save_every=2", "train.keep_last=2"]))
    return run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _files(run: Path) -> dict[str, bytes]:
    # not the lock file, which every run takes before it reads the directory, a refused one too
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_pretraining_refuses_a_directory_that_holds_another_run_or_an_export(tmp_path, shards, finished):
    finetuned = tmp_path / "ft"
    finetuned.mkdir()
    (finetuned / "config.yaml").write_text(yaml.safe_dump({"model": {"backbone": "runs/x"}}))
    pruned = _copy(finished, tmp_path / "pruned")
    shutil.rmtree(pruned / "checkpoints")  # an export whose checkpoints are gone: the only copy of the weights
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("not a folder")
    for run, why in ((finetuned, "holds a fine-tuning run, not a pretraining run's"),
                     (blocked, "holds a file named checkpoints, where the run saves its checkpoints"),
                     (pruned, "holds an exported backbone.safetensors but no checkpoint to resume from")):
        before = _files(run)
        with pytest.raises(ValueError, match=f"train.run_dir {run} {why}"):
            pretrain(load_config(None, TINY + [f"data.train={shards}", f"train.run_dir={run}",
                                               "train.total_steps=2"]))
        assert _files(run) == before


def test_a_resume_with_changed_settings_names_them_and_keeps_the_old_config(tmp_path, shards, finished, capsys):
    run = _copy(finished, tmp_path / "run")
    old = (run / "config.yaml").read_text()
    pretrain(load_config(None, TINY + [f"data.train={shards}", f"train.run_dir={run}", "train.total_steps=6",
                                       "train.save_every=2", "train.keep_last=2", "optim.lr=2e-3"]))
    out = capsys.readouterr().out
    assert ("resuming with settings that differ from the run's config.yaml (optim.lr: 0.001 → 0.002; "
            "train.total_steps: 4 → 6)") in out
    assert "the old config is kept as config.before_step_00000004.yaml" in out
    assert (run / "config.before_step_00000004.yaml").read_text() == old
    assert load_config(run / "config.yaml").optim.lr == 2e-3


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "COMPLETE"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_note_naming_the_file(tmp_path, shards, finished, victim,
                                                                            caplog, capsys):
    """A file cut short (as by a full disk) or a marker edited (here to step 999): resume and export fall back on
    the checkpoint before, saying why in one line; the run then trains every step from there."""
    run = _copy(finished, tmp_path / "run")
    (_, older), (_, newest) = complete_checkpoints(run)
    data = (newest / victim).read_bytes()
    if victim == "COMPLETE":
        (newest / victim).write_text(json.dumps({**json.loads(data), "step": 999}))
        why = "its COMPLETE marker was edited or is from another version (its digest does not match)"
    else:
        (newest / victim).write_bytes(data[:len(data) // 2])
        why = f"{victim} has {len(data) // 2} bytes, its COMPLETE marker says {len(data)}"
    note = f"ignoring checkpoint {newest}: {why}; it counts as incomplete"
    assert json.loads((export_run(run, tmp_path / "out").with_suffix(".json")).read_text())["step"] == 2
    assert note in caplog.messages
    result = pretrain(load_config(None, TINY + [f"data.train={shards}", f"train.run_dir={run}",
                                                "train.total_steps=6"]))
    assert f"resumed from {older} (step 2)" in capsys.readouterr().out
    assert result.step == 6 and complete_checkpoints(run)[-1][0] == 6
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()][-4:] == [3, 4, 5, 6]


def test_only_what_says_damage_is_called_damage(tmp_path, shards, finished):
    (_, older), (_, newest) = complete_checkpoints(finished)
    with pytest.raises(ValueError, match=rf"^checkpoint {newest} does not load \(FileNotFoundError: .*optimizer.bin"
                                         rf".*\); if it is damaged, delete it to fall back on {older.name}$"):
        with reading(newest):
            open(newest / "gone" / "optimizer.bin")  # a file deleted by hand
    with pytest.raises(RuntimeError, match="out of memory"), reading(newest):  # not damage: passes through as is
        raise RuntimeError("CUDA out of memory")


def test_every_rank_refuses_a_checkpoint_saved_by_fewer_processes(finished):
    # Rank 0 of 2 has its own RNG file in a 1-process checkpoint; it must refuse as rank 1 does, before it loads
    # anything (or it would go on to write config.yaml while rank 1 fails).
    (_, newest) = complete_checkpoints(finished)[-1]
    rank0_of_2 = SimpleNamespace(process_index=0, num_processes=2)
    with pytest.raises(ValueError, match="holds the RNG states of 1 process\\(es\\), none for process 1: resume"):
        load_checkpoint(rank0_of_2, newest)


def test_a_bad_backbone_is_one_line_naming_the_file(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=0)
    weights = export_backbone(timm.create_model("vit_tiny_patch16_224", **kwargs), tmp_path, "vit_tiny_patch16_224",
                              kwargs)
    meta = tmp_path / "backbone.json"
    good_meta, good_weights = meta.read_text(), weights.read_bytes()
    meta.write_text(json.dumps({"model_name": "vit_tiny_patch16_224", "model_kwargs": {**kwargs, "embed_dim": 64}}))
    with pytest.raises(ValueError, match=rf"^{weights} does not fit the model backbone.json describes: "
                                         r"\S+ has shape \[48(, \d+)*\] in the weights, \[64(, \d+)*\] in this model$"):
        load_backbone(tmp_path)
    meta.write_text("{model_name: 1")
    with pytest.raises(ValueError, match=rf"^{meta}: not a backbone description \(JSONDecodeError: "):
        load_backbone(tmp_path)
    meta.write_text(good_meta)
    weights.write_bytes(good_weights[:100])
    with pytest.raises(ValueError, match=rf"^{weights} does not load \(SafetensorError: "):
        load_backbone(tmp_path)
    weights.write_bytes(good_weights)
    model, _ = load_backbone(tmp_path)  # restored: it loads again
    saved = load_file(weights)
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_a_path_that_is_no_backbone_says_what_to_give(finished):
    [*_, (_, newest)] = complete_checkpoints(finished)
    with pytest.raises(FileNotFoundError, match=rf"^{newest}/model.safetensors is a training checkpoint, not an "
                                                rf"exported backbone; export it with `ssl-vit export {finished}`"):
        load_backbone(newest / "model.safetensors")
    with pytest.raises(ValueError, match=rf"^{finished}/config.yaml: not a backbone; give a run directory or its "
                                         "backbone.safetensors$"):
        load_backbone(finished / "config.yaml")


def test_finetuning_refuses_another_run_and_a_result_it_cannot_resume(tmp_path, finished):
    check_run_dir(tmp_path / "new", FINETUNING, resuming=False)  # nothing there yet: fine
    with pytest.raises(ValueError, match=f"train.run_dir {finished} holds a pretraining run, not a fine-tuning"):
        check_run_dir(finished, FINETUNING, resuming=True)
    done = tmp_path / "done"
    (done / "best").mkdir(parents=True)
    (done / "finetune.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds a fine-tuning result \(best, finetune.json\) but no checkpoint to "
                                         "resume from: a new run would overwrite it"):
        check_run_dir(done, FINETUNING, resuming=False)
    check_run_dir(done, FINETUNING, resuming=True)  # with its checkpoints it goes on where it stopped
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=f"train.run_dir {afile} is a file, not a directory"):
        check_run_dir(afile, FINETUNING, resuming=False)


def test_a_resume_on_fewer_processes_says_what_it_changes(tmp_path):
    from ssl_vit.training.run_dir import process_count_notice

    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    for rank in range(4):
        (ckpt / f"random_states_{rank}.pkl").write_bytes(b"")
    cfg = load_config(None, ["data.batch_size=8", "optim.accum_steps=2"])
    assert process_count_notice(cfg, ckpt, 4) is None
    assert process_count_notice(cfg, ckpt, 2) == (
        "note: step_00000010 was saved by 4 processes, this run has 2: global batch 64 → 32, and the peak lr "
        "(optim.base_lr × global batch / 256) with it; raise optim.accum_steps to keep them")
    fixed_lr = load_config(None, ["data.batch_size=8", "optim.lr=1e-3"])
    assert process_count_notice(fixed_lr, ckpt, 1).endswith("global batch 32 → 8; raise optim.accum_steps to keep them")
