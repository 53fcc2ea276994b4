"""FSDP on CPU: two processes (gloo) shard tiny objectives with FSDP2 through Accelerate's own `prepare`, and the
export, MAE's images and k-NN work. Accelerate applies FSDP to accelerator devices only, so the workers (this file,
run by torchrun) give the Accelerator the state a launch with an FSDP config gives it on GPUs; all that follows
(wrapping, training, checkpoints, the gather) is Accelerate's, torch's and ours. Where Accelerate has FSDP1 only
(before 1.6: the floor), FSDP needs an accelerator device and the two-process tests skip."""

from __future__ import annotations

import inspect
import json
import os
import socket
import sys
from pathlib import Path

import accelerate
import pytest
import torch
from accelerate import FullyShardedDataParallelPlugin
from safetensors.torch import load_file, save_file
from tiny_runs import TINY_MAE  # beside this file: on the path under pytest, and when torchrun runs it

ROOT = Path(__file__).resolve().parent.parent
TINY_DINO = [*TINY_MAE, "objective=dino", "dino.out_dim=32", "dino.hidden_dim=32", "dino.bottleneck_dim=16",
             "dino.local_crops_number=2", "dino.local_crops_size=16"]
# What `accelerate launch --config_file fsdp.yaml` (docs/distributed.md) puts in each process's environment.
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block"}
HAS_FSDP2 = "fsdp_version" in inspect.signature(FullyShardedDataParallelPlugin).parameters
needs_fsdp2 = pytest.mark.skipif(not HAS_FSDP2, reason=(
    f"accelerate {accelerate.__version__} has FSDP1 only, and torch's FSDP1 refuses CPU processes ('FSDP needs a "
    f"non-CPU accelerator device'; torch {torch.__version__.split('+')[0]}'s FSDP2 too: 'FSDP requires CUDA for "
    "streams'): FSDP cannot run on CPU here"))


