"""`model.init`: a run starts from a timm weights file, a Hugging Face cache, an ssl_vit export or another run's
checkpoint; the backbone (and a DINO teacher's copy) equals the source at step 0; what does not fit is one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from tiny_runs import TINY_MAE

from ssl_vit.config.pretrain import ConfigError, load_config
from ssl_vit.methods import build_objective
from ssl_vit.models.backbone import backbone_kwargs, build_backbone, encode
from ssl_vit.models.init_weights import init_objective
from ssl_vit.training.checkpoint import load_run_objective

HEADS = ["dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.local_crops_number=2",
         "dino.local_crops_size=16", "dinov2.out_dim=64", "dinov2.hidden_dim=32", "dinov2.bottleneck_dim=16",
         "dinov2.local_crops_number=2", "dinov2.local_crops_size=16", "dinov2.ibot_out_dim=40",
         "dinov2.ibot_hidden_dim=32", "dinov2.ibot_bottleneck_dim=16"]
NAME = "vit_tiny_patch16_224"
ARCH = f"{NAME} (embed_dim 48, depth 2)"


def source_vit(**kwargs) -> torch.nn.Module:
    """The tiny ViT of the other tests, as timm builds it (a 10-class head unless told otherwise)."""
    torch.manual_seed(1)
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2, "num_classes": 10} | kwargs
    return timm.create_model(NAME, **args).eval()


def save(vit: torch.nn.Module, path: Path) -> Path:
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    return path


def start(objective: str, init: Path | str, *overrides: str):
    """The objective a new run builds from `model.init` (what loop.py does before the first step), and the line
    it prints."""
    cfg = load_config(None, [*TINY_MAE, *HEADS, f"objective={objective}", f"model.init={init}", *overrides])
    built = build_objective(cfg.objective, getattr(cfg, cfg.objective), build_backbone(cfg.model), total_steps=10)
    return built, init_objective(built, cfg.model), cfg


def vits(objective: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in objective.modules() if isinstance(m, timm.models.vision_transformer.VisionTransformer)]


@pytest.mark.parametrize("objective", ["mae", "dino", "dinov2"])
@pytest.mark.parametrize("layout", ["plain", "registers+layerscale"])
def test_every_objective_starts_with_the_source_features(tmp_path, objective, layout):
    extra = {"reg_tokens": 4, "init_values": 0.1} if layout != "plain" else {}
    source = source_vit(**extra)
    path = save(source, tmp_path / ("w.pth" if extra else "w.safetensors"))
    overrides = ["model.reg_tokens=4", "model.layer_scale_init=1e-5"] if extra else []
    built, line, _ = start(objective, path, *overrides)
    n_tensors = len(source.state_dict()) - 2  # the classifier is dropped
    assert line == f"model.init: loaded {n_tensors} tensors from {path} (timm weights)"
    copies = vits(built)
    assert len(copies) == (1 if objective == "mae" else 2)  # a DINO teacher starts from the weights too
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = source.forward_features(x)
        for vit in copies:
            vit.eval()
            assert torch.equal(vit.forward_features(x), want)
            assert torch.equal(encode(vit, x), want)


@pytest.mark.parametrize("objective", ["dino", "dinov2"])
def test_the_gram_anchor_is_the_starting_backbone(tmp_path, objective):
    source = source_vit()
    built, _, _ = start(objective, save(source, tmp_path / "w.safetensors"), f"{objective}.gram_loss_weight=1")
    copies = vits(built)  # student, EMA teacher, Gram anchor
    assert len(copies) == 3
    for vit in copies:
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in vit.state_dict().items())


def test_positions_are_resampled_as_timm_resamples_them(tmp_path):
    source = source_vit()
    path = save(source, tmp_path / "w.safetensors")
    built, line, cfg = start("dino", path, "model.img_size=48")
    assert line.endswith("(timm weights); pos_embed resampled from 4x4 to 6x6 patches")
    want = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    for vit in vits(built):
        assert torch.equal(vit.pos_embed.detach(), want)
    # and every tensor as timm's own loader gives it (its checkpoint filter; its classifier dropped)
    # (custom_load off: timm 1.0.16 would read this model's file as JAX .npz)
    timm_loaded = timm.create_model(NAME, pretrained=True, **backbone_kwargs(cfg.model),
                                    pretrained_cfg_overlay={"file": str(path), "custom_load": False})
    theirs = timm_loaded.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in built.backbone.state_dict().items())


def test_an_original_dinov2_file_loads_as_timm_converts_it(tmp_path):
    """facebookresearch/dinov2's layout: registers named register_tokens, a positioned cls token, a mask token."""
    source = source_vit(num_classes=0, reg_tokens=4, no_embed_class=True, init_values=0.1)
    state = dict(source.state_dict())
    cls, cls_position = state["cls_token"], -state["cls_token"]  # timm adds them up: 2c - c is exact in floats
    state |= {"register_tokens": state.pop("reg_token"), "mask_token": torch.zeros(1, 48),
              "cls_token": cls - cls_position, "pos_embed": torch.cat([cls_position, state["pos_embed"]], 1)}
    path = tmp_path / "dinov2.pth"
    torch.save(state, path)
    built, line, _ = start("dinov2", path, "model.name=vit_small_patch14_reg4_dinov2")
    assert line == f"model.init: loaded {len(source.state_dict())} tensors from {path} (timm weights)"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for vit in vits(built):
            assert torch.equal(vit.eval().forward_features(x), source.forward_features(x))
    with pytest.raises(ValueError) as err:  # timm's *_reg* layout positions no prefix token: vit_tiny's does
        start("mae", save(source, tmp_path / "reg.safetensors"), "model.reg_tokens=4", "model.layer_scale_init=0.1")
    assert str(err.value) == (f"model.init: {tmp_path / 'reg.safetensors'} does not convert to {NAME} (RuntimeError: "
                              "shape '[1, 3, 3, -1]' is invalid for input of size 528); its pos_embed has 16 "
                              f"positions, {NAME}'s 21: the file positions its cls and register tokens otherwise, "
                              "use the model.name it was saved from")


