"""The shard writer's folder walk and sample keys: every image it packs is one the readers return."""

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from ssl_vit.data.shards import eval_stream
from ssl_vit.data.writer import write_shards


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (10, 200, 30)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def _read(pattern: str) -> tuple[dict[str, int], int]:
    labels, skipped = {}, 0
    for batch in eval_stream(pattern, lambda img: img.size[0], batch_size=8, num_workers=0, rank=0, world_size=1):
        labels.update(zip(batch["key"], batch["label"].tolist(), strict=True))
        skipped += int(batch["skipped"].sum())
    return labels, skipped


def test_a_class_folder_named_like_metadata_is_still_read(tmp_path):
    # webdataset drops members whose first folder is `__x__` (its metadata rule): the key must not be one
    for name in ("__background__/a.png", "__background__/b.png", "cat/c.png", "____/d.png"):
        _png(tmp_path / "src" / name)
    summary = write_shards(tmp_path / "src", tmp_path / "out", progress=False)
    labels, skipped = _read(summary.pattern)
    assert summary.n_samples == 4 and len(labels) == 4 and skipped == 0
    assert summary.classes == ["____", "__background__", "cat"]
    assert labels == {"_background__/a": 1, "_background__/b": 1, "cat/c": 2, "___/d": 0}


def test_two_class_folders_linking_to_one_folder_both_keep_it_and_loops_end(tmp_path):
    _png(tmp_path / "shared" / "img.png")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("b_class", "a_class"):  # whatever order the filesystem lists them in
        os.symlink(tmp_path / "shared", src / name)
    os.symlink(src, tmp_path / "shared" / "loop")  # shared/loop → src → a_class → shared → ...
    summary = write_shards(src, tmp_path / "out", progress=False)
    labels, _ = _read(summary.pattern)
    assert labels == {"a_class/img": 0, "b_class/img": 1}


def test_an_image_beside_the_class_folders_says_why_the_set_is_unlabeled(tmp_path, caplog):
    for name in ("cat/a.png", "cat/b.png", "dog/c.png", "stray.png", "zz.png"):
        _png(tmp_path / "src" / name)
    (tmp_path / "src" / "dog" / "empty.png").write_bytes(b"")
    with caplog.at_level("WARNING", logger="ssl_vit.data.writer"):
        summary = write_shards(tmp_path / "src", tmp_path / "out", progress=False)
    assert summary.classes is None and (summary.n_samples, summary.n_skipped) == (5, 1)
    src = tmp_path / "src"
    assert caplog.messages == [
        f"2 of 6 images sit at the top of {src} (e.g. stray.png), not in a class sub-folder: writing all "
        "unlabeled; move or remove them to keep the sub-folder names as classes",
        f"skipping {src / 'dog' / 'empty.png'}: not a JPEG, PNG or WEBP image (empty, or another format)"]


@pytest.mark.parametrize("names", [["a.png", "b.png"], ["cat/a.png", "dog/b.png"]])
def test_a_plain_folder_or_class_folders_alone_give_no_warning(tmp_path, caplog, names):
    for name in names:
        _png(tmp_path / "src" / name)
    with caplog.at_level("WARNING", logger="ssl_vit.data.writer"):
        write_shards(tmp_path / "src", tmp_path / "out", progress=False)
    assert caplog.messages == []