def fsdp_accelerator(state_dict_type: str, precision: str = "no") -> accelerate.Accelerator:
    """This process's Accelerator as under an FSDP launch on GPUs: FSDP2, each ViT block its own unit."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    from ssl_vit.training.distributed import make_accelerator

    os.environ.update(FSDP_ENV, FSDP_STATE_DICT_TYPE=state_dict_type)
    acc = make_accelerator(precision)  # a gloo group on CPU, which Accelerate leaves MULTI_CPU
    plugin = FullyShardedDataParallelPlugin()  # from FSDP_*
    if precision != "no":
        plugin.set_mixed_precision(precision)  # FSDP's own: bf16 weights in forward and backward
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state.update(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin)
    assert acc.is_fsdp2 and acc.num_processes == 2
    return acc


def tiny_batch(objective: str) -> dict[str, object]:
    def images(size: int) -> torch.Tensor:
        return torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    return {"image": images(32) if objective == "mae" else [images(32), images(32), images(16), images(16)]}


def gather_worker(out: Path, precision: str) -> None:
    """Train MAE and DINO two steps on different batches per rank, then export and draw MAE's images; rank 0 also
    writes the reference: each backbone parameter all-gathered by torch itself, and images of an unsharded copy."""
    from accelerate.utils import set_seed
    from torch.distributed.tensor import DTensor

    from ssl_vit.config.pretrain import load_config
    from ssl_vit.methods import build_objective
    from ssl_vit.models.backbone import backbone_kwargs, build_backbone
    from ssl_vit.training.checkpoint import export_backbone
    from ssl_vit.training.gather import backbone_state, objective_images

    def unsharded(module: torch.nn.Module) -> dict[str, torch.Tensor]:  # every rank: full_tensor is a collective
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.state_dict().items()}

    acc = fsdp_accelerator("SHARDED_STATE_DICT", precision)
    for name, overrides in (("mae", TINY_MAE), ("dino", TINY_DINO)):
        cfg = load_config(None, overrides)
        set_seed(0)
        objective = build_objective(name, getattr(cfg, name), build_backbone(cfg.model), total_steps=10)
        model, optimizer = acc.prepare(objective, torch.optim.AdamW(objective.parameters(), lr=1e-2))
        assert type(model).__name__.startswith("FSDP")  # fully_shard's class: really sharded
        torch.manual_seed(1 + acc.process_index)  # the trained weights depend on both ranks' batches
        for step in range(2):
            with acc.autocast():  # as the training loop
                loss = model(tiny_batch(name), step)["loss"]
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            objective.after_step(step)
        model.eval()
        backbone = objective.export_backbone()
        state = backbone_state(acc, model, backbone)
        reference, whole = unsharded(backbone), unsharded(objective)
        batch = tiny_batch(name)
        torch.manual_seed(7)  # MAE's mask
        images = objective_images(acc, model, objective, batch)
        if not acc.is_main_process:
            (out / f"{name}_rank1.json").write_text(json.dumps([state is None, images is None]))
            continue
        export_backbone(state, out / name, cfg.model.name, backbone_kwargs(cfg.model))
        save_file(reference, str(out / name / "reference.safetensors"))
        plain = build_objective(name, getattr(cfg, name), build_backbone(cfg.model), total_steps=10).eval()
        plain.load_state_dict(whole, strict=True)
        torch.manual_seed(7)
        save_file({**images, **{f"unsharded/{k}": v for k, v in plain.visualize(batch).items()}},
                  str(out / name / "images.safetensors"))
    acc.wait_for_everyone()


def pretrain_worker(argv: list[str]) -> int:
    """`ssl-vit pretrain ...` under FSDP; FULL_STATE_DICT checkpoints, which `ssl-vit export` reads."""
    from ssl_vit.cli.main import main

    fsdp_accelerator("FULL_STATE_DICT")
    return main(["pretrain", *argv])


def torchrun(tmp_path: Path, *args: str, timeout: float = 240) -> str:
    from conftest import run_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = run_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     str(port), __file__, *args], cwd=tmp_path, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@needs_fsdp2
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_export_and_images_gather_the_sharded_model(tmp_path, precision):
    """The export equals the unsharded backbone exactly (FSDP keeps float32 weights under bf16); the images equal
    an unsharded copy's, up to bf16 rounding under mixed precision."""
    torchrun(tmp_path, "gather", str(tmp_path), precision)
    from ssl_vit.config.pretrain import load_config
    from ssl_vit.models.backbone import build_backbone

    for name, overrides in (("mae", TINY_MAE), ("dino", TINY_DINO)):
        assert json.loads((tmp_path / f"{name}_rank1.json").read_text()) == [True, True]  # rank 0 alone holds them
        exported = load_file(str(tmp_path / name / "backbone.safetensors"))
        reference = load_file(str(tmp_path / name / "reference.safetensors"))
        plain = build_backbone(load_config(None, overrides).model)
        assert exported.keys() == reference.keys() == plain.state_dict().keys()
        assert all(torch.equal(exported[k], reference[k]) for k in reference)
        images = load_file(str(tmp_path / name / "images.safetensors"))
        tag = "mae/reconstruction" if name == "mae" else "dino/crops"
        tol = 1e-5 if precision == "no" else 2e-2
        torch.testing.assert_close(images[tag], images[f"unsharded/{tag}"], rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from ssl_vit.data.demo import ensure_demo_data

    return ensure_demo_data(tmp_path_factory.mktemp("demo"), n_train=64, n_knn_train=60, n_knn_val=30)


@needs_fsdp2
def test_pretrain_under_fsdp_exports_draws_and_runs_knn(tmp_path, demo):
    """`ssl-vit pretrain` end to end: MAE's images every 2 steps, the export, then k-NN of the export on both
    processes, which equals k-NN on one."""
    run_dir = tmp_path / "run"
    sets = [*TINY_MAE, "data.batch_size=8", "data.num_workers=1", "data.shuffle_buffer=16", "train.total_steps=4",
            "train.warmup_steps=1", "train.log_every=2", "train.image_every=2", "train.save_every=2",
            "eval.pool=avg", "eval.crop_ratio=1.0", "eval.num_workers=1", "eval.batch_size=16", "eval.knn_k=5",
            f"data.train={demo.train}", f"train.run_dir={run_dir}", f"eval.knn_train={demo.knn_train}",
            f"eval.knn_val={demo.knn_val}"]
    stdout = torchrun(tmp_path, "pretrain", *(a for kv in sets for a in ("--set", kv)))
    assert "top-1: pretrained" in stdout
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    saved = torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True)  # Accelerate's own gather
    exported = load_file(str(run_dir / "backbone.safetensors"))
    assert exported.keys() == {k.removeprefix("backbone.") for k in saved if k.startswith("backbone.")}
    assert all(torch.equal(v, saved[f"backbone.{k}"]) for k, v in exported.items())
    from ssl_vit.training.checkpoint import export_run  # `ssl-vit export` reads FULL_STATE_DICT checkpoints

    again = load_file(str(export_run(run_dir, tmp_path / "again")))
    assert again.keys() == exported.keys() and all(torch.equal(again[k], v) for k, v in exported.items())
    events = b"".join(p.read_bytes() for p in run_dir.rglob("events.out.tfevents*"))
    assert events.count(b"mae/reconstruction") == 2  # steps 2 and 4, by the main process

    summary = json.loads((run_dir / "knn.json").read_text())
    knn = ["--backbone", str(run_dir), "--train", demo.knn_train, "--val", demo.knn_val, "--k", "5", "--pool", "avg",
           "--crop-ratio", "1.0", "--num-workers", "1", "--batch-size", "16", "--out", str(tmp_path / "one.json")]
    from conftest import run_group

    out = run_group([sys.executable, "-m", "ssl_vit", "knn", *knn], cwd=ROOT, timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "one.json").read_text())["5"] == summary["pretrained"]


