"""`ssl-vit benchmark-suite`: the standard `ssl-vit benchmark` cases, each in its own process (a compiled graph,
a memory peak or a failure stays with its case), each writing `OUT/<case>.json`; `OUT/suite.md` is rebuilt from
all of them, so a suite split over calls (`--only`) ends in one table (docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str
    args: tuple[str, ...] = ()  # `ssl-vit benchmark` flags and --set overrides
    real_data: bool = False  # reads the suite's shards

    def command(self, steps: int, shards: str | None, overrides: Sequence[str], out: Path) -> list[str]:
        cmd = [sys.executable, "-m", "ssl_vit", "benchmark", self.recipe, *self.args]
        if "--steps" not in self.args:
            cmd += ["--steps", str(steps)]
        if self.real_data and shards:
            cmd += ["--set", f"data.train={shards}"]
        for item in overrides:
            cmd += ["--set", item]
        return [*cmd, "--out", str(out)]


_COMPILE = ("--set", "train.compile=true")
_AUG = ("--set", "data.device_aug=true")
_DECODE = (*_AUG, "--set", "data.device_decode=true")
# The loader's CPU cost a DINO image, PIL multi-crop against device augmentation (one worker, the issue's ≤ 0.25×):
# PIL's views take ~30 ms of CPU an image, so fewer, smaller batches.
_PIL_LOADER = ("--loader-only", "--steps", "8", "--loader-rounds", "3", "--decode-samples", "200",
               "--set", "data.batch_size=16", "--set", "data.num_workers=1", "--set", "data.device_aug=false")
_AUG_LOADER = ("--loader-only", "--steps", "30", "--loader-rounds", "5", "--set", "data.batch_size=32",
               "--set", "data.num_workers=1", "--set", "data.device_aug=true")

# For a GPU node (issue #6): images/s and MFU with and without compile, data wait with real data, MAE's masked
# encoder at ViT-L, the loader's CPU cost a DINO image.
GPU_CASES: tuple[Case, ...] = (
    Case("mae_b16_synthetic", "mae_vit_base_p16", ("--synthetic",)),
    Case("mae_b16_synthetic_compile", "mae_vit_base_p16", ("--synthetic", *_COMPILE)),
    Case("mae_b16_real", "mae_vit_base_p16", real_data=True),
    Case("mae_b16_real_device_aug", "mae_vit_base_p16", _AUG, real_data=True),
    Case("mae_b16_real_device_decode", "mae_vit_base_p16", _DECODE, real_data=True),
    Case("dino_s16_synthetic", "dino_vit_small_p16", ("--synthetic",)),
    Case("dino_s16_synthetic_compile", "dino_vit_small_p16", ("--synthetic", *_COMPILE)),
    Case("dino_s16_real", "dino_vit_small_p16", real_data=True),
    Case("dino_s16_real_device_aug", "dino_vit_small_p16", _AUG, real_data=True),
    Case("dino_s16_real_device_decode", "dino_vit_small_p16", _DECODE, real_data=True),
    Case("mae_l16_synthetic", "mae_vit_large_p16", ("--synthetic", "--steps", "20")),
    Case("dino_s16_loader_pil", "dino_vit_small_p16", _PIL_LOADER, real_data=True),
    Case("dino_s16_loader_device_aug", "dino_vit_small_p16", _AUG_LOADER, real_data=True),
)
# Minutes on a CPU: the demo recipes (`--quick`).
QUICK_CASES: tuple[Case, ...] = (
    Case("mae_demo_synthetic", "mae_demo_tiny", ("--synthetic",)),
    Case("mae_demo_real", "mae_demo_tiny", real_data=True),
    Case("dino_demo_synthetic", "dino_demo_tiny", ("--synthetic",)),
    Case("dino_demo_real_device_aug", "dino_demo_tiny", _AUG, real_data=True),
)


def select_cases(quick: bool, only: Sequence[str] | None) -> list[Case]:
    cases = QUICK_CASES if quick else GPU_CASES
    if not only:
        return list(cases)
    names = {c.name for c in cases}
    unknown = [n for n in only if n not in names]
    if unknown:
        other = {c.name for c in (GPU_CASES if quick else QUICK_CASES)}
        hint = f" ({'without' if quick else 'with'} --quick)" if set(unknown) <= other else ""
        raise ValueError(f"unknown case(s) {', '.join(unknown)}{hint}; {'--quick ' if quick else ''}cases: "
                         f"{', '.join(c.name for c in cases)}")
    return [c for c in cases if c.name in only]


def make_jpeg_shards(out: Path, images: int = 1000, per_shard: int = 100, seed: int = 0) -> str:
    """ImageNet-sized (500×375, quality 90, ~73 KB) JPEGs of smooth random colour fields plus noise, as WebDataset
    shards in `out`; returns their brace pattern. Made once: existing shards are reused."""
    from ssl_vit.data.writer import shard_pattern, write_samples

    n_shards = -(-images // per_shard)
    # made whole by an earlier call: the folder appears only once every shard is written
    if len(list(out.glob("bench-*.tar"))) == n_shards:
        return shard_pattern(out, "bench", n_shards)
    shutil.rmtree(out, ignore_errors=True)  # anything else there (another size, an older build) is made anew
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted call left
    rng = np.random.default_rng(seed)

    def samples() -> Any:
        for i in range(images):
            field = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((500, 375), Image.BICUBIC)
            pixels = np.asarray(field).astype(np.float32) + rng.normal(0, 12, (375, 500, 3))
            buf = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            yield {"__key__": f"{i:06d}", "jpg": buf.getvalue()}

    write_samples(samples(), tmp, prefix="bench", max_count=per_shard)
    tmp.rename(out)
    return shard_pattern(out, "bench", n_shards)


def _meta() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None, "cpus": os.cpu_count()}


def run_case(case: Case, cmd: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run one case's command; its JSON, or {"error": ...} naming why there is none."""
    t0 = time.perf_counter()
    out.unlink(missing_ok=True)  # an earlier run's result must not pass for this one's
    # its own process group: on a timeout its loader workers go too, not on into the next case's timing
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
        lines = stderr.strip().splitlines()
        error = None if proc.returncode == 0 else (lines or [f"exit {proc.returncode}"])[-1]
        if error is None and not out.is_file():
            error = "exited 0 without writing its JSON"
    except subprocess.TimeoutExpired:
        _stop(proc)
        error = f"timed out after {timeout:.0f} s"
    except BaseException:  # Ctrl-C reaches the suite only (the case has its own session): stop the case too
        _stop(proc)
        raise
    result = json.loads(out.read_text()) if error is None else {"error": error}
    result.update({"case": case.name, "command": "ssl-vit " + " ".join(cmd[3:]), "wall_s": time.perf_counter() - t0,
                   "meta": _meta()})
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _stop(proc: subprocess.Popen) -> None:
    """Kill a case with its whole process group, loader workers included."""
    with contextlib.suppress(ProcessLookupError):  # it may have ended just now
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def table_row(r: dict[str, Any]) -> str:
    """One Markdown row of a case's result (see `TABLE_HEAD`)."""
    if "error" in r:
        return f"| {r['case']} | failed: {r['error'].replace('|', '/')} |" + " |" * 8
    loader_only = "step_time_s" not in r
    data = "loader only" if loader_only else "synthetic" if r["synthetic"] else "real"
    images = r["loader_images_per_s"] if loader_only else r["images_per_s"]
    enc = r.get("encoder")
    cells = [r["case"], data, _fmt(images, ".0f"), _fmt(r.get("step_time_s"), ".1f", 1e3), _fmt(r.get("mfu"), ".1%"),
             _fmt(r.get("data_wait_share"), ".1%"), _fmt(r.get("peak_memory_bytes"), ".2f", 2**-30),
             _fmt(r.get("loader_vs_workers_x_single_core"), ".2f"), _fmt(r.get("loader_cpu_ms_per_image"), ".2f"),
             _fmt(enc and enc["masked_speedup"], ".2f")]
    return "| " + " | ".join(cells) + " |"


