"""`ssl-vit make-digits`: scikit-learn's digits as labelled 32 px shards that the readers return as they were split."""

import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_vit.cli.main import main
from ssl_vit.data.shards import eval_stream


def _read(pattern: str) -> dict[str, tuple[int, np.ndarray]]:
    """key → (label, decoded pixels), through the same reader the k-NN evaluation uses."""
    out = {}
    for batch in eval_stream(pattern, np.array, batch_size=64, num_workers=0, rank=0, world_size=1):
        assert int(batch["skipped"].sum()) == 0
        for key, label, img in zip(batch["key"], batch["label"].tolist(), batch["image"], strict=True):
            out[key] = (label, np.asarray(img))
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    pytest.importorskip("sklearn")
    from ssl_vit.data.digits import load_split, write_digits

    out = tmp_path_factory.mktemp("digits")
    return out, write_digits(out), load_split()


def test_the_shards_hold_the_stratified_split_with_its_labels(digits):
    out, data, (x_train, y_train, x_val, y_val) = digits
    assert (data.n_train, data.n_val) == (1347, 450) and data.classes == [str(d) for d in range(10)]
    assert (out / "classes.txt").read_text().splitlines() == data.classes
    for pattern, pixels, labels, split in ((data.train, x_train, y_train, "train"), (data.val, x_val, y_val, "val")):
        read = _read(pattern)
        assert len(read) == len(labels)
        for i in (0, 1, len(labels) // 2, len(labels) - 1):
            label, img = read[f"{split}_{i:06d}"]
            assert label == labels[i]
            assert img.shape == (32, 32, 3) and (img == img[..., :1]).all()  # grey, 3 channels
            # the 32 px image is the 8×8 digit upsampled: its 4×4 block means follow the original closely
            blocks = img[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
            assert np.corrcoef(blocks.ravel(), pixels[i].ravel())[0, 1] > 0.95
        counts = Counter(label for label, _ in read.values())
        assert sorted(counts) == list(range(10))
        share = len(labels) / 1797  # stratified: every class keeps its share of the 1,797 digits, ±1
        full = Counter(np.concatenate([y_train, y_val]).tolist())
        assert all(abs(counts[c] - full[c] * share) <= 1 for c in range(10))


def test_the_same_bytes_on_every_run(digits, tmp_path):
    from ssl_vit.data.digits import write_digits

    out, _, _ = digits
    write_digits(tmp_path)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir()) and len(names) == 17  # 8 + 8 shards, classes.txt
    assert all((out / n).read_bytes() == (tmp_path / n).read_bytes() for n in names)


def test_the_command_prints_a_pretrain_command_and_refuses_a_used_folder(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert main(["make-digits", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1347 train and 450 val digits (10 classes)" in printed
    assert f"--set 'data.train={tmp_path}/d/train-{{000000..000007}}.tar'" in printed
    assert f"--set 'eval.knn_val={tmp_path}/d/val-{{000000..000007}}.tar'" in printed
    assert main(["make-digits", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err == f"ssl-vit make-digits: error: {tmp_path}/d already holds a classes.txt; " \
                                      "choose an empty directory\n"


def test_without_scikit_learn_one_line_names_the_extra(tmp_path, capsys, monkeypatch):
    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):  # importing them now raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["make-digits", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssl-vit make-digits: error: the digits data needs scikit-learn: pip install "
                          "ssl_vit[digits] (") and err.count("\n") == 1
    assert not Path(tmp_path / "d").exists()


def test_a_png_is_an_rgb_32_px_image():
    from ssl_vit.data.digits import to_png

    img = Image.open(io.BytesIO(to_png(np.eye(8, dtype=np.uint8) * 255)))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
    pixels = np.asarray(img)[..., 0]
    assert pixels[2, 2] > 200 and pixels[2, 29] < 30  # the diagonal stays bright, the corner dark
