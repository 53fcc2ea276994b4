"""Linear probe: separable features are learnt; the LR-grid equals each head trained alone; the commands run."""

import dataclasses
import io
import json
import math
import re

import pytest
import timm
import torch
from PIL import Image

from ssl_vit.cli.main import main
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.data.writer import write_samples
from ssl_vit.eval.baseline import load_eval_backbone
from ssl_vit.eval.features import Features, FeatureSpec
from ssl_vit.eval.linear import ProbeProtocol, customize, probe_features, probe_protocol
from ssl_vit.training.checkpoint import export_backbone


def separable(n, dim=16, classes=5, seed=0):
    """Labels are the argmax of a fixed random linear map, with a margin: linearly separable by construction."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    x = torch.randn(4 * n, dim, generator=g) * 3 + 1.0  # off-centre and scaled: BatchNorm has work to do
    scores = x @ w.T
    top2 = scores.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 1.0
    x, y = x[keep][:n], scores[keep].argmax(dim=1)[:n]
    return Features(x, y, [f"{i:05d}" for i in range(len(y))])


@pytest.mark.parametrize("name", ["mae", "dino"])
def test_probe_learns_linearly_separable_features(name):
    train, val = separable(600), separable(300, seed=1)
    proto = dataclasses.replace(probe_protocol(name, embed_dim=16), features=FeatureSpec(), epochs=30,
                                warmup_epochs=2, batch_size=64)
    # The papers' lrs are for ImageNet-scale runs (MAE's LARS step is relative, 1e-3 × lr × |w|, tuned for batch
    # 16384); 270 small steps need larger ones, which the grid is there to find.
    proto = dataclasses.replace(proto, base_lrs=(1e-3, 0.3) if name == "dino" else (0.1, 100.0))
    summary, _ = probe_features(train, val, proto)
    assert summary["best"]["top1"] >= 95.0
    assert len(summary["heads"]) == len(proto.base_lrs)


@pytest.mark.parametrize("optimizer, batchnorm", [("lars", True), ("sgd", False)])
def test_lr_grid_equals_each_head_trained_alone(optimizer, batchnorm):
    train, val = separable(200), separable(100, seed=1)
    proto = ProbeProtocol(FeatureSpec(), batchnorm=batchnorm, optimizer=optimizer, base_lrs=(0.01, 0.1, 1.0),
                          weight_decays=(0.0, 1e-3), epochs=3, warmup_epochs=1, batch_size=32)
    grid_summary, grid = probe_features(train, val, proto, seed=7)
    for i, (lr, wd) in enumerate(grid.grid):
        alone_summary, alone = probe_features(
            train, val, dataclasses.replace(proto, base_lrs=(lr,), weight_decays=(wd,)), seed=7)
        for a, b in ((grid.model.heads[i].weight, alone.model.heads[0].weight),
                     (grid.model.heads[i].bias, alone.model.heads[0].bias)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        assert [e[i] for e in grid.history] == [e[0] for e in alone.history]
        assert grid_summary["heads"][i]["top1"] == alone_summary["best"]["top1"]


def test_bad_protocol_is_one_line_error():
    with pytest.raises(ValueError, match="unknown probe protocol 'moco'"):
        probe_protocol("moco", 384)
    assert probe_protocol("dino", 384).features == FeatureSpec("cls", n_last_blocks=4)
    assert probe_protocol("dino", 768).features == FeatureSpec("cls", avgpool=True)
    assert probe_protocol("mae", 768).batchnorm and probe_protocol("mae", 768).optimizer == "lars"


def test_feature_overrides_keep_zero_and_drop_avgpool_for_pool_avg():
    wide = probe_protocol("dino", 768)  # cls + avgpool
    assert customize(wide, pool="avg").features == FeatureSpec("avg")  # not a clash with an avgpool never asked for
    with pytest.raises(ValueError, match="n_last_blocks must be ≥ 1, got 0"):  # not the protocol's 4 in silence
        customize(probe_protocol("dino", 384), n_last_blocks=0)
    with pytest.raises(ValueError, match="avgpool appends"):  # both asked for: still refused
        customize(wide, pool="avg", avgpool=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    demo = ensure_demo_data(root / "demo", n_train=8, n_knn_train=40, n_knn_val=20)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2, num_classes=0,
                  dynamic_img_size=True)
    torch.manual_seed(0)
    export_backbone(timm.create_model("vit_tiny_patch16_224", **kwargs), root / "bb", "vit_tiny_patch16_224", kwargs)
    return demo, root / "bb"


@pytest.mark.parametrize("augment", [False, True])
def test_linear_probe_command(tmp_path, setup, augment):
    demo, backbone = setup
    out = tmp_path / "out"
    argv = ["linear-probe", "--backbone", str(backbone), "--train", demo.knn_train, "--val", demo.knn_val,
            "--protocol", "dino", "--lr", "0.01", "0.1", "--epochs", "2", "--batch-size", "16",
            "--num-workers", "0", "--crop-ratio", "1.0", "--extract-batch-size", "16", "--out", str(out)]
    assert main(argv + (["--augment"] if augment else [])) == 0
    result = json.loads((out / "linear_probe.json").read_text())
    assert result["features"] == "cls of the last 4 blocks" and result["augment"] == augment
    assert result["n_train"] == 40 and result["n_val"] == 20 and len(result["heads"]) == 2
    assert 0 <= result["best"]["top1"] <= result["best"]["top5"] <= 100
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert any((out / "tensorboard").iterdir())


def test_knn_command_extended_features(tmp_path, setup, capsys):
    demo, backbone = setup
    argv = ["knn", "--backbone", str(backbone), "--train", demo.knn_train, "--val", demo.knn_val, "--k", "1", "5",
            "--n-last-blocks", "2", "--avgpool", "--num-workers", "0", "--crop-ratio", "1.0",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "knn.json")]
    assert main(argv) == 0
    assert "cls of the last 2 blocks + avg" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "knn.json").read_text())) == {"1", "5", "n_train", "n_val", "skipped"}
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train and val features


@pytest.fixture(scope="module")
def corrupt_val(setup, tmp_path_factory):
    """The demo val shards plus one shard of 5 unusable samples (4 corrupt PNGs, 1 bad label), as a .txt list."""
    demo, _ = setup
    root = tmp_path_factory.mktemp("corrupt")
    bad = [{"__key__": f"bad{i}", "png": b"not a png", "cls": b"1"} for i in range(4)]
    bad.append({"__key__": "badlabel", "png": b"x", "cls": b"cat"})
    write_samples(bad, root, "bad")
    listing = root / "val.txt"
    listing.write_text("\n".join([*resolve_shards(demo.knn_val), str(root / "bad-000000.tar")]) + "\n")
    return str(listing)


SKIPPED_VAL = {"read_error": 0, "no_image": 0, "corrupt_image": 4, "too_large": 0, "bad_label": 1}


def test_knn_command_reports_skipped_samples(tmp_path, setup, corrupt_val, capsys):
    demo, backbone = setup
    argv = ["knn", "--backbone", str(backbone), "--train", demo.knn_train, "--val", corrupt_val, "--k", "5",
            "--num-workers", "0", "--crop-ratio", "1.0", "--out", str(tmp_path / "knn.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "40 train images (none skipped), 20 val images (5 skipped (corrupt_image 4, bad_label 1))" in out
    result = json.loads((tmp_path / "knn.json").read_text())
    assert result["skipped"] == {"train": dict.fromkeys(SKIPPED_VAL, 0), "val": SKIPPED_VAL}
    assert (result["n_train"], result["n_val"]) == (40, 20)


@pytest.mark.parametrize("augment", [False, True])
def test_linear_probe_command_reports_skipped_samples(tmp_path, setup, corrupt_val, capsys, augment):
    demo, backbone = setup
    out = tmp_path / "out"
    argv = ["linear-probe", "--backbone", str(backbone), "--train", corrupt_val, "--val", corrupt_val,
            "--protocol", "dino", "--lr", "0.1", "--epochs", "1", "--batch-size", "8", "--num-workers", "0",
            "--crop-ratio", "1.0", "--extract-batch-size", "16", "--out", str(out)]
    assert main(argv + (["--train-size", "20", "--augment"] if augment else [])) == 0
    result = json.loads((out / "linear_probe.json").read_text())
    assert result["n_val"] == 20 and result["skipped"]["val"] == SKIPPED_VAL
    if augment:  # skips met while drawing 2 batches of 8 from a resampled stream: some, of these two reasons
        train = result["skipped"]["train"]
        assert set(train) == set(SKIPPED_VAL) and train["read_error"] == train["no_image"] == train["too_large"] == 0
        assert train["corrupt_image"] + train["bad_label"] > 0  # 1 shard in 5 is all bad: the seeded draws meet it
    else:
        assert result["n_train"] == 20 and result["skipped"]["train"] == SKIPPED_VAL
        assert "20 train images (5 skipped (corrupt_image 4, bad_label 1))" in capsys.readouterr().out


def test_short_probe_without_warmup_flag_names_the_flag(setup, capsys):
    demo, backbone = setup
    argv = ["linear-probe", "--backbone", str(backbone), "--train", demo.knn_train, "--val", demo.knn_val,
            "--epochs", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--epochs 2 is shorter than the mae protocol's 10 warmup epochs; set --warmup-epochs (0 to 2)" in err
    assert len(err.strip().splitlines()) == 1


def test_knn_random_init_baseline_is_reproducible(tmp_path, setup, capsys):
    demo, backbone = setup
    argv = ["knn", "--backbone", str(backbone), "--train", demo.knn_train, "--val", demo.knn_val, "--k", "1", "5",
            "--num-workers", "0", "--crop-ratio", "1.0", "--random-init"]
    runs = []
    for i, seed in enumerate(["0", "0", "1"]):
        torch.manual_seed(100 + i)  # whatever the global RNG holds, the baseline's weights come from --seed
        assert main(argv + ["--seed", seed, "--out", str(tmp_path / f"{i}.json")]) == 0
        runs.append(json.loads((tmp_path / f"{i}.json").read_text()))
    assert runs[0] == runs[1]
    vits = []
    for seed in (0, 0, 1):
        vit, _ = load_eval_backbone(backbone, random_init=True, seed=seed)
        vits.append(vit.state_dict())
    assert all(torch.equal(vits[0][k], vits[1][k]) for k in vits[0])
    assert not torch.equal(vits[0]["blocks.0.attn.qkv.weight"], vits[2]["blocks.0.attn.qkv.weight"])


def _shards(folder, labels, classes=None):
    """Shards of one black PNG per label (bytes, as stored in `cls`), with `classes` as classes.txt beside them."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    write_samples([{"__key__": f"s{i}", "png": buf.getvalue(), "cls": label} for i, label in enumerate(labels)],
                  folder)
    if classes is not None:
        (folder / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return str(folder)


def _no_extraction(*args, **kwargs):
    raise AssertionError("features were extracted before the input was checked")


@pytest.mark.parametrize("command", ["knn", "linear-probe"])
def test_train_and_val_with_different_class_lists_are_refused_before_any_work(tmp_path, setup, capsys,
                                                                               monkeypatch, command):
    _, backbone = setup
    train = _shards(tmp_path / "A", [b"0", b"1", b"2"], ["cat", "dog", "emu"])
    val = _shards(tmp_path / "B", [b"0", b"1"], ["dog", "emu"])  # dog is 1 in A, 0 here: scored 0% silently
    monkeypatch.setattr(f"ssl_vit.eval.{'knn' if command == 'knn' else 'linear_probe'}.extract_features",
                        _no_extraction)
    assert main([command, "--backbone", str(backbone), "--train", train, "--val", val, "--num-workers", "0"]) == 2
    assert capsys.readouterr().err == (
        f"ssl-vit {command}: error: train and val shards list different classes (labels are indices into them): "
        f"{tmp_path}/A/classes.txt (3 classes) vs {tmp_path}/B/classes.txt (2), first difference at class 0: "
        "'cat' vs 'dog'\n")


@pytest.mark.parametrize("command", ["knn", "linear-probe"])
def test_a_label_beyond_the_class_list_is_refused(tmp_path, setup, capsys, command):
    _, backbone = setup
    classes = ["cat", "dog", "emu"]
    train = _shards(tmp_path / "A", [b"0", b"1", b"2", b"1"], classes)
    val = _shards(tmp_path / "B", [b"0", b"999"], classes)
    argv = [command, "--backbone", str(backbone), "--train", train, "--val", val, "--num-workers", "0"]
    assert main(argv + (["--epochs", "1", "--warmup-epochs", "0"] if command == "linear-probe" else ["--k", "1"])) == 2
    task = "k-NN" if command == "knn" else "linear-probe"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ssl-vit {command}: error: {task} val labels must be < the 3 classes in {tmp_path}/A/classes.txt: 1 of 2 "
        "samples have a larger one (up to 999)")


