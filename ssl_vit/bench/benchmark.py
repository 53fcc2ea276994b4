"""`ssl-vit benchmark`: step time, images/s, memory, data wait, MFU, loader rate and MAE's masked speed-up, of
the trainer's real step (same builders, same Accelerator); `--synthetic` feeds on-device random views instead."""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from ssl_vit.bench.loader import loader_report, warmup_batches
from ssl_vit.config.pretrain import Config
from ssl_vit.data.batches import to_device, training_batches
from ssl_vit.methods import Objective, build_objective
from ssl_vit.methods.mae.model import random_masking
from ssl_vit.models.backbone import build_backbone, encode
from ssl_vit.training.distributed import make_accelerator
from ssl_vit.training.loop import build_optimizer

# Dense bf16 tensor-core peaks (TFLOP/s, NVIDIA's data sheets) by device-name fragment, the first that matches:
# the PCIe and NVL cards before the SXM parts whose names they contain. Anything else needs --peak-tflops.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
                                              ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def peak_tflops_for(name: str) -> float | None:
    """The table's peak for a CUDA device name (`torch.cuda.get_device_name`), or None."""
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def device_peak_tflops(device: torch.device) -> float | None:
    """The table's peak for this CUDA device, or None (CPU, unknown GPU)."""
    return peak_tflops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(views: Callable[[Image.Image], Any], batch_size: int, device: torch.device) -> dict[str, Any]:
    """Random tensors with the shapes and dtypes the objective's views produce, batched, on `device`."""
    rng = np.random.default_rng(0)
    sample = views(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)))

    def like(t: torch.Tensor) -> torch.Tensor:
        shape = (batch_size, *t.shape)
        if t.dtype == torch.uint8:
            return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        return torch.randn(shape, dtype=t.dtype, device=device)

    image = [like(t) for t in sample] if isinstance(sample, (list, tuple)) else like(sample)
    return {"image": image, "skipped": torch.zeros(batch_size, 5, dtype=torch.long, device=device)}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything `fn` runs (matmuls, convolutions, attention) by torch's FlopCounterMode, with
    attention counted from its shapes whichever fused kernel torch picks (see `_sdpa_formulas`)."""
    with FlopCounterMode(display=False, custom_mapping=_sdpa_formulas()) as counter:
        fn()
    return counter.get_total_flops()


def attention_flops(q_shape: torch.Size, k_shape: torch.Size, v_shape: torch.Size) -> int:
    """QKᵀ and AV of one (B, H, N, D) attention call: 2 multiply-adds per output element's inner product."""
    b, h, n_q, d_qk = q_shape
    n_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * b * h * n_q * n_k * (d_qk + d_v)


def _sdpa_formulas() -> dict[Any, Callable[..., int]]:
    """A shape formula for every fused attention kernel this torch has, counting what the math path counts
    (model FLOPs): torch's own counter misses some kernels and counts a recompute in others (docs/benchmarks.md)."""
    # A private listing, but the only one that also names kernels added after this was written. The composite
    # math op never reaches the counter (it decomposes into the matmuls counted as such), so a formula is harmless.
    names = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("aten::_scaled_dot_product_")}
    formulas: dict[Any, Callable[..., int]] = {}
    for name in sorted(names):
        packet = getattr(torch.ops.aten, name)
        args = [a.name for a in packet.default._schema.arguments]
        if not {"query", "key", "value"} <= set(args):
            continue
        scale = 2 if name.endswith("_backward") else 1
        formulas[packet] = _shape_formula(args, scale)
    return formulas


def _shape_formula(arg_names: list[str], scale: int) -> Callable[..., int]:
    def formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        shapes = {**dict(zip(arg_names, args, strict=False)), **kwargs}
        return scale * attention_flops(shapes["query"], shapes["key"], shapes["value"])
    return formula


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"  # Linux: KiB


