"""Two real processes under `accelerate launch` (gloo on CPU): pretraining runs, k-NN equals one process."""

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import run_group
from tiny_runs import TINY_MAE

from ssl_vit.data.demo import ensure_demo_data

ROOT = Path(__file__).resolve().parent.parent
TINY = TINY_MAE + [
    "data.batch_size=8", "data.num_workers=1", "data.shuffle_buffer=16", "train.total_steps=4",
    "train.warmup_steps=1", "train.log_every=2", "train.image_every=0", "train.save_every=2",
    "eval.pool=avg", "eval.crop_ratio=1.0", "eval.num_workers=1", "eval.batch_size=16"]


def run(argv, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = run_group(argv, cwd=ROOT, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), n_train=64, n_knn_train=60, n_knn_val=30)


def test_two_process_pretrain_and_knn(tmp_path, demo, accelerate_launch):
    run_dir = tmp_path / "run"
    sets = [a for kv in TINY + [f"data.train={demo.train}", f"train.run_dir={run_dir}",
                                f"eval.knn_train={demo.knn_train}", f"eval.knn_val={demo.knn_val}"]
            for a in ("--set", kv)]
    out = run(accelerate_launch() + ["tools/pretrain.py", *sets])
    assert "top-1: pretrained" in out.stdout
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]  # one log, written by the main process only
    assert (run_dir / "backbone.safetensors").is_file()
    summary = json.loads((run_dir / "knn.json").read_text())
    assert {"pretrained", "random init"} <= set(summary) and (summary["n_train"], summary["n_val"]) == (60, 30)

    knn = ["--backbone", str(run_dir), "--train", demo.knn_train, "--val", demo.knn_val, "--k", "5", "20",
           "--pool", "avg", "--crop-ratio", "1.0", "--num-workers", "1", "--batch-size", "16"]
    run(accelerate_launch() + ["tools/knn.py", *knn, "--out", str(tmp_path / "two.json")])
    run([sys.executable, "-m", "ssl_vit", "knn", *knn, "--out", str(tmp_path / "one.json")])
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert two == one and set(one) == {"5", "20", "n_train", "n_val", "skipped"}
    assert (one["n_train"], one["n_val"]) == (60, 30)
    assert not any(n for split in one["skipped"].values() for n in split.values())
