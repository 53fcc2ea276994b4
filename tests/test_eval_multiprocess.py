"""Two real processes (gloo on CPU): the linear probe and features equal one process (repeated keys kept, skips
summed over ranks); the slow probe and fine-tuning run DDP."""

import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from ssl_vit.data.demo import ensure_demo_data, render
from ssl_vit.data.samples import SKIP_REASONS
from ssl_vit.data.writer import write_samples
from ssl_vit.eval.features import FeatureSpec, extract_features
from ssl_vit.eval.linear import ProbeData, ProbeProtocol
from ssl_vit.eval.linear_probe import linear_probe
from ssl_vit.training.checkpoint import export_backbone, load_backbone

ROOT = Path(__file__).resolve().parent.parent
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2, num_classes=0, dynamic_img_size=True)

# Run by both processes: every evaluation that trains something, through the library entry points.
SCRIPT = """
import dataclasses, json, sys
from ssl_vit.training.checkpoint import load_backbone
from ssl_vit.training.distributed import make_accelerator
from safetensors.torch import save_file
from ssl_vit.eval.features import FeatureSpec, extract_features
from ssl_vit.eval.finetune import finetune
from ssl_vit.cli.main import close_process_group
from ssl_vit.eval.linear import ProbeData, ProbeProtocol
from ssl_vit.eval.linear_probe import linear_probe
from ssl_vit.config.finetune import load_finetune_config

backbone, train, val, out, proto_json = sys.argv[1:6]
acc = make_accelerator()
assert acc.num_processes == 2
p = json.loads(proto_json)
proto = ProbeProtocol(**{**p, "features": FeatureSpec(**p["features"]), "base_lrs": tuple(p["base_lrs"]),
                         "weight_decays": tuple(p["weight_decays"])})
data = ProbeData(train, val, batch_size=8, num_workers=1, crop_ratio=1.0, shuffle_buffer=8)
vit, _ = load_backbone(backbone)
fast = linear_probe(vit, data, proto, acc, out_dir=out + "/fast")
slow = linear_probe(vit, data, dataclasses.replace(proto, epochs=1), acc, augment=True)
cfg = load_finetune_config("recipes/finetune_demo_tiny.yaml", [
    f"model.backbone={backbone}", f"data.train={train}", f"data.val={val}", "data.batch_size=4",
    "data.num_workers=1", "data.shuffle_buffer=8", "train.max_steps=2", f"train.run_dir={out}/ft"])
result = finetune(cfg, acc)
mixed = extract_features(vit, sys.argv[6].split(","), acc, batch_size=4, num_workers=1, crop_ratio=1.0)
if acc.is_main_process:
    json.dump({"slow_heads": len(slow["heads"]), "ft_best": result.best, "mixed_keys": mixed.keys,
               "mixed_skipped": mixed.skipped}, open(out + "/two.json", "w"))
    save_file({"features": mixed.features, "labels": mixed.labels}, out + "/mixed.safetensors")
close_process_group()  # as the CLI does after a command
"""


def test_two_process_probe_equals_one_and_training_runs(tmp_path, accelerate_launch):
    demo = ensure_demo_data(tmp_path / "demo", n_train=8, n_knn_train=40, n_knn_val=20)
    torch.manual_seed(0)
    export_backbone(timm.create_model("vit_tiny_patch16_224", **KW), tmp_path / "bb", "vit_tiny_patch16_224", KW)
    proto = ProbeProtocol(FeatureSpec("cls", 2, True), batchnorm=True, optimizer="sgd", base_lrs=(0.01, 0.1),
                          weight_decays=(0.0,), epochs=3, warmup_epochs=1, batch_size=16)
    # Shards dealt a, bad0 → rank 0 and b, bad1 → rank 1: the same keys on both ranks, skips on both.
    mixed = [tmp_path / "mixed" / f"{p}-000000.tar" for p in ("a", "b", "bad0", "bad1")]
    for prefix, split in (("a", "knn_train"), ("b", "knn_val")):
        write_samples(({"__key__": f"s{i:02d}", "png": render(split, i)[0], "cls": b"3"} for i in range(6)),
                      tmp_path / "mixed", prefix)
    for prefix, n in (("bad0", 2), ("bad1", 3)):
        write_samples(({"__key__": f"x{i}", "png": b"not a png", "cls": b"1"} for i in range(n)),
                      tmp_path / "mixed", prefix)
    script = tmp_path / "both.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [str(script), str(tmp_path / "bb"), demo.knn_train, demo.knn_val, str(tmp_path), json.dumps(asdict(proto)),
            ",".join(map(str, mixed))]
    out = subprocess.run(accelerate_launch() + args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    two = json.loads((tmp_path / "fast" / "linear_probe.json").read_text())
    vit, _ = load_backbone(tmp_path / "bb")
    one = linear_probe(vit, ProbeData(demo.knn_train, demo.knn_val, batch_size=8, num_workers=0, crop_ratio=1.0),
                       proto, Accelerator())
    assert two["n_train"] == one["n_train"] == 40 and two["heads"] == one["heads"]
    extra = json.loads((tmp_path / "two.json").read_text())
    assert extra["slow_heads"] == 2 and extra["ft_best"]["n"] == 20.0  # every val image once, across both ranks
    assert (tmp_path / "ft" / "best" / "backbone.safetensors").is_file()

    # Every sample of both ranks kept (same keys, different shards), skips summed over the ranks, and the
    # same rows in the same order as one process.
    assert extra["mixed_keys"] == sorted([f"s{i:02d}" for i in range(6)] * 2)
    assert extra["mixed_skipped"] == {**dict.fromkeys(SKIP_REASONS, 0), "corrupt_image": 5}
    one_mixed = extract_features(vit, [str(m) for m in mixed], Accelerator(), batch_size=4, num_workers=0,
                                 crop_ratio=1.0)
    two_mixed = load_file(tmp_path / "mixed.safetensors")
    assert torch.allclose(two_mixed["features"], one_mixed.features, atol=1e-5)
    assert torch.equal(two_mixed["labels"], one_mixed.labels)
