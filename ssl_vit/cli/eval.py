"""The evaluation commands of `ssl-vit`: knn, linear-probe, finetune, visualize (thin, like cli.py)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ssl_vit.eval.baseline import RANDOM_INIT_SEED

FINETUNE_DEMO_RECIPE = "finetune_demo_tiny.yaml"


def check_output(path: str | Path | None, flag: str, *, folder: bool) -> None:
    """Refuse an output path that could not be written, before any work: failing there at the end would lose
    the features and scores computed by then. A folder (`folder`) or a file; missing parents are made later."""
    if path is None:
        return
    target = Path(path)
    if folder and target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {target} is a file, not a folder")
    if not folder and target.is_dir():
        raise ValueError(f"{flag} {target} is a folder; give a file path, e.g. {target / 'knn.json'}")
    existing = target if target.is_dir() else target.parent
    while not existing.exists() and existing != existing.parent:  # the nearest part of it that exists
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (target.is_file() and not os.access(target, os.W_OK)):
        raise ValueError(f"{flag} {target}: {target if target.is_file() else existing} is not writable")


def _cmd_knn(args: argparse.Namespace) -> int:
    import dataclasses

    from ssl_vit.config.pretrain import EvalConfig
    from ssl_vit.eval.baseline import load_eval_backbone
    from ssl_vit.eval.features import FeatureSpec, describe_skipped
    from ssl_vit.eval.knn import knn_report
    from ssl_vit.training.distributed import make_accelerator

    check_output(args.out, "--out", folder=False)
    check_output(args.cache_dir, "--cache-dir", folder=True)
    cfg = dataclasses.replace(EvalConfig(), knn_train=args.train, knn_val=args.val, knn_k=args.k[0],
                              knn_temperature=args.temperature, pool=args.pool, batch_size=args.batch_size,
                              num_workers=args.num_workers, crop_ratio=args.crop_ratio)
    spec = FeatureSpec(args.pool, args.n_last_blocks, args.avgpool)
    accelerator = make_accelerator()
    vit, _ = load_eval_backbone(args.backbone, random_init=args.random_init, seed=args.seed)
    report = knn_report(vit, cfg, accelerator, ks=args.k, allow_pipe=args.allow_pipe, spec=spec,
                        cache_dir=args.cache_dir)
    if accelerator.is_main_process:
        print(f"k-NN data: {report.n_train} train images ({describe_skipped(report.skipped['train'])}), "
              f"{report.n_val} val images ({describe_skipped(report.skipped['val'])})")
        for k, r in report.scores.items():
            print(f"k-NN k={k} T={args.temperature} ({spec.describe()}): top-1 {r['top1']:.2f}%  "
                  f"top-5 {r['top5']:.2f}%")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0


def _cmd_linear_probe(args: argparse.Namespace) -> int:
    import torch

    from ssl_vit.eval.baseline import load_eval_backbone
    from ssl_vit.eval.features import describe_skipped
    from ssl_vit.eval.linear import ProbeData, customize, probe_protocol
    from ssl_vit.eval.linear_probe import linear_probe
    from ssl_vit.training.distributed import make_accelerator

    check_output(args.out, "--out", folder=True)
    check_output(args.cache_dir, "--cache-dir", folder=True)
    # a reproducible random init (the baseline), hence a feature-cache hit next time; as for `knn --seed`
    vit, meta = load_eval_backbone(args.backbone, random_init=args.random_init, seed=args.seed)
    torch.manual_seed(args.seed)  # views the --augment probe draws in this process (num_workers 0)
    protocol = probe_protocol(args.protocol, vit.embed_dim)
    if args.epochs is not None and args.warmup_epochs is None and args.epochs < protocol.warmup_epochs:
        raise ValueError(f"--epochs {args.epochs} is shorter than the {args.protocol} protocol's "
                         f"{protocol.warmup_epochs} warmup epochs; set --warmup-epochs (0 to {args.epochs})")
    proto = customize(protocol, pool=args.pool, n_last_blocks=args.n_last_blocks,
                      avgpool=args.avgpool, base_lrs=args.lr, weight_decays=args.wd, epochs=args.epochs,
                      warmup_epochs=args.warmup_epochs, batch_size=args.batch_size)
    data = ProbeData(args.train, args.val, args.extract_batch_size, args.num_workers, args.crop_ratio,
                     args.allow_pipe, args.cache_dir, train_size=args.train_size)
    accelerator = make_accelerator()
    result = linear_probe(vit, data, proto, accelerator, augment=args.augment, seed=args.seed, out_dir=args.out,
                          meta={"backbone": str(args.backbone), "random_init": args.random_init,
                                "model_name": meta["model_name"]})
    if accelerator.is_main_process:
        print(f"linear probe data: {result['n_train']} train images ({describe_skipped(result['skipped']['train'])}), "
              f"{result['n_val']} val images ({describe_skipped(result['skipped']['val'])})")
        for head in result["heads"]:
            print(f"  {head['name']}: top-1 {head['top1']:.2f}%  top-5 {head['top5']:.2f}%  "
                  f"(epoch {head['best_epoch']})")
        best = result["best"]
        print(f"linear probe ({args.protocol}, {result['features']}): best top-1 {best['top1']:.2f}%  top-5 "
              f"{best['top5']:.2f}%  at base lr {best['base_lr']:g}, wd {best['weight_decay']:g}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ssl_vit.config.finetune import load_finetune_config
    from ssl_vit.config.recipes import recipe_path
    from ssl_vit.eval.finetune import finetune, resolve_finetune_demo
    from ssl_vit.training.distributed import make_accelerator

    cfg = resolve_finetune_demo(load_finetune_config(recipe_path(args.recipe, FINETUNE_DEMO_RECIPE), args.set))
    accelerator = make_accelerator(cfg.train.precision)
    result = finetune(cfg, accelerator)
    if not result.stopped_by:  # a stopped run said so, and how to go on
        accelerator.print(f"fine-tune: best val top-1 {result.best['top1']:.2f}%  top-5 {result.best['top5']:.2f}% "
                          f"(epoch {result.best['epoch']}); exported {result.exported}")
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from ssl_vit.eval.baseline import load_eval_backbone
    from ssl_vit.eval.visualize import attention_figure, load_images, reconstruction_figure, save_png
    from ssl_vit.training.checkpoint import load_run_objective
    from ssl_vit.training.distributed import make_accelerator

    if not args.backbone and not args.mae_run:
        raise ValueError("give --backbone (attention maps) and/or --mae-run (MAE reconstructions)")
    check_output(args.out, "--out", folder=True)
    if not make_accelerator().is_main_process:  # under a launcher, one process draws
        return 0
    source = dict(paths=args.images, shards=args.shards, n=args.n, crop_ratio=args.crop_ratio,
                  allow_pipe=args.allow_pipe)
    if args.backbone:
        vit, _ = load_eval_backbone(args.backbone, random_init=args.random_init)  # the seeded baseline init
        images = load_images(vit.patch_embed.img_size[0], **source)
        path = save_png(attention_figure(vit, images, keep=args.keep, scale=args.scale),
                        Path(args.out) / "attention.png")
        print(f"attention maps: {path}")
    if args.mae_run:
        objective, step = load_run_objective(args.mae_run)
        images = load_images(objective.backbone.patch_embed.img_size[0], **source)
        path = save_png(reconstruction_figure(objective, images, seed=args.seed, scale=args.scale),
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


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Register knn, linear-probe, finetune and visualize on the `ssl-vit` parser."""
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
    p.add_argument("--seed", type=int, default=RANDOM_INIT_SEED,
                   help=f"seed of the --random-init weights (default: {RANDOM_INIT_SEED})")
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

    p = sub.add_parser("finetune", help="fine-tune an exported backbone with a classifier (MAE's recipe); "
                                        "rerun to resume")
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
