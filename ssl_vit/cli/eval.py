"""The evaluation commands of `ssl-vit`: knn, linear-probe, finetune, visualize (thin, like main.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ssl_vit.cli.args import COUNT, COUNT_OR_ZERO, NON_NEGATIVE, POSITIVE, SEED, SHARE, add_recipe_args, check_output
from ssl_vit.eval.baseline import RANDOM_INIT_SEED, load_eval_backbone

FINETUNE_DEMO_RECIPE = "finetune_demo_tiny.yaml"


def _cmd_knn(args: argparse.Namespace) -> int:
    from ssl_vit.config.pretrain import EvalConfig
    from ssl_vit.eval.features import FeatureSpec, describe_skipped
    from ssl_vit.eval.knn import knn_report
    from ssl_vit.training.distributed import make_accelerator

    check_output(args.out, "--out", file="knn.json")
    check_output(args.cache_dir, "--cache-dir")
    cfg = EvalConfig(knn_train=args.train, knn_val=args.val, knn_k=args.k[0], knn_temperature=args.temperature,
                     pool=args.pool, batch_size=args.batch_size, num_workers=args.num_workers,
                     crop_ratio=args.crop_ratio)
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

    from ssl_vit.eval.features import describe_skipped
    from ssl_vit.eval.linear import ProbeData, customize, probe_protocol
    from ssl_vit.eval.linear_probe import linear_probe
    from ssl_vit.training.distributed import make_accelerator

    check_output(args.out, "--out")
    check_output(args.cache_dir, "--cache-dir")
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
    from ssl_vit.config.pretrain import ConfigError
    from ssl_vit.config.recipes import finetune_votes, recipe_path
    from ssl_vit.eval.finetune import finetune, resolve_finetune_demo
    from ssl_vit.training.distributed import make_accelerator

    path = recipe_path(args.recipe, FINETUNE_DEMO_RECIPE)
    if finetune_votes(path, args.set) < 0:  # named as such, not by its `objective` as an unknown key
        raise ConfigError(f"{args.recipe} is a pretraining recipe: run `ssl-vit pretrain {args.recipe}`")
    cfg = resolve_finetune_demo(load_finetune_config(path, args.set))
    accelerator = make_accelerator(cfg.train.precision)
    result = finetune(cfg, accelerator)
    if not result.stopped_by:  # a stopped run said so, and how to go on
        accelerator.print(f"fine-tune: best val top-1 {result.best['top1']:.2f}%  top-5 {result.best['top5']:.2f}% "
                          f"(epoch {result.best['epoch']}); exported {result.exported}")
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from ssl_vit.eval.visualize import attention_figure, load_images, reconstruction_figure, save_png
    from ssl_vit.training.checkpoint import load_run_objective
    from ssl_vit.training.distributed import make_accelerator

    if not args.backbone and not args.mae_run:
        raise ValueError("give --backbone (attention maps) and/or --mae-run (MAE reconstructions)")
    check_output(args.out, "--out")
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


def _frozen_backbone_command(sub: argparse._SubParsersAction, name: str, help: str,
                             pool: str | None) -> argparse.ArgumentParser:
    """The arguments knn and linear-probe share (not as `parents=`: those share their actions, hence defaults)."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--backbone", required=True, help="run dir or backbone.safetensors (with backbone.json)")
    p.add_argument("--train", required=True, help="labelled train shards (k-NN: the memory bank)")
    p.add_argument("--val", required=True, help="labelled val shards to score (the probe's best head is reported)")
    p.add_argument("--pool", choices=["cls", "avg"], default=pool,
                   help=f"token pooled from each block (default: {pool or 'the protocol'})")
    p.add_argument("--n-last-blocks", type=COUNT, default=1 if pool else None,
                   help="concatenate the pooled tokens of the last N blocks (DINO: 4 for ViT-S)")
    p.add_argument("--avgpool", action=argparse.BooleanOptionalAction, default=False if pool else None,
                   help="append the last block's mean patch token to cls features (DINO: ViT-B)")
    p.add_argument("--crop-ratio", type=SHARE, default=0.875, help="eval centre-crop ratio (default: 0.875)")
    p.add_argument("--num-workers", type=COUNT_OR_ZERO, default=4, help="loader workers per rank (default: 4)")
    p.add_argument("--cache-dir", default=None, help="cache the features here (safetensors, keyed by backbone + data)")
    p.add_argument("--random-init", action="store_true", help="same architecture, untrained (baseline)")
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs (they run commands)")
    return p


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Register knn, linear-probe, finetune and visualize on the `ssl-vit` parser."""
    p = _frozen_backbone_command(sub, "knn", "weighted k-NN accuracy of a frozen backbone on labelled shards", "cls")
    p.add_argument("--k", type=COUNT, nargs="+", default=[20], help="neighbour counts (default: 20)")
    p.add_argument("--temperature", type=POSITIVE, default=0.07, help="vote temperature (default: 0.07)")
    p.add_argument("--batch-size", type=COUNT, default=256, help="per-device batch (default: 256)")
    p.add_argument("--seed", type=SEED, default=RANDOM_INIT_SEED,
                   help=f"seed of the --random-init weights (default: {RANDOM_INIT_SEED})")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=_cmd_knn)

    p = _frozen_backbone_command(sub, "linear-probe", "linear probe of a frozen backbone: a grid of lrs trained at "
                                 "once", None)
    p.add_argument("--protocol", choices=["mae", "dino"], default="mae",
                   help="mae: BN + linear on cls, LARS; dino: last-4 cls (ViT-S) or cls + avg (ViT-B), SGD")
    p.add_argument("--lr", type=POSITIVE, nargs="+", default=None, help="base lrs (per 256 images) of the grid")
    p.add_argument("--wd", type=NON_NEGATIVE, nargs="+", default=None, help="weight decays of the grid")
    p.add_argument("--epochs", type=COUNT, default=None, help="epochs (default: the protocol's, 90 / 100)")
    p.add_argument("--warmup-epochs", type=COUNT_OR_ZERO, default=None,
                   help="linear warmup epochs (default: the protocol's)")
    p.add_argument("--batch-size", type=COUNT, default=None, help="global batch of the heads (default: the protocol's)")
    p.add_argument("--augment", action="store_true",
                   help="slow path: encode freshly augmented images every step (the papers' protocol)")
    p.add_argument("--train-size", type=COUNT, default=None, help="--augment: images per epoch (default: counted)")
    p.add_argument("--extract-batch-size", type=COUNT, default=256, help="per-device batch of the backbone")
    p.add_argument("--seed", type=SEED, default=0, help="head init and batch order (default: 0)")
    p.add_argument("--out", default=None, help="folder for linear_probe.json, log.jsonl and TensorBoard curves")
    p.set_defaults(func=_cmd_linear_probe)

    p = sub.add_parser("finetune", help="fine-tune an exported backbone with a classifier (MAE's recipe); "
                                        "rerun to resume")
    add_recipe_args(p, FINETUNE_DEMO_RECIPE, "model.backbone=runs/mae")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("visualize", help="PNGs: cls attention per head + rollout; MAE reconstructions")
    p.add_argument("--backbone", default=None, help="backbone for attention maps (run dir or .safetensors)")
    p.add_argument("--mae-run", default=None, help="MAE run dir: reconstructions from its newest checkpoint")
    p.add_argument("--images", nargs="+", default=(), help="image files (else the first --n of --shards)")
    p.add_argument("--shards", default=None, help="shards to take the first --n images from")
    p.add_argument("--n", type=COUNT, default=4, help="images taken from --shards (default: 4)")
    p.add_argument("--keep", type=SHARE, default=0.6, help="share of attention mass the masks keep (default: 0.6)")
    p.add_argument("--scale", type=COUNT, default=None, help="pixel upscaling of every tile (default: to ≥ 128 px)")
    p.add_argument("--crop-ratio", type=SHARE, default=0.875, help="resize/centre-crop ratio (default: 0.875)")
    p.add_argument("--random-init", action="store_true", help="attention of the untrained architecture")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the MAE masks (default: 0)")
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs (they run commands)")
    p.add_argument("--out", default="visualizations", help="output folder (default: visualizations)")
    p.set_defaults(func=_cmd_visualize)
