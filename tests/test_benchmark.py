"""The benchmark tool: its JSON on a tiny recipe (synthetic and real data) and its FLOP count."""

import json
import multiprocessing
import time

import pytest
import torch

from ssl_vit.bench.benchmark import count_flops, synthetic_batch
from ssl_vit.bench.loader import children_cpu_seconds
from ssl_vit.cli.main import main
from ssl_vit.config.pretrain import ModelConfig
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.data.device.augment import CheapView
from ssl_vit.methods.mae.transforms import mae_views
from ssl_vit.models.backbone import build_backbone, encode

TINY = [
    "model.name=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
    "model.depth=1", "model.num_heads=2", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2",
    "dino.out_dim=32", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.local_crops_number=2",
    "dino.local_crops_size=16", "data.batch_size=4", "data.num_workers=1", "data.shuffle_buffer=8",
]
FIELDS = ("step_time_s", "images_per_s", "peak_memory_bytes", "flops_per_step", "achieved_tflops", "peak_tflops",
          "mfu")
LOADER_FIELDS = ("loader_images_per_s", "single_core_images_per_s", "pipeline_single_core_images_per_s")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), n_train=32, n_knn_train=4, n_knn_val=4)


def _check(result: dict, synthetic: bool) -> None:
    for key in FIELDS:
        assert result[key] > 0, key
    assert 0 <= result["data_wait_share"] <= 1
    assert result["mfu"] <= 1  # a tiny model on a 1 TFLOP/s peak: far below it
    assert result["peak_tflops_source"] == "flag" and result["synthetic"] is synthetic
    # the derived figures follow from the measured ones by their definitions
    assert result["images_per_s"] == pytest.approx(result["batch_size"] / result["step_time_s"])
    assert result["achieved_tflops"] == pytest.approx(result["flops_per_step"] / result["step_time_s"] / 1e12)
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / result["peak_tflops"])
    enc = result["encoder"]
    assert enc["mask_ratio"] == 0.75 and enc["masked_fwd_bwd_s"] > 0 and enc["full_fwd_bwd_s"] > 0
    assert enc["masked_speedup"] == pytest.approx(enc["full_fwd_bwd_s"] / enc["masked_fwd_bwd_s"])
    if synthetic:
        assert not any(k in result for k in LOADER_FIELDS)
    else:
        assert all(result[k] > 0 for k in LOADER_FIELDS) and result["num_workers"] == 1
        loader, workers = result["loader_images_per_s"], max(result["num_workers"], 1)
        assert result["loader_vs_workers_x_single_core"] == pytest.approx(
            loader / (workers * result["single_core_images_per_s"]))
        assert result["loader_vs_workers_x_pipeline"] == pytest.approx(
            loader / (workers * result["pipeline_single_core_images_per_s"]))
        assert result["single_core_cpu_ms_per_image"] > 0
        # a 2-batch window of tiny images may fall within one clock tick of worker CPU: then None, not 0
        assert result["loader_cpu_ms_per_image"] is None or result["loader_cpu_ms_per_image"] > 0


@pytest.mark.parametrize("objective,synthetic,extra", [
    ("mae", True, []), ("dino", True, []), ("mae", False, []), ("dino", False, ["data.device_aug=true"]),
])
def test_benchmark_json(tmp_path, demo, capsys, objective, synthetic, extra):
    out = tmp_path / "bench.json"
    args = ["benchmark", "--steps", "2", "--peak-tflops", "1", "--decode-samples", "20", "--out", str(out)]
    args += ["--synthetic"] if synthetic else []
    for item in [*TINY, f"objective={objective}", f"data.train={demo.train}", *extra]:
        args += ["--set", item]
    assert main(args) == 0
    result = json.loads(out.read_text())
    _check(result, synthetic)
    assert result["objective"] == objective and result["device_aug"] == bool(extra)
    assert "images/s" in capsys.readouterr().out


def test_loader_only(tmp_path, demo):
    out = tmp_path / "loader.json"
    args = ["benchmark", "--loader-only", "--steps", "2", "--decode-samples", "20", "--loader-rounds", "2",
            "--out", str(out)]
    for item in [*TINY, "objective=dino", f"data.train={demo.train}"]:
        args += ["--set", item]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert all(result[k] > 0 for k in LOADER_FIELDS) and "step_time_s" not in result
    # timed after the one worker's 8-sample shuffle buffer has filled: 2 batches of 4
    assert result["loader_rounds"] == 2 and result["loader_warmup_batches"] == 2
    assert main(["benchmark", "--loader-only", "--synthetic"]) == 2  # contradictory flags: one-line error


def test_vit_forward_flops_match_hand_formula():
    cfg = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
    vit = build_backbone(cfg).eval()
    b, d, p, length = 3, 48, 8, 16
    n = length + 1  # patches + cls
    x = torch.randn(b, 3, 32, 32)
    with torch.no_grad():
        counted = count_flops(lambda: encode(vit, x))
    patch_embed = 2 * length * (3 * p * p) * d
    # qkv (3D²) + proj (D²) + MLP (2 × 4D²) = 12D² multiply-adds per token; QKᵀ and AV: 2 N² D multiply-adds
    block = 2 * n * 12 * d * d + 4 * n * n * d
    expected = b * (patch_embed + cfg.depth * block)
    assert counted == pytest.approx(expected, rel=0.03)
    # masked encode: only 1 + 4 tokens enter the blocks
    keep = torch.arange(4).expand(b, 4)
    with torch.no_grad():
        masked = count_flops(lambda: encode(vit, x, keep))
    assert masked == pytest.approx(b * (patch_embed + cfg.depth * (2 * 5 * 12 * d * d + 4 * 25 * d)), rel=0.03)