TABLE_HEAD = ("| case | data | images/s | step ms | MFU | data wait | peak GiB | loader ÷ (workers × core) | "
              "worker CPU ms/image | masked encoder × |\n|" + "---|" * 10)


def render(out: Path) -> str:
    """`OUT/suite.md` from `OUT/meta.json` and every case's JSON in `OUT`, in the suite's order."""
    meta = json.loads((out / "meta.json").read_text())
    order = {c.name: i for i, c in enumerate((*GPU_CASES, *QUICK_CASES))}
    results = []
    for path in out.glob("*.json"):  # the cases' results; any other JSON there is none of the suite's
        if path.stem not in order:
            continue
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict) and result.get("case") == path.stem:
            results.append(result)
    rows = []
    for r in sorted(results, key=lambda r: order[r["case"]]):
        row = table_row(r)
        theirs = r.get("meta", {})
        if theirs.get("device") != meta["device"]:  # left by an earlier call on another machine: say so
            row = row.replace(f"| {r['case']} |", f"| {r['case']} ({theirs.get('device')}, "
                                                  f"{theirs.get('date_utc')} UTC) |", 1)
        rows.append(row)
    text = (f"{meta['device']}, torch {meta['torch']}" + (f", CUDA {meta['cuda']}" if meta["cuda"] else "")
            + f", {meta['cpus']} CPUs, {meta['date_utc']} UTC\n\n" + "\n".join([TABLE_HEAD, *rows]) + "\n")
    (out / "suite.md").write_text(text)
    return text


def run_suite(out: Path, *, quick: bool = False, only: Sequence[str] | None = None, steps: int = 100,
              shards: str | None = None, overrides: Sequence[str] = (), timeout: float = 900.0) -> int:
    """Run the cases, print each as it ends and the table at the end; 0 if every case ran, else 1."""
    cases = select_cases(quick, only)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").write_text(json.dumps(_meta(), indent=2) + "\n")
    if shards is None and not quick and any(c.real_data for c in cases):
        print(f"making synthetic JPEG shards in {out / 'shards'} ...", flush=True)
        shards = make_jpeg_shards(out / "shards")
    failed = 0
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.name} ...", end=" ", flush=True)
        path = out / f"{case.name}.json"
        result = run_case(case, case.command(steps, shards, overrides, path), path, timeout)
        failed += "error" in result
        print(f"failed: {result['error']}" if "error" in result else f"{result['wall_s']:.0f} s", flush=True)
    print(render(out), end="")
    return 1 if failed else 0