@pytest.mark.parametrize("argv, message", [
    (["knn", "--k", "1"], "k-NN train labels must be < the 100000 classes allowed without a classes.txt: 4 of 4 "
                          "samples have a larger one (up to 1000000000000)"),
    (["linear-probe"], "linear-probe train labels must be < the 100000 classes allowed without a classes.txt: 4 of 4 "
                       "samples have a larger one (up to 1000000000000)"),
    (["linear-probe", "--augment", "--batch-size", "4"], "the linear probe needs labels in [0, 2) on every train "
                                                         "sample: sample 's?' has 1000000000000"),
])
def test_a_huge_label_without_a_class_list_is_a_one_line_error(tmp_path, setup, capsys, argv, message):
    # a `cls` of 10^12 made k-NN allocate (1024, 10^12) floats (8 TB), the probe a head of as many classes
    _, backbone = setup
    train = _shards(tmp_path / "A", [b"1000000000000"] * 4)
    val = _shards(tmp_path / "B", [b"0", b"1"])
    args = ["--backbone", str(backbone), "--train", train, "--val", val, "--num-workers", "0"]
    extra = ["--epochs", "1", "--warmup-epochs", "0"] if argv[0] == "linear-probe" else []
    assert main(argv[:1] + args + extra + argv[1:]) == 2
    last = re.sub(r"sample 's\d'", "sample 's?'", capsys.readouterr().err.splitlines()[-1])  # the first drawn
    assert last == f"ssl-vit {argv[0]}: error: {message}"