def test_export_reads_full_state_dict_checkpoints(tmp_path, demo):
    """What Accelerate saves under FSDP with FULL_STATE_DICT (the objective's whole state dict, torch.save'd to
    pytorch_model_fsdp.bin) exports as a plain checkpoint does; one process, so the floor runs it too."""
    from ssl_vit.config.pretrain import load_config
    from ssl_vit.training.checkpoint import export_run
    from ssl_vit.training.loop import pretrain
    from ssl_vit.training.marker import write_marker

    run = tmp_path / "run"
    pretrain(load_config(None, [*TINY_MAE, "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16",
                                "train.total_steps=2", "train.warmup_steps=1", "train.save_every=2",
                                "train.image_every=0", f"data.train={demo.train}", f"train.run_dir={run}"]))
    step = run / "checkpoints" / "step_00000002"
    torch.save(load_file(str(step / "model.safetensors")), step / "pytorch_model_fsdp.bin")
    (step / "model.safetensors").unlink()
    write_marker(step, 2)
    exported, again = (load_file(str(p)) for p in (run / "backbone.safetensors", export_run(run, tmp_path / "again")))
    assert again.keys() == exported.keys() and all(torch.equal(again[k], v) for k, v in exported.items())
    (step / "pytorch_model_fsdp.bin").unlink()  # SHARDED_STATE_DICT's shards: refused, in one line
    write_marker(step, 2)
    with pytest.raises(FileNotFoundError, match=r"step_00000002 holds no model.safetensors \(an FSDP run with "
                                                r"SHARDED_STATE_DICT saves sharded weights"):
        export_run(run, tmp_path / "again")


if __name__ == "__main__":  # a torchrun worker
    mode, *rest = sys.argv[1:]
    if mode == "gather":
        gather_worker(Path(rest[0]), rest[1])
    else:
        sys.exit(pretrain_worker(rest))
