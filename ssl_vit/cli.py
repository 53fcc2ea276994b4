"""`ssl-vit <command>`: a thin layer of argument parsing over the library. Also `python -m ssl_vit` and
`accelerate launch -m ssl_vit <command>` / `accelerate launch tools/<command>.py`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEMO_RECIPE = "mae_demo_tiny.yaml"
FINETUNE_DEMO_RECIPE = "finetune_demo_tiny.yaml"


def _recipe_path(recipe: str | None, default: str = DEMO_RECIPE) -> Path:
    """A recipe path, a bare name from recipes/ (`mae_vit_base_p16`), or the built-in demo when None."""
    if recipe is None:
        return RECIPES_DIR / default
    path = Path(recipe)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / recipe, RECIPES_DIR / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    return path  # load_config reports it as not found


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ssl_vit.config import load_config
    from ssl_vit.distributed import make_accelerator
    from ssl_vit.train import pretrain, resolve_demo

    cfg = resolve_demo(load_config(_recipe_path(args.recipe), args.set))
    accelerator = make_accelerator(cfg.train.precision)
    result = pretrain(cfg, accelerator)
    if args.no_knn or not (cfg.eval.knn_train and cfg.eval.knn_val) or result.backbone is None:
        return 0
    from ssl_vit.checkpoint import load_backbone
    from ssl_vit.eval.knn import knn_eval

    scores = {}
    for name, random_init in (("pretrained", False), ("random init", True)):
        vit, _ = load_backbone(result.backbone, random_init=random_init)
        scores[name] = knn_eval(vit, cfg.eval, accelerator, allow_pipe=cfg.data.allow_pipe)[cfg.eval.knn_k]
    if accelerator.is_main_process:
        (result.run_dir / "knn.json").write_text(json.dumps(scores, indent=2) + "\n")
        print(f"k-NN (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}, {cfg.eval.pool} features) "
              f"top-1: pretrained {scores['pretrained']['top1']:.1f}% vs random init "
              f"{scores['random init']['top1']:.1f}%  (top-5: {scores['pretrained']['top5']:.1f}% vs "
              f"{scores['random init']['top5']:.1f}%)")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from ssl_vit.benchmark import format_report, run_benchmark
    from ssl_vit.config import load_config
    from ssl_vit.train import resolve_demo

    cfg = resolve_demo(load_config(_recipe_path(args.recipe), args.set))
    result = run_benchmark(cfg, steps=args.steps, synthetic=args.synthetic, peak_tflops=args.peak_tflops,
                           decode_samples=args.decode_samples, encoder_batch=args.encoder_batch,
                           loader_only=args.loader_only)
    print(format_report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from ssl_vit.config import load_config, to_dict

    print(yaml.safe_dump(to_dict(load_config(_recipe_path(args.recipe), args.set)), sort_keys=False), end="")
    return 0


def _cmd_make_shards(args: argparse.Namespace) -> int:
    from ssl_vit.data.writer import write_shards

    summary = write_shards(args.src, args.out, prefix=args.prefix, max_count=args.max_count,
                           max_size=int(args.max_size_mb * 2**20), max_side=args.max_side,
                           shuffle=not args.no_shuffle)
    labels = f"{len(summary.classes)} classes" if summary.classes else "unlabeled"
    print(f"wrote {summary.n_samples} samples ({labels}) to {summary.n_shards} shards: {summary.pattern}; "
          f"skipped {summary.n_skipped} unreadable files")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ssl_vit.checkpoint import export_run

    path = export_run(args.run_dir, args.out)
    print(f"exported backbone: {path}")
    return 0


def _cmd_knn(args: argparse.Namespace) -> int:
    import dataclasses

    from ssl_vit.checkpoint import load_backbone
    from ssl_vit.config import EvalConfig
    from ssl_vit.distributed import make_accelerator
    from ssl_vit.eval.features import FeatureSpec
    from ssl_vit.eval.knn import knn_eval

    cfg = dataclasses.replace(EvalConfig(), knn_train=args.train, knn_val=args.val, knn_k=args.k[0],
                              knn_temperature=args.temperature, pool=args.pool, batch_size=args.batch_size,
                              num_workers=args.num_workers, crop_ratio=args.crop_ratio)
    spec = FeatureSpec(args.pool, args.n_last_blocks, args.avgpool)
    accelerator = make_accelerator()
    vit, _ = load_backbone(args.backbone, random_init=args.random_init)
    results = knn_eval(vit, cfg, accelerator, ks=args.k, allow_pipe=args.allow_pipe, spec=spec,
                       cache_dir=args.cache_dir)
    if accelerator.is_main_process:
        for k, r in results.items():
            print(f"k-NN k={k} T={args.temperature} ({spec.describe()}): top-1 {r['top1']:.2f}%  "
                  f"top-5 {r['top5']:.2f}%")
        if args.out:
            Path(args.out).write_text(json.dumps({str(k): r for k, r in results.items()}, indent=2) + "\n")
    return 0


def _cmd_linear_probe(args: argparse.Namespace) -> int:
    import torch

    from ssl_vit.checkpoint import load_backbone
    from ssl_vit.distributed import make_accelerator
    from ssl_vit.eval.linear import ProbeData, customize, linear_probe, probe_protocol

    torch.manual_seed(args.seed)  # a reproducible random init (the baseline), hence a feature-cache hit next time
    vit, meta = load_backbone(args.backbone, random_init=args.random_init)
    proto = customize(probe_protocol(args.protocol, vit.embed_dim), pool=args.pool, n_last_blocks=args.n_last_blocks,
                      avgpool=args.avgpool, base_lrs=args.lr, weight_decays=args.wd, epochs=args.epochs,
                      warmup_epochs=args.warmup_epochs, batch_size=args.batch_size)
    data = ProbeData(args.train, args.val, args.extract_batch_size, args.num_workers, args.crop_ratio,
                     args.allow_pipe, args.cache_dir, train_size=args.train_size)
    accelerator = make_accelerator()
    result = linear_probe(vit, data, proto, accelerator, augment=args.augment, seed=args.seed, out_dir=args.out,
                          meta={"backbone": str(args.backbone), "random_init": args.random_init,
                                "model_name": meta["model_name"]})
    if accelerator.is_main_process:
        for head in result["heads"]:
            print(f"  {head['name']}: top-1 {head['top1']:.2f}%  top-5 {head['top5']:.2f}%  "
                  f"(epoch {head['best_epoch']})")
        best = result["best"]
        print(f"linear probe ({args.protocol}, {result['features']}): best top-1 {best['top1']:.2f}%  top-5 "
              f"{best['top5']:.2f}%  at base lr {best['base_lr']:g}, wd {best['weight_decay']:g}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ssl_vit.distributed import make_accelerator
    from ssl_vit.eval.finetune import finetune, resolve_finetune_demo
    from ssl_vit.finetune_config import load_finetune_config

    cfg = resolve_finetune_demo(load_finetune_config(_recipe_path(args.recipe, FINETUNE_DEMO_RECIPE), args.set))
    accelerator = make_accelerator(cfg.train.precision)
    result = finetune(cfg, accelerator)
    accelerator.print(f"fine-tune: best val top-1 {result.best['top1']:.2f}%  top-5 {result.best['top5']:.2f}% "
                      f"(epoch {result.best['epoch']}); exported {result.exported}")
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from ssl_vit.checkpoint import load_run_objective
    from ssl_vit.distributed import make_accelerator
    from ssl_vit.eval.visualize import attention_figure, load_images, mae_figure, save_png

    if not args.backbone and not args.mae_run:
        raise ValueError("give --backbone (attention maps) and/or --mae-run (MAE reconstructions)")
    if not make_accelerator().is_main_process:  # under a launcher, one process draws
        return 0
    source = dict(paths=args.images, shards=args.shards, n=args.n, crop_ratio=args.crop_ratio,
                  allow_pipe=args.allow_pipe)
    if args.backbone:
        from ssl_vit.checkpoint import load_backbone

        vit, _ = load_backbone(args.backbone, random_init=args.random_init)
        images = load_images(vit.patch_embed.img_size[0], **source)
        path = save_png(attention_figure(vit, images, keep=args.keep, scale=args.scale),
                        Path(args.out) / "attention.png")
        print(f"attention maps: {path}")
    if args.mae_run:
        objective, step = load_run_objective(args.mae_run)
        images = load_images(objective.backbone.patch_embed.img_size[0], **source)
        path = save_png(mae_figure(objective, images, seed=args.seed, scale=args.scale),
                        Path(args.out) / "mae_reconstruction.png")
        print(f"MAE reconstructions (step {step}): {path}")
    return 0


def _add_feature_args(p: argparse.ArgumentParser, pool_default: str | None) -> None:
    p.add_argument("--pool", choices=["cls", "avg"], default=pool_default,
                   help=f"token pooled from each block (default: {pool_default or 'the protocol'})")
    p.add_argument("--n-last-blocks", type=int, default=1 if pool_default else None,
                   help="concatenate the pooled tokens of the last N blocks (DINO: 4 for ViT-S)")
    p.add_argument("--avgpool", action=argparse.BooleanOptionalAction, default=False if pool_default else None,
                   help="append the last block's mean patch token to cls features (DINO: ViT-B)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl-vit", description="Self-supervised ViT pretraining (MAE).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a ViT from a YAML recipe (no recipe: the built-in demo)")
    p.add_argument("recipe", nargs="?", help=f"recipe file or name in recipes/ (default: {DEMO_RECIPE})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.base_lr=1e-4 (repeatable)")
    p.add_argument("--no-knn", action="store_true", help="skip the k-NN evaluation after training")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("benchmark", help="step time, images/s, memory, data wait, MFU, loader and MAE encoder speed")
    p.add_argument("recipe", nargs="?", help=f"recipe file or name in recipes/ (default: {DEMO_RECIPE})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (repeatable)")
    p.add_argument("--synthetic", action="store_true", help="random on-device batches: the model without the loader")
    p.add_argument("--loader-only", action="store_true", help="only the loader vs single-core decode+augment rates")
    p.add_argument("--steps", type=int, default=10,
                   help="timed optimizer steps after one warm-up; loader batches with --loader-only (default: 10)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: table for H100/H200/A100; none on CPU)")
    p.add_argument("--decode-samples", type=int, default=300,
                   help="samples timed for the single-core decode+augment rate (default: 300)")
    p.add_argument("--encoder-batch", type=int, default=None,
                   help="batch of the masked vs full encoder timing (default: data.batch_size)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("config", help="print the resolved config of a recipe plus overrides, as YAML")
    p.add_argument("recipe", nargs="?", help=f"recipe file or name in recipes/ (default: {DEMO_RECIPE})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (repeatable)")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("make-shards", help="turn an image folder into WebDataset tar shards")
    p.add_argument("src", help="image folder (class sub-folders become integer labels)")
    p.add_argument("out", help="output folder for the shards")
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per shard (default: 10000)")
    p.add_argument("--max-size-mb", type=float, default=1024, help="MiB per shard (default: 1024)")
    p.add_argument("--max-side", type=int, default=None,
                   help="downsize images whose short side exceeds this many pixels")
    p.add_argument("--no-shuffle", action="store_true",
                   help="write files in path order (default: a fixed shuffle, so each shard mixes classes)")
    p.set_defaults(func=_cmd_make_shards)

    p = sub.add_parser("export", help="export a run's backbone (safetensors + timm json) from its newest checkpoint")
    p.add_argument("run_dir", help="run directory holding config.yaml and checkpoints/")
    p.add_argument("--out", default=None, help="output folder (default: the run directory)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("knn", help="weighted k-NN accuracy of a frozen backbone on labelled shards")
    p.add_argument("--backbone", required=True, help="run dir or backbone.safetensors (with backbone.json)")
    p.add_argument("--train", required=True, help="labelled shards for the memory bank")
    p.add_argument("--val", required=True, help="labelled shards to classify")
    p.add_argument("--k", type=int, nargs="+", default=[20], help="neighbour counts (default: 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature (default: 0.07)")
    _add_feature_args(p, "cls")
    p.add_argument("--crop-ratio", type=float, default=0.875, help="eval centre-crop ratio (default: 0.875)")
    p.add_argument("--batch-size", type=int, default=256, help="per-device batch (default: 256)")
    p.add_argument("--num-workers", type=int, default=4, help="loader workers per rank (default: 4)")
    p.add_argument("--random-init", action="store_true", help="same architecture, untrained (baseline)")
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs (they run commands)")
    p.add_argument("--cache-dir", default=None, help="cache the features here (safetensors, keyed by backbone + data)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=_cmd_knn)

    p = sub.add_parser("linear-probe", help="linear probe of a frozen backbone: a grid of lrs trained at once")
    p.add_argument("--backbone", required=True, help="run dir or backbone.safetensors (with backbone.json)")
    p.add_argument("--train", required=True, help="labelled train shards")
    p.add_argument("--val", required=True, help="labelled val shards (the best head is reported on them)")
    p.add_argument("--protocol", choices=["mae", "dino"], default="mae",
                   help="mae: BN + linear on cls, LARS; dino: last-4 cls (ViT-S) or cls + avg (ViT-B), SGD")
    _add_feature_args(p, None)
    p.add_argument("--lr", type=float, nargs="+", default=None, help="base lrs (per 256 images) of the grid")
    p.add_argument("--wd", type=float, nargs="+", default=None, help="weight decays of the grid")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the protocol's, 90 / 100)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="linear warmup epochs (default: the protocol's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch of the heads (default: the protocol's)")
    p.add_argument("--augment", action="store_true",
                   help="slow path: encode freshly augmented images every step (the papers' protocol)")
    p.add_argument("--train-size", type=int, default=None, help="--augment: images per epoch (default: counted)")
    p.add_argument("--extract-batch-size", type=int, default=256, help="per-device batch of the backbone")
    p.add_argument("--num-workers", type=int, default=4, help="loader workers per rank (default: 4)")
    p.add_argument("--crop-ratio", type=float, default=0.875, help="eval centre-crop ratio (default: 0.875)")
    p.add_argument("--cache-dir", default=None, help="cache the features here (safetensors, keyed by backbone + data)")
    p.add_argument("--random-init", action="store_true", help="same architecture, untrained (baseline)")
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs (they run commands)")
    p.add_argument("--seed", type=int, default=0, help="head init and batch order (default: 0)")
    p.add_argument("--out", default=None, help="folder for linear_probe.json, log.jsonl and TensorBoard curves")
    p.set_defaults(func=_cmd_linear_probe)

    p = sub.add_parser("finetune", help="fine-tune an exported backbone with a classifier (MAE's recipe)")
    p.add_argument("recipe", nargs="?", help=f"recipe file or name in recipes/ (default: {FINETUNE_DEMO_RECIPE})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any fine-tune config key, e.g. --set model.backbone=runs/mae (repeatable)")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("visualize", help="PNGs: cls attention per head + rollout; MAE reconstructions")
    p.add_argument("--backbone", default=None, help="backbone for attention maps (run dir or .safetensors)")
    p.add_argument("--mae-run", default=None, help="MAE run dir: reconstructions from its newest checkpoint")
    p.add_argument("--images", nargs="+", default=(), help="image files (else the first --n of --shards)")
    p.add_argument("--shards", default=None, help="shards to take the first --n images from")
    p.add_argument("--n", type=int, default=4, help="images taken from --shards (default: 4)")
    p.add_argument("--keep", type=float, default=0.6, help="share of attention mass the masks keep (default: 0.6)")
    p.add_argument("--scale", type=int, default=None, help="pixel upscaling of every tile (default: to ≥ 128 px)")
    p.add_argument("--crop-ratio", type=float, default=0.875, help="resize/centre-crop ratio (default: 0.875)")
    p.add_argument("--random-init", action="store_true", help="attention of the untrained architecture")
    p.add_argument("--seed", type=int, default=0, help="seed of the MAE masks (default: 0)")
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs (they run commands)")
    p.add_argument("--out", default="visualizations", help="output folder (default: visualizations)")
    p.set_defaults(func=_cmd_visualize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ssl_vit.config import ConfigError
    from ssl_vit.train_monitor import RunAborted

    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:  # user input: one line, no traceback
        print(f"ssl-vit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunAborted as err:  # the run stopped itself (bad data, diverged): one line naming what to do
        print(f"ssl-vit {args.command}: stopped: {err}", file=sys.stderr)
        return 1


def run_tool(command: str) -> None:
    """Entry of the `tools/<command>.py` scripts (for `accelerate launch tools/<command>.py ...`)."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
