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


def _recipe_path(recipe: str | None) -> Path:
    """A recipe path, a bare name from recipes/ (`mae_vit_base_p16`), or the built-in demo when None."""
    if recipe is None:
        return RECIPES_DIR / DEMO_RECIPE
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


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from ssl_vit.config import load_config, to_dict

    print(yaml.safe_dump(to_dict(load_config(_recipe_path(args.recipe), args.set)), sort_keys=False), end="")
    return 0


def _cmd_make_shards(args: argparse.Namespace) -> int:
    from ssl_vit.data.writer import write_shards

    summary = write_shards(args.src, args.out, prefix=args.prefix, max_count=args.max_count,
                           max_size=int(args.max_size_mb * 2**20), max_side=args.max_side)
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
    from ssl_vit.eval.knn import knn_eval

    cfg = dataclasses.replace(EvalConfig(), knn_train=args.train, knn_val=args.val, knn_k=args.k[0],
                              knn_temperature=args.temperature, pool=args.pool, batch_size=args.batch_size,
                              num_workers=args.num_workers, crop_ratio=args.crop_ratio)
    accelerator = make_accelerator()
    vit, _ = load_backbone(args.backbone, random_init=args.random_init)
    results = knn_eval(vit, cfg, accelerator, ks=args.k, allow_pipe=args.allow_pipe)
    if accelerator.is_main_process:
        for k, r in results.items():
            print(f"k-NN k={k} T={args.temperature} ({args.pool}): top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%")
        if args.out:
            Path(args.out).write_text(json.dumps({str(k): r for k, r in results.items()}, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl-vit", description="Self-supervised ViT pretraining (MAE).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a ViT from a YAML recipe (no recipe: the built-in demo)")
    p.add_argument("recipe", nargs="?", help=f"recipe file or name in recipes/ (default: {DEMO_RECIPE})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.base_lr=1e-4 (repeatable)")
    p.add_argument("--no-knn", action="store_true", help="skip the k-NN evaluation after training")
    p.set_defaults(func=_cmd_pretrain)

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
    p.add_argument("--pool", choices=["cls", "avg"], default="cls", help="feature (default: cls)")
    p.add_argument("--crop-ratio", type=float, default=0.875, help="eval centre-crop ratio (default: 0.875)")
    p.add_argument("--batch-size", type=int, default=256, help="per-device batch (default: 256)")
    p.add_argument("--num-workers", type=int, default=4, help="loader workers per rank (default: 4)")
    p.add_argument("--random-init", action="store_true", help="same architecture, untrained (baseline)")
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs (they run commands)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=_cmd_knn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ssl_vit.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:  # user input: one line, no traceback
        print(f"ssl-vit {args.command}: error: {err}", file=sys.stderr)
        return 2


def run_tool(command: str) -> None:
    """Entry of the `tools/<command>.py` scripts (for `accelerate launch tools/<command>.py ...`)."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