def encoder_speedup(vit: VisionTransformer, batch_size: int, mask_ratio: float, device: torch.device,
                    precision: str = "no", repeats: int = 3) -> dict[str, float]:
    """Seconds of encoder fwd+bwd with `mask_ratio` of the patches dropped (MAE) vs all tokens, under the
    run's autocast precision (no | bf16 | fp16)."""
    vit = vit.to(device).train()
    size = vit.patch_embed.img_size[0]
    x = torch.randn(batch_size, 3, size, size, device=device)
    keep, _, _ = random_masking(batch_size, vit.patch_embed.num_patches, mask_ratio, device)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def fwd_bwd(keep_idx: torch.Tensor | None) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = encode(vit, x, keep_idx)
        out.float().mean().backward()
        vit.zero_grad(set_to_none=True)

    def best(keep_idx: torch.Tensor | None) -> float:
        fwd_bwd(keep_idx)  # warm-up (allocator, kernels)
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fwd_bwd(keep_idx)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    masked, full = best(keep), best(None)
    return {"mask_ratio": mask_ratio, "batch_size": batch_size, "masked_fwd_bwd_s": masked,
            "full_fwd_bwd_s": full, "masked_speedup": full / masked, "precision": precision}


def _views(cfg: Config) -> Callable[[Image.Image], Any]:
    return build_objective(cfg.objective, getattr(cfg, cfg.objective), build_backbone(cfg.model),
                           total_steps=cfg.train.total_steps, device_aug=cfg.data.device_aug).views


def _build(cfg: Config) -> tuple[Objective, Any, Any]:
    acc = make_accelerator(cfg.train.precision)
    objective = build_objective(cfg.objective, getattr(cfg, cfg.objective), build_backbone(cfg.model),
                                total_steps=cfg.train.total_steps, device_aug=cfg.data.device_aug,
                                compile=cfg.train.compile)
    optimizer = build_optimizer(objective, cfg, use_fused=acc.device.type == "cuda")
    model, optimizer = acc.prepare(objective, optimizer)
    return model, optimizer, acc