@pytest.mark.parametrize("change, message", [
    (dict(base_lrs=(0.1, math.nan)), "probe base lrs must be finite and > 0, got [0.1, nan]"),
    (dict(base_lrs=(math.inf,)), "probe base lrs must be finite and > 0, got [inf]"),
    (dict(base_lrs=(0.0,)), "probe base lrs must be finite and > 0, got [0.0]"),
    (dict(base_lrs=(-0.1,)), "probe base lrs must be finite and > 0, got [-0.1]"),
    (dict(weight_decays=(0.0, math.nan)), "probe weight decays must be finite and ≥ 0, got [0.0, nan]"),
    (dict(weight_decays=(-math.inf,)), "probe weight decays must be finite and ≥ 0, got [-inf]"),
    (dict(weight_decays=(-1e-4,)), "probe weight decays must be finite and ≥ 0, got [-0.0001]"),
])
def test_a_protocol_with_a_bad_lr_or_weight_decay_is_refused(change, message):
    # library callers too, not only the command line: a NaN lr trained NaN heads and reported chance accuracy
    with pytest.raises(ValueError) as err:
        dataclasses.replace(probe_protocol("dino", 384), **change)
    assert str(err.value) == message


def test_probe_features_refuses_labels_beyond_the_classes_given():
    train, val = separable(40), separable(20, seed=1)  # labels 0..4
    proto = customize(probe_protocol("dino", 16), epochs=1, batch_size=8)
    with pytest.raises(ValueError, match=r"^the linear probe train labels must be < the 3 classes given: \d+ of 40 "
                                         r"samples have a larger one \(up to 4\)$"):  # was cross-entropy's IndexError
        probe_features(train, val, proto, num_classes=3)