def test_a_file_of_the_wrong_size_fails_in_one_line(tmp_path):
    wide = save(source_vit(embed_dim=32), tmp_path / "w32.safetensors")
    with pytest.raises(ValueError) as err:
        start("mae", wide)
    assert str(err.value) == (f"model.init: {wide} does not fit {ARCH}: cls_token is [1, 1, 32] in the file, "
                              "[1, 1, 48] in the model (and 29 more)")
    whole = save(source_vit(), tmp_path / "w.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError) as err:
        start("mae", cut)
    said = f"model.init: {cut} does not load (SafetensorError: Error while deserializing header: "
    # safetensors' own words: newer versions, the floor's
    assert str(err.value) in (said + "incomplete metadata, file not fully covered)", said + "MetadataIncompleteBuffer)")
    pickled = save(source_vit(), tmp_path / "w.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(pickled[: len(pickled) // 2])
    with pytest.raises(ValueError) as err:
        start("mae", cut)
    assert str(err.value) == (f"model.init: {cut} does not load (RuntimeError: PytorchStreamReader failed reading "
                              "zip archive: failed finding central directory)")


@pytest.mark.parametrize(("source", "overrides", "problem"), [
    ({"depth": 3}, [], "blocks.2.attn.proj.bias is in the file, not in the model (and 11 more)"),
    ({"depth": 1}, [], "blocks.1.norm1.weight is in the model, not in the file (and 11 more)"),
    ({"init_values": 0.1}, [], "blocks.0.ls1.gamma is in the file, not in the model (and 3 more); the file has "
     "LayerScale: set model.layer_scale_init (any value: the file's gains replace it)"),
    ({}, ["model.layer_scale_init=0.1"], "blocks.0.ls1.gamma is in the model, not in the file (and 3 more); the "
     "file has no LayerScale: leave model.layer_scale_init null"),
])
def test_missing_and_unexpected_keys_are_one_line(tmp_path, source, overrides, problem):
    path = save(source_vit(**source), tmp_path / "w.safetensors")
    with pytest.raises(ValueError) as err:
        start("dinov2", path, *overrides)
    assert str(err.value) == f"model.init: {path} does not fit {ARCH}: {problem}"


def test_registers_must_match_and_forms_must_exist(tmp_path):
    path = save(source_vit(reg_tokens=4), tmp_path / "w.safetensors")
    with pytest.raises(ValueError) as err:
        start("mae", path)
    assert str(err.value) == (f"model.init: {path} has 4 register tokens, this run's model 0: set "
                              "model.reg_tokens=4 (or a model.name with them)")
    for given, said in [
            (tmp_path / "none.safetensors", "is no file or directory (nor an hf-hub:org/name id)"),
            (Path(__file__), "is no weights file (.safetensors, .pth, .pt, .bin)"),
            (tmp_path, "holds neither backbone.safetensors nor a complete checkpoint (checkpoints/step_N)")]:
        with pytest.raises(ValueError) as err:
            start("mae", given)
        assert str(err.value) == f"model.init: {given} {said}"
    plain = save(source_vit(), tmp_path / "plain.safetensors")  # 0 registers into a model with 4 of its own
    with pytest.raises(ValueError) as err:
        start("mae", plain, "model.name=vit_small_patch14_reg4_dinov2", "model.num_heads=2")
    assert str(err.value).endswith("has 0 register tokens, this run's model 4: use a model.name without them "
                                   "(model.reg_tokens 0 keeps the timm model's own)")
    with pytest.raises(ConfigError, match=r"^model.init: 'hf-hub:vit_small' is no hub id; write hf-hub:org/name"):
        load_config(None, ["model.init=hf-hub:vit_small"])
    assert load_config(None, ["model.init=hf-hub:timm/vit_small@refs/pr/3"]).model.init.endswith("refs/pr/3")


def test_init_strict_false_loads_what_fits_and_names_the_rest(tmp_path):
    source = source_vit(depth=3)  # one block more than the run's model
    path = save(source, tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match="blocks.2.attn.proj.bias is in the file, not in the model"):
        start("dino", path)
    built, line, _ = start("dino", path, "model.init_strict=false")
    assert line == (f"model.init: loaded 30 tensors from {path} (timm weights); not loaded (model.init_strict "
                    "false): blocks.2.attn.proj.bias is in the file, not in the model (and 11 more)")
    want = source.state_dict()
    for vit in vits(built):
        assert all(torch.equal(v, want[k]) for k, v in vit.state_dict().items())


def test_a_run_starts_from_weights_resumes_without_them_and_is_a_source_itself(tmp_path, capsys):
    """A real DINO run from a timm file: its first step has lr 0 (warmup), so its export still equals the source;
    the resume needs no init file; the run dir, its export and its checkpoints are sources in turn."""
    from ssl_vit.data.demo import ensure_demo_data
    from ssl_vit.training.loop import pretrain

    demo = ensure_demo_data(tmp_path / "demo", n_train=16, n_knn_train=4, n_knn_val=4)
    source = source_vit()
    init = save(source, tmp_path / "w.safetensors")
    run = tmp_path / "run"
    settings = [*TINY_MAE, *HEADS, "objective=dino", f"data.train={demo.train}", "data.batch_size=4",
                "data.num_workers=0", "data.shuffle_buffer=8", "optim.lr=1e-3", "train.warmup_steps=1",
                "train.log_every=1", "train.image_every=0", "train.save_every=1", "train.keep_last=5",
                f"train.run_dir={run}", f"model.init={init}"]
    pretrain(load_config(None, [*settings, "train.total_steps=1"]))
    assert f"model.init: loaded 30 tensors from {init} (timm weights)\n" in capsys.readouterr().out
    export, _, _ = start("mae", run)  # the run dir: its export, the teacher's backbone
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in export.backbone.state_dict().items())

    init.unlink()  # a resume takes its weights from the checkpoint, and never asks for these
    assert pretrain(load_config(None, [*settings, "train.total_steps=2"])).step == 2
    assert "model.init" not in capsys.readouterr().out
    trained, step = load_run_objective(run)
    teacher = trained.teacher["backbone"].state_dict()
    assert step == 2 and not torch.equal(teacher["cls_token"], trained.backbone.state_dict()["cls_token"])

    _, line, _ = start("mae", run / "backbone.safetensors")  # the export, written after step 2
    assert line == f"model.init: loaded 30 tensors from {run / 'backbone.safetensors'} (ssl_vit export: dino, step 2)"
    for name in ("backbone.safetensors", "backbone.json"):
        (run / name).unlink()
    for given, step_dir in [(run, "step_00000002"), (run / "checkpoints" / "step_00000001", "step_00000001")]:
        built, line, _ = start("dinov2", given)
        path = run / "checkpoints" / step_dir
        assert line == (f"model.init: loaded 30 tensors from {path} (checkpoint of a DINO run at step "
                        f"{int(step_dir[-1])}: its teacher.backbone)")
        want = teacher if step_dir.endswith("2") else source.state_dict()
        for vit in vits(built):
            assert all(torch.equal(v, want[k]) for k, v in vit.state_dict().items())


def test_the_knn_after_pretrain_also_scores_the_initial_weights(tmp_path, capsys):
    """The model.init baseline scores exactly what the source model scores, whatever training did after; a lost
    init file costs only that baseline."""
    import json

    from ssl_vit.cli.main import main
    from ssl_vit.data.demo import ensure_demo_data
    from ssl_vit.eval.knn import knn_report
    from ssl_vit.training.distributed import make_accelerator

    demo = ensure_demo_data(tmp_path / "demo", n_train=16, n_knn_train=20, n_knn_val=10)
    init = save(source_vit(), tmp_path / "w.safetensors")
    run = tmp_path / "run"
    settings = [*TINY_MAE, f"data.train={demo.train}", "data.batch_size=4", "data.num_workers=0",
                "data.shuffle_buffer=8", "optim.lr=0.05", "train.warmup_steps=0", "train.total_steps=1",
                "train.image_every=0", f"train.run_dir={run}", f"model.init={init}",
                f"eval.knn_train={demo.knn_train}", f"eval.knn_val={demo.knn_val}", "eval.knn_k=5",
                "eval.num_workers=0", "eval.crop_ratio=1.0"]
    assert main(["pretrain", *[a for kv in settings for a in ("--set", kv)]]) == 0
    summary = json.loads((run / "knn.json").read_text())
    cfg = load_config(None, settings)
    source = knn_report(source_vit(), cfg.eval, make_accelerator()).scores[5]  # the file it started from
    assert summary["model.init"] == source  # not the trained backbone's (10 images: the scores may still tie)
    top1 = summary["model.init"]["top1"]
    assert f"; model.init {top1:.1f}% (top-5: " in capsys.readouterr().out

    init.unlink()
    resumed = [kv for kv in settings if not kv.startswith("train.total_steps")] + ["train.total_steps=2"]
    assert main(["pretrain", *[a for kv in resumed for a in ("--set", kv)]]) == 0
    assert "model.init" not in json.loads((run / "knn.json").read_text())
    assert f"warning: no k-NN of the initial weights: model.init: {init} is no file" in capsys.readouterr().err


def test_a_hub_id_loads_from_the_local_cache_offline(tmp_path):
    """The Hugging Face cache layout (models--org--name/refs/main → snapshots/<commit>/), filled by hand; the
    child process runs with HF_HUB_OFFLINE=1, so huggingface_hub reads that cache and nothing else."""
    source = source_vit()
    repo = tmp_path / "hub" / "models--acme--tiny-vit"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save(source, repo / "snapshots" / commit / "model.safetensors")
    save(source, tmp_path / "w.safetensors")
    script = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from ssl_vit.models.init_weights import read_init\n"
        "state, what = read_init('hf-hub:acme/tiny-vit')\n"
        "want = load_file(sys.argv[1])\n"
        "assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)\n"
        "print(what)\n"
        "try:\n"
        "    read_init('hf-hub:acme/absent')\n"
        "except ValueError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w.safetensors")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found, absent = done.stdout.splitlines()
    assert found == "hf-hub:acme/tiny-vit (model.safetensors in the Hugging Face cache)"
    assert absent.startswith("model.init: hf-hub:acme/absent: neither model.safetensors nor pytorch_model.bin "
                             "could be read (LocalEntryNotFoundError: ")
    assert absent.endswith("; HF_HUB_OFFLINE is set: only the local cache is read")