@pytest.mark.parametrize("backend", ["default", "MATH", "FLASH_ATTENTION"])
def test_attention_flops_do_not_depend_on_the_kernel(backend):
    """Every SDPA kernel this torch can run on the CPU counts as the math path does: QKᵀ + AV forward, twice that
    backward (torch 2.14's counter did not know the CPU flash kernel and counted no attention at all)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, n, d = 2, 3, 17, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))

    def step():
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    with sdpa_kernel(getattr(SDPBackend, backend)) if backend != "default" else torch.enable_grad():
        counted = count_flops(step)
    forward = 2 * (b * h * n * n * d) * 2  # QKᵀ and AV, 2 FLOPs a multiply-add
    assert counted == 3 * forward


def test_synthetic_batch_mirrors_views():
    single = synthetic_batch(mae_views(32, (0.2, 1.0)), 5, torch.device("cpu"))["image"]
    assert single.shape == (5, 3, 32, 32) and single.dtype == torch.uint8  # views end in uint8
    multi = synthetic_batch(lambda img: [torch.zeros(3, 8, 8), torch.zeros(3, 4, 4)], 5, torch.device("cpu"))["image"]
    assert [tuple(m.shape) for m in multi] == [(5, 3, 8, 8), (5, 3, 4, 4)] and multi[0].dtype == torch.float32
    raw = synthetic_batch(CheapView(37), 5, torch.device("cpu"))["image"]
    assert raw.shape == (5, 3, 37, 37) and raw.dtype == torch.uint8


def test_compile_runs_a_few_steps(tmp_path, demo, monkeypatch):
    """train.compile=true: the encoder calls go through torch.compile and training still runs (CPU inductor)."""
    import shutil

    from ssl_vit.config.pretrain import load_config
    from ssl_vit.training.loop import pretrain

    if shutil.which("g++") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile's CPU inductor backend needs a C++ compiler; none on PATH")
    cfg = load_config(None, [*TINY, "data.num_workers=0", f"data.train={demo.train}", "train.compile=true",
                             "train.precision=auto", "train.total_steps=2", "train.warmup_steps=1",
                             "train.save_every=0", "train.image_every=0", "train.export=false",
                             f"train.run_dir={tmp_path / 'run'}"])
    from ssl_vit.methods.base import Objective
    from ssl_vit.models.backbone import encode

    compiled = []
    real_compile = Objective.compile_encoder

    def spy(self):
        real_compile(self)
        compiled.append(self.encode is not encode)  # the encoder calls now go through the compiled function

    monkeypatch.setattr(Objective, "compile_encoder", spy)
    try:
        result = pretrain(cfg)
    except torch._dynamo.exc.BackendCompilerFailed as err:  # toolchain present but unusable
        pytest.skip(f"torch.compile's inductor backend failed here: {str(err).splitlines()[0]}")
    assert result.step == 2 and compiled == [True]


def test_compile_and_auto_precision_wiring():
    from ssl_vit.config.methods import MAEConfig
    from ssl_vit.methods import build_objective
    from ssl_vit.models.backbone import encode as plain
    from ssl_vit.training.distributed import make_accelerator

    vit = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    assert build_objective("mae", MAEConfig(decoder_dim=32, decoder_depth=1), build_backbone(vit)).encode is plain
    compiled = build_objective("mae", MAEConfig(decoder_dim=32, decoder_depth=1), build_backbone(vit), compile=True)
    assert compiled.encode is not plain and callable(compiled.encode)
    expected = "bf16" if torch.cuda.is_available() else "no"
    assert make_accelerator("auto").mixed_precision == expected


def _spin(seconds: float, spun, go_on) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    spun.set()
    go_on.wait(30)


def test_children_cpu_seconds_counts_a_live_childs_cpu():
    if children_cpu_seconds() is None:
        pytest.skip("no /proc: the loader's CPU figures are None here")
    ctx = multiprocessing.get_context("fork")
    spun, go_on = ctx.Event(), ctx.Event()
    before = children_cpu_seconds()
    child = ctx.Process(target=_spin, args=(0.5, spun, go_on))
    child.start()
    try:
        assert spun.wait(30)
        used = children_cpu_seconds() - before
    finally:
        go_on.set()
        child.join(30)
    assert 0.45 <= used <= 0.9, used  # 0.5 s of spinning, read within clock ticks, plus the child's start


def test_peak_table_tells_the_pcie_and_nvl_cards_from_the_sxm_parts():
    from ssl_vit.bench.benchmark import peak_tflops_for

    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H100 NVL") == 835.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("NVIDIA GeForce RTX 4090") is None


def test_real_data_is_timed_once_the_shuffle_buffers_are_full_and_the_queue_drained(tmp_path, demo, monkeypatch):
    # Each batch the benchmark draws is counted: a timed window that began while the shuffle buffers filled (a
    # worker reads two samples per one it yields) or with the queue the idle loader filled would flatter or
    # blame the loader. TINY: 1 worker, shuffle buffer 8, batch 4 → 2 buffer batches; 2 queued ones.
    import ssl_vit.bench.benchmark as benchmark
    from ssl_vit.config.pretrain import load_config

    drawn, real = [], benchmark.training_batches

    def counted(*args, **kwargs):
        for batch in real(*args, **kwargs):
            drawn.append(1)
            yield batch

    monkeypatch.setattr(benchmark, "training_batches", counted)
    cfg = load_config("recipes/mae_demo_tiny.yaml", [*TINY, f"data.train={demo.train}"])
    result = benchmark.time_steps(cfg, steps=3, synthetic=False)
    assert result["loader_warmup_batches"] == 2 and result["warmup_steps"] == 2 + 2
    assert len(drawn) == 2 + 1 + 2 + 3  # buffer fill, the first (FLOP-counted, then repeated) step, queue, timed
