"""`ssl-vit <command>`: a thin layer of argument parsing over the library. Also `python -m ssl_vit` and
`accelerate launch -m ssl_vit <command>` / `accelerate launch tools/<command>.py`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_vit.cli.args import COUNT, POSITIVE, OneLineParser, add_recipe_args, check_output
from ssl_vit.config.recipes import DEMO_RECIPE, load_any_config

if TYPE_CHECKING:  # the commands import their heavy modules when they run
    from accelerate import Accelerator
    from torch import nn

    from ssl_vit.config.pretrain import Config


def _pretrain_config(recipe: str | None, overrides: Sequence[str]) -> Any:
    from ssl_vit.config.pretrain import ConfigError
    from ssl_vit.training.loop import resolve_demo

    kind, cfg = load_any_config(recipe, overrides)
    if kind == "finetune":
        raise ConfigError(f"{recipe} is a fine-tuning recipe: run `ssl-vit finetune {recipe}`")
    return resolve_demo(cfg)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ssl_vit.config.pretrain import ConfigError, doubtful_settings
    from ssl_vit.data.shard_urls import resolve_shards
    from ssl_vit.training.distributed import make_accelerator
    from ssl_vit.training.loop import pretrain

    cfg = _pretrain_config(args.recipe, args.set)
    for key in () if args.no_knn else ("knn_train", "knn_val"):  # resolved now, not after the whole training run
        if spec := getattr(cfg.eval, key):
            try:
                resolve_shards(spec, cfg.data.allow_pipe)
            except (OSError, ValueError) as err:
                raise ConfigError(f"eval.{key}: {err}") from None
    accelerator = make_accelerator(cfg.train.precision)
    if accelerator.is_main_process:  # valid, but probably not meant: say so once, before training
        for note in doubtful_settings(cfg):
            print(f"ssl-vit pretrain: warning: {note}", file=sys.stderr)
    result = pretrain(cfg, accelerator)
    if args.no_knn or not (cfg.eval.knn_train and cfg.eval.knn_val) or result.backbone is None:
        return 0
    from ssl_vit.eval.baseline import load_eval_backbone
    from ssl_vit.eval.knn import knn_report

    scores, reports = {}, {}
    for name in ("pretrained", "random init", "model.init") if cfg.model.init else ("pretrained", "random init"):
        vit, _ = load_eval_backbone(result.backbone, random_init=name != "pretrained")  # seeded: a stable baseline
        if name == "model.init" and not _loads_init(vit, cfg, accelerator):  # what the run started from
            continue
        reports[name] = knn_report(vit, cfg.eval, accelerator, allow_pipe=cfg.data.allow_pipe)
        scores[name] = reports[name].scores[cfg.eval.knn_k]
    if accelerator.is_main_process:
        report = reports["pretrained"]  # the same shards for all: one set of sizes and skips
        summary = {**scores, "n_train": report.n_train, "n_val": report.n_val, "skipped": report.skipped}
        (result.run_dir / "knn.json").write_text(json.dumps(summary, indent=2) + "\n")
        top1, top5 = ({name: f"{s[k]:.1f}%" for name, s in scores.items()} for k in ("top1", "top5"))
        start = f"; model.init {top1['model.init']} (top-5: {top5['model.init']})" if "model.init" in scores else ""
        print(f"k-NN (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}, {cfg.eval.pool} features) "
              f"top-1: pretrained {top1['pretrained']} vs random init {top1['random init']}  (top-5: "
              f"{top5['pretrained']} vs {top5['random init']}){start}")
    return 0


def _loads_init(vit: nn.Module, cfg: Config, accelerator: Accelerator) -> bool:
    """Load `model.init` for the k-NN baseline; False, with a warning, when any process cannot (a resumed run
    may have lost the file), so that every process skips it alike."""
    import torch

    from ssl_vit.models.init_weights import init_objective

    problem = None
    try:
        init_objective(vit, cfg.model)
    except ValueError as err:
        problem = str(err)
    failed = accelerator.gather(torch.tensor([problem is not None], device=accelerator.device))
    if not failed.any():
        return True
    if accelerator.is_main_process:
        why = problem or "it does not load on every process"
        print(f"ssl-vit pretrain: warning: no k-NN of the initial weights: {why}", file=sys.stderr)
    return False


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from ssl_vit.bench.benchmark import format_report, run_benchmark

    check_output(args.out, "--out", file="benchmark.json")
    result = run_benchmark(_pretrain_config(args.recipe, args.set), steps=args.steps, synthetic=args.synthetic,
                           peak_tflops=args.peak_tflops, decode_samples=args.decode_samples,
                           encoder_batch=args.encoder_batch, loader_only=args.loader_only,
                           loader_rounds=args.loader_rounds)
    print(format_report(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _cmd_benchmark_suite(args: argparse.Namespace) -> int:
    from ssl_vit.bench.suite import run_suite, select_cases

    if args.list:
        for case in select_cases(args.quick, args.only):
            print(f"{case.name}: ssl-vit benchmark {case.recipe} {' '.join(case.args)}".rstrip()
                  + ("  (real data)" if case.real_data else ""))
        return 0
    check_output(args.out, "--out")
    return run_suite(Path(args.out), quick=args.quick, only=args.only, steps=args.steps, shards=args.shards,
                     overrides=args.set, timeout=args.case_timeout)


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from ssl_vit.config.pretrain import to_dict

    _, cfg = load_any_config(args.recipe, args.set)  # a pretraining or a fine-tuning recipe
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_make_shards(args: argparse.Namespace) -> int:
    from ssl_vit.data.writer import write_shards

    summary = write_shards(args.src, args.out, prefix=args.prefix, max_count=args.max_count,
                           max_size=int(args.max_size_mb * 2**20), max_side=args.max_side,
                           shuffle=not args.no_shuffle)
    n = len(summary.classes or ())
    labels = f"{n} class{'es' if n != 1 else ''}" if n else "unlabeled"
    print(f"wrote {summary.n_samples} samples ({labels}) to {summary.n_shards} shards: {summary.pattern}; "
          f"skipped {summary.n_skipped} unreadable files")
    return 0


def _cmd_make_digits(args: argparse.Namespace) -> int:
    from ssl_vit.data.digits import write_digits

    try:
        data = write_digits(args.out)
    except ImportError as err:  # scikit-learn is an optional extra
        print(f"ssl-vit make-digits: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {data.n_train} train and {data.n_val} val digits ({len(data.classes)} classes): {data.train}, "
          f"{data.val}\npretrain on them: ssl-vit pretrain dino_demo_tiny {data.pretrain_args()}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ssl_vit.training.checkpoint import export_run

    print(f"exported backbone: {export_run(args.run_dir, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ssl_vit.cli.eval import add_eval_commands

    parser = OneLineParser("ssl-vit",
                           description="Self-supervised ViT pretraining (MAE, DINO, DINOv2), evaluation, export.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a ViT from a YAML recipe (no recipe: the built-in demo)")
    add_recipe_args(p, DEMO_RECIPE)
    p.add_argument("--no-knn", action="store_true", help="skip the k-NN evaluation after training")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("benchmark", help="step time, images/s, memory, data wait, MFU, loader and MAE encoder speed")
    add_recipe_args(p, DEMO_RECIPE)
    p.add_argument("--synthetic", action="store_true", help="random on-device batches: the model without the loader")
    p.add_argument("--loader-only", action="store_true", help="only the loader vs single-core decode+augment rates")
    p.add_argument("--steps", type=COUNT, default=10,
                   help="timed optimizer steps after one warm-up; loader batches with --loader-only (default: 10)")
    p.add_argument("--peak-tflops", type=POSITIVE, default=None,
                   help="device peak for MFU (default: table for H100/H200/A100; none on CPU)")
    p.add_argument("--decode-samples", type=COUNT, default=300,
                   help="samples timed for the single-core decode+augment rate (default: 300)")
    p.add_argument("--loader-rounds", type=COUNT, default=3,
                   help="each loader rate is the best of this many timed rounds (default: 3)")
    p.add_argument("--encoder-batch", type=COUNT, default=None,
                   help="batch of the masked vs full encoder timing (default: data.batch_size)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("benchmark-suite", help="the standard benchmark cases (GPU node, or --quick on a CPU), "
                                               "each in its own process, and one Markdown table")
    p.add_argument("--out", default="benchmark-suite", help="folder for each case's JSON and suite.md "
                                                            "(default: ./benchmark-suite)")
    p.add_argument("--quick", action="store_true", help="the demo recipes: minutes on a CPU")
    p.add_argument("--only", nargs="+", metavar="CASE", help="run only these cases (see --list)")
    p.add_argument("--list", action="store_true", help="print the cases and their commands, run nothing")
    p.add_argument("--steps", type=COUNT, default=100, help="timed steps of each case that sets none (default: 100)")
    p.add_argument("--shards", default=None, help="shards for the real-data cases (default: synthetic JPEG shards "
                                                  "made in OUT/shards; --quick: the built-in demo data)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every case")
    p.add_argument("--case-timeout", type=POSITIVE, default=900.0,
                   help="seconds before a case is stopped (default: 900)")
    p.set_defaults(func=_cmd_benchmark_suite)

    p = sub.add_parser("config", help="print the resolved config of a pretraining or fine-tuning recipe plus "
                                      "overrides, as YAML")
    add_recipe_args(p, DEMO_RECIPE)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("make-shards", help="turn an image folder into WebDataset tar shards")
    p.add_argument("src", help="image folder (class sub-folders become integer labels)")
    p.add_argument("out", help="output folder for the shards")
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    p.add_argument("--max-count", type=COUNT, default=10_000, help="samples per shard (default: 10000)")
    p.add_argument("--max-size-mb", type=POSITIVE, default=1024, help="MiB per shard (default: 1024)")
    p.add_argument("--max-side", type=COUNT, default=None,
                   help="downsize images whose short side exceeds this many pixels")
    p.add_argument("--no-shuffle", action="store_true",
                   help="write files in path order (default: a fixed shuffle, so each shard mixes classes)")
    p.set_defaults(func=_cmd_make_shards)

    p = sub.add_parser("make-digits", help="scikit-learn's handwritten digits (1,797 real images, 10 classes) as "
                                          "32 px train/val shards: small real data for the demo recipes")
    p.add_argument("out", help="output folder for the shards (empty or new)")
    p.set_defaults(func=_cmd_make_digits)

    p = sub.add_parser("export", help="export a run's backbone (safetensors + timm json) from its newest checkpoint")
    p.add_argument("run_dir", help="run directory holding config.yaml and checkpoints/")
    p.add_argument("--out", default=None, help="output folder (default: the run directory)")
    p.set_defaults(func=_cmd_export)

    add_eval_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command, its expected failures as one line each: no traceback for what the user can fix."""
    try:
        args = build_parser().parse_args(argv)  # the commands import torch: seconds in which a Ctrl-C is likely
        from ssl_vit.training.monitor import RunAborted

        try:
            code = args.func(args)
        except RunAborted as err:  # the run stopped itself (bad data, diverged): one line naming what to do
            print(f"ssl-vit {args.command}: stopped: {err}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as err:  # user input (ConfigError is one), or the filesystem said no: not a bug
            print(f"ssl-vit {args.command}: error: {one_line(err)}", file=sys.stderr)
            return 2 if isinstance(err, (ValueError, FileNotFoundError)) else 1  # 1: read-only, full, ...
        if code == 0:  # not after a failure: a rank that failed alone must not wait for the others forever
            close_process_group()
        return code
    except KeyboardInterrupt:  # Ctrl-C before training handles it (or a second one during training)
        words = [w for w in (sys.argv[1:] if argv is None else argv) if not w.startswith("-")]
        print(f"ssl-vit {words[0]}: interrupted" if words else "ssl-vit: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, what a shell reports for a process Ctrl-C ended


def one_line(err: Exception) -> str:
    """`strerror: path` for what the OS raised (`No space left on device: runs/x/...`), else the message."""
    if not isinstance(err, OSError) or err.strerror is None:
        return str(err)
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    return f"{err.strerror}: {paths}" if paths else err.strerror


def close_process_group() -> None:
    """Every rank waits for the others, then closes its process group: a rank that exits while another still
    talks to it over gloo aborts (SIGABRT, "terminate called without an active exception") after a good run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_tool(command: str) -> None:
    """Entry of the `tools/<command>.py` scripts (for `accelerate launch tools/<command>.py ...`)."""
    sys.exit(main([command, *sys.argv[1:]]))