def time_steps(cfg: Config, steps: int, synthetic: bool) -> dict[str, Any]:
    """Train `steps` real optimizer steps and measure them, after two warm-up steps (one of them FLOP-counted)
    and, with real data, after the loader's shuffle buffers are full and its queue is as training keeps it."""
    torch.manual_seed(cfg.train.seed)
    model, optimizer, acc = _build(cfg)
    objective: Objective = acc.unwrap_model(model)
    device, bs = acc.device, cfg.data.batch_size
    for group in optimizer.param_groups:
        group["lr"] = 1e-6  # a tiny real update: the weights move, the numbers stay finite
    if synthetic:
        fixed = synthetic_batch(objective.views, bs, device)
        loader = iter(lambda: fixed, None)
    else:
        loader = training_batches(cfg.data, objective.views, device, img_size=cfg.model.img_size, rank=0,
                                  world_size=1, seed=cfg.train.seed)
        # The loader is timed as a long run meets it: once every worker's shuffle buffer is full (while one
        # fills, its worker reads two samples per one it yields). Those batches need no model step.
        for _ in range(warmup_batches(cfg.data)):
            next(loader)
    model.train()

    def one_step(step: int, batch: dict[str, Any]) -> None:
        with acc.autocast():
            out = model(batch, step)
            acc.backward(out["loss"])
        objective.after_backward(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_step(step)

    first = to_device(next(loader), device)
    flops = count_flops(lambda: one_step(0, first))
    # A plain warm-up step too: torch.compile (train.compile) traces anew outside the FLOP counter's mode, and
    # that compile time must not land in the timed steps.
    one_step(1, first)
    # The DataLoader's queue (2 batches a worker) filled while the model was built and warmed up; batches from
    # it would come free in the timed steps. Untimed steps take them, so timing starts with the queue as
    # training keeps it: full if the loader is faster than the model, empty if it is slower.
    start = 2 + (0 if synthetic else 2 * cfg.data.num_workers)
    for step in range(2, start):
        one_step(step, to_device(next(loader), device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wait = 0.0
    _sync(device)
    t0 = time.perf_counter()
    for step in range(start, start + steps):
        t_wait = time.perf_counter()
        batch = to_device(next(loader), device)
        wait += time.perf_counter() - t_wait
        one_step(step, batch)
    _sync(device)  # the last step's kernels belong to the measured time
    total = time.perf_counter() - t0
    memory, memory_kind = _peak_memory(device)
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "precision": acc.mixed_precision, "step_time_s": total / steps,
            "images_per_s": bs * steps / total, "data_wait_share": wait / total, "flops_per_step": flops,
            "achieved_tflops": flops * steps / total / 1e12, "peak_memory_bytes": memory,
            "peak_memory_kind": memory_kind, "warmup_steps": start,
            "loader_warmup_batches": 0 if synthetic else warmup_batches(cfg.data)}


def run_benchmark(cfg: Config, *, steps: int = 10, synthetic: bool = False, peak_tflops: float | None = None,
                  loader_batches: int | None = None, decode_samples: int = 300,
                  encoder_batch: int | None = None, loader_only: bool = False,
                  loader_rounds: int = 3) -> dict[str, Any]:
    """Everything `ssl-vit benchmark` reports, as one JSON-able dict (see docs/benchmarks.md); `loader_only`:
    just the loader and single-core decode+augment rates (no model step, no encoder timing), each the best of
    `loader_rounds` rounds."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if synthetic and loader_only:
        raise ValueError("--synthetic and --loader-only exclude each other")
    result: dict[str, Any] = {"objective": cfg.objective, "model": cfg.model.name, "img_size": cfg.model.img_size,
                              "batch_size": cfg.data.batch_size, "device_aug": cfg.data.device_aug,
                              "device_decode": cfg.data.device_decode,
                              "synthetic": synthetic, "steps": steps}
    if loader_only:
        result.update(loader_report(cfg.data, _views(cfg), steps, decode_samples, loader_rounds))
        return result
    result.update(time_steps(cfg, steps, synthetic))
    device = torch.device(result["device"])
    source = "flag" if peak_tflops is not None else "table"
    peak = peak_tflops if peak_tflops is not None else device_peak_tflops(device)
    result.update({"peak_tflops": peak, "peak_tflops_source": source if peak is not None else None,
                   "mfu": result["achieved_tflops"] / peak if peak else None})
    if not synthetic:
        result.update(loader_report(cfg.data, _views(cfg), loader_batches or steps, decode_samples, loader_rounds))
    ratio = cfg.mae.mask_ratio if cfg.objective == "mae" else 0.75
    vit = build_backbone(dataclasses.replace(cfg.model, drop_path_rate=0.0))
    result["encoder"] = encoder_speedup(vit, encoder_batch or cfg.data.batch_size, ratio, device,
                                        result["precision"])
    return result


def _loader_line(result: dict[str, Any]) -> str:
    workers = max(result["num_workers"], 1)
    line = (f"loader {result['loader_images_per_s']:.1f} images/s vs {workers} worker(s) × "
            f"{result['single_core_images_per_s']:.1f} single-core decode+views = "
            f"{result['loader_vs_workers_x_single_core']:.2f}×; vs {workers} × "
            f"{result['pipeline_single_core_images_per_s']:.1f} whole stream in-process = "
            f"{result['loader_vs_workers_x_pipeline']:.2f}×; CPU/image: decode+views "
            f"{result['single_core_cpu_ms_per_image']:.2f} ms")
    if result["loader_cpu_ms_per_image"] is None:
        return line
    return (f"{line}, a worker {result['loader_cpu_ms_per_image']:.2f} ms "
            f"({result['single_core_vs_loader_cpu']:.0%} of it decode+views)")


def format_report(result: dict[str, Any]) -> str:
    """Human-readable lines of a `run_benchmark` result."""
    if "step_time_s" not in result:  # loader only
        return f"{result['objective']} loader, batch {result['batch_size']}: {_loader_line(result)}"
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (give --peak-tflops)"
    lines = [
        f"{result['objective']} {result['model']} @{result['img_size']}px, batch {result['batch_size']}, "
        f"{result['device_name']} ({result['precision']}), {'synthetic' if result['synthetic'] else 'real'} data",
        f"step {result['step_time_s'] * 1e3:.1f} ms, {result['images_per_s']:.1f} images/s, "
        f"data wait {result['data_wait_share']:.1%}",
        f"{result['flops_per_step'] / 1e9:.2f} GFLOP/step, {result['achieved_tflops']:.3f} TFLOP/s, MFU {mfu}",
        f"peak memory {result['peak_memory_bytes'] / 2**20:.0f} MiB ({result['peak_memory_kind']})",
    ]
    if "loader_images_per_s" in result:
        lines.append(_loader_line(result))
    enc = result["encoder"]
    lines.append(f"encoder fwd+bwd (batch {enc['batch_size']}, {enc['precision']}): mask {enc['mask_ratio']} "
                 f"{enc['masked_fwd_bwd_s'] * 1e3:.1f} ms vs full {enc['full_fwd_bwd_s'] * 1e3:.1f} ms = "
                 f"{enc['masked_speedup']:.2f}× faster")
    return "\n".join(lines)
