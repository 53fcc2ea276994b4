"""Attention recomputed from qkv under the fused kernel, rollout and masks against naive loops, the PNGs."""


import pytest
import timm
import torch
from accelerate import Accelerator
from PIL import Image

from ssl_vit.cli.main import main
from ssl_vit.config.pretrain import dump_config, load_config
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.eval.visualize import attention_figure, attention_maps, attention_rollout, mass_mask, reconstruction_figure
from ssl_vit.methods import build_objective
from ssl_vit.models.backbone import build_backbone
from ssl_vit.training.checkpoint import export_backbone, save_checkpoint

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=0, dynamic_img_size=True)


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **KW).eval()


@torch.no_grad()
def test_recomputed_attention_reproduces_the_fused_block_output():
    vit, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    assert all(block.attn.fused_attn for block in vit.blocks)
    seen = {}
    hooks = [vit.blocks[i].attn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0], out)))
             for i in range(3)]
    maps = attention_maps(vit, x)
    for h in hooks:
        h.remove()
    assert all(block.attn.fused_attn for block in vit.blocks)  # nothing was switched off
    for i, a in enumerate(maps):
        attn = vit.blocks[i].attn
        inp, fused_out = seen[i]
        b, n, c = inp.shape
        v = attn.qkv(inp).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
        assert a.shape == (2, 3, n, n) and torch.allclose(a.sum(-1), torch.ones(2, 3, n))
        out = attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))  # what SDPA computed, with our weights
        assert torch.allclose(out, fused_out, atol=1e-5)
    assert len(maps) == len(vit.blocks)


def naive_rollout(maps):
    """A plain per-sample, per-layer loop: heads averaged, (A + I) row-normalised, multiplied through."""
    batch, _, n, _ = maps[0].shape
    out = []
    for b in range(batch):
        r = [[float(i == j) for j in range(n)] for i in range(n)]
        for layer in maps:
            a = layer[b].mean(dim=0).tolist()
            a = [[a[i][j] + (i == j) for j in range(n)] for i in range(n)]
            a = [[v / sum(row) for v in row] for row in a]
            r = [[sum(a[i][k] * r[k][j] for k in range(n)) for j in range(n)] for i in range(n)]
        out.append(r)
    return torch.tensor(out)


def test_rollout_matches_naive_loop():
    torch.manual_seed(0)
    maps = [torch.randn(2, 3, 6, 6).softmax(dim=-1) for _ in range(4)]
    got = attention_rollout(maps)
    assert torch.allclose(got, naive_rollout(maps), atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(2, 6), atol=1e-5)


def test_mass_mask_matches_dinos_ascending_formulation():
    torch.manual_seed(0)
    maps = torch.rand(4, 3, 5, 5)
    for keep in (0.3, 0.6, 0.9, 1.0):
        got = mass_mask(maps, keep)
        flat = maps.flatten(-2)
        values, idx = flat.sort(dim=-1)  # DINO: ascending, cumulative share > 1 - threshold is kept
        kept_sorted = (values / values.sum(-1, keepdim=True)).cumsum(-1) > 1 - keep + 1e-7
        want = torch.zeros_like(kept_sorted).scatter(-1, idx, kept_sorted).view(maps.shape)
        assert torch.equal(got, want)
        shares = (maps * got).flatten(-2).sum(-1) / maps.flatten(-2).sum(-1)
        assert (shares >= keep - 1e-6).all()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis")
    demo = ensure_demo_data(root / "demo", n_train=8, n_knn_train=8, n_knn_val=8)
    export_backbone(tiny_vit(), root / "bb", "vit_tiny_patch16_224", KW)
    # A minimal MAE run directory: config.yaml + one complete checkpoint, as pretrain leaves them.
    cfg = load_config(None, ["model.name=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8",
                             "model.embed_dim=48", "model.depth=2", "model.num_heads=2", "mae.decoder_dim=32",
                             "mae.decoder_depth=1", "mae.decoder_heads=2"])
    run = root / "mae_run"
    run.mkdir()
    dump_config(cfg, run / "config.yaml")
    accelerator = Accelerator()
    accelerator.prepare(build_objective("mae", cfg.mae, build_backbone(cfg.model)))  # what save_state saves
    save_checkpoint(accelerator, run, 5, keep_last=1)  # the checkpoint as the loop saves it, marker included
    return demo, root / "bb", run