@pytest.mark.parametrize("command", ["knn", "linear-probe"])
def test_train_shards_without_one_usable_sample_give_the_skip_counts(tmp_path, setup, capsys, command):
    demo, backbone = setup
    train = _shards(tmp_path / "T", [b"cat"] * 36)  # text labels: every sample is a bad_label
    argv = [command, "--backbone", str(backbone), "--train", train, "--val", demo.knn_val, "--num-workers", "0"]
    assert main(argv + (["--epochs", "1", "--warmup-epochs", "0"] if command == "linear-probe" else [])) == 2
    task = "k-NN" if command == "knn" else "linear-probe"
    # was "k-NN k=20 exceeds the 0 train samples; choose k ≤ 0" (knn) and "needs a non-empty train and val set"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ssl-vit {command}: error: no usable {task} train sample was read: all 36 train samples were skipped: "
        "{'bad_label': 36}")


@pytest.mark.parametrize("argv, message", [
    (["knn", "--out", "{d}"], "--out {d} is a folder; give a file path, e.g. {d}/knn.json"),
    (["knn", "--out", "{f}/knn.json"], "--out {f}/knn.json: {f} is a file, not a folder"),
    (["knn", "--cache-dir", "{f}"], "--cache-dir {f} is a file, not a folder"),
    (["linear-probe", "--out", "{f}"], "--out {f} is a file, not a folder"),
    (["linear-probe", "--cache-dir", "{f}/sub/cache"], "--cache-dir {f}/sub/cache: {f} is a file, not a folder"),
])
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, setup, capsys, monkeypatch, argv, message):
    # an IsADirectoryError after every feature was computed lost the result
    demo, backbone = setup
    d, f = tmp_path / "dir", tmp_path / "file"
    d.mkdir()
    f.write_text("")
    for module in ("knn", "linear_probe"):
        monkeypatch.setattr(f"ssl_vit.eval.{module}.extract_features", _no_extraction)
    argv = [a.format(d=d, f=f) for a in argv]
    assert main([*argv, "--backbone", str(backbone), "--train", demo.knn_train, "--val", demo.knn_val]) == 2
    assert capsys.readouterr().err == f"ssl-vit {argv[0]}: error: {message.format(d=d, f=f)}\n"


def test_knn_out_in_a_folder_yet_to_be_made(tmp_path, setup):
    demo, backbone = setup
    out = tmp_path / "results" / "knn.json"
    argv = ["knn", "--backbone", str(backbone), "--train", demo.knn_train, "--val", demo.knn_val, "--k", "5",
            "--num-workers", "0", "--crop-ratio", "1.0", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["n_train"] == 40