def test_visualize_writes_pngs_of_the_expected_size(tmp_path, runs):
    demo, backbone, run = runs
    out = tmp_path / "png"
    assert main(["visualize", "--backbone", str(backbone), "--mae-run", str(run), "--shards", demo.knn_val,
                 "--n", "3", "--crop-ratio", "1.0", "--out", str(out)]) == 0
    tile, pad = 32 * 4, 2  # 32 px images are drawn 4× (tiles ≥ 128 px)
    cols = 3 + 2  # image, 3 heads, rollout
    with Image.open(out / "attention.png") as img:
        assert img.size == (cols * (tile + pad) + pad, 2 * 3 * (tile + pad) + pad)
    with Image.open(out / "mae_reconstruction.png") as img:
        assert img.size == (3 * tile, 3 * tile)  # rows original / masked / reconstruction, one column per image


def test_visualize_image_files_and_errors(tmp_path, runs, capsys):
    _, backbone, _ = runs
    files = []
    for i, size in enumerate([(40, 30), (64, 64)]):
        files.append(tmp_path / f"img{i}.png")
        Image.new("RGB", size, (i * 80, 100, 200)).save(files[-1])
    assert main(["visualize", "--backbone", str(backbone), "--images", *map(str, files), "--scale", "2",
                 "--out", str(tmp_path / "o")]) == 0
    with Image.open(tmp_path / "o" / "attention.png") as img:
        assert img.size == (5 * (64 + 2) + 2, 4 * (64 + 2) + 2)
    assert main(["visualize", "--out", str(tmp_path)]) == 2
    assert "give --backbone" in capsys.readouterr().err
    assert main(["visualize", "--mae-run", str(backbone), "--images", str(files[0])]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_an_unreadable_image_is_a_one_line_error_naming_it(tmp_path, runs, capsys, monkeypatch):
    # not skipped: rows follow the order of --images, and a row left out would put later images under wrong names
    _, backbone, _ = runs
    good, empty = tmp_path / "good.png", tmp_path / "empty.png"
    Image.new("RGB", (64, 64), (0, 100, 200)).save(good)
    empty.write_bytes(b"")
    argv = ["visualize", "--backbone", str(backbone), "--out", str(tmp_path / "o"), "--images", str(good)]
    assert main([*argv, str(empty)]) == 2
    assert capsys.readouterr().err == (f"ssl-vit visualize: error: image {empty} cannot be read: "
                                       f"UnidentifiedImageError: cannot identify image file '{empty}'\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above twice this: 64 × 64 is a "bomb"
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"ssl-vit visualize: error: image {good} is too large to decode safely: "
                                       "Image size (4096 pixels) exceeds limit of 2000 pixels, could be "
                                       "decompression bomb DOS attack.\n")
    assert not (tmp_path / "o").exists()


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, runs, capsys):
    _, backbone, _ = runs
    taken = tmp_path / "taken"
    taken.write_text("")
    assert main(["visualize", "--backbone", str(backbone), "--images", "missing.png", "--out", str(taken)]) == 2
    assert capsys.readouterr().err == f"ssl-vit visualize: error: --out {taken} is a file, not a folder\n"


def test_attention_maps_are_refused_for_a_model_without_a_cls_token():
    # with registers and no cls token, row 0 of the attention would be a register's
    vit = timm.create_model("vit_tiny_patch16_224", **{**KW, "class_token": False, "reg_tokens": 2,
                                                       "global_pool": "avg"})
    with pytest.raises(ValueError, match="this backbone has no cls token"):
        attention_figure(vit, torch.randn(1, 3, 32, 32))


def test_reconstructions_of_an_objective_that_draws_none_are_refused():
    cfg = load_config(None, ["objective=dino", "model.name=vit_tiny_patch16_224", "model.img_size=32",
                             "model.patch_size=8", "model.embed_dim=48", "model.depth=1", "model.num_heads=2",
                             "dino.out_dim=16", "dino.hidden_dim=16", "dino.bottleneck_dim=8",
                             "dino.local_crops_size=16"])
    dino = build_objective("dino", cfg.dino, build_backbone(cfg.model))
    with pytest.raises(ValueError, match=r"^reconstructions need a run of an objective that reconstructs images "
                                         r"\(mae\); this one is DINO$"):
        reconstruction_figure(dino, torch.randn(1, 3, 32, 32))
