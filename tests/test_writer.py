"""The shard writer's folder walk and sample keys: every image it packs is one the readers return."""

import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from ssl_vit.data.shards import eval_stream
from ssl_vit.data.writer import write_samples, write_shards


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


def test_fifos_and_devices_are_skipped_unread_and_counted_once(tmp_path):
    # issue #20: reading a FIFO named x.jpg blocked forever, /dev/zero linked as z.jpg ran out of memory
    src = tmp_path / "src"
    _png(src / "a.png")
    os.mkfifo(src / "x.jpg")
    os.symlink("/dev/zero", src / "z.jpg")
    os.symlink(src / "a.png", src / "b.png")  # a link to a regular file is read
    code = ("import sys; from ssl_vit.data.writer import write_shards; "
            "s = write_shards(sys.argv[1], sys.argv[2], progress=False); print(s.n_samples, s.n_skipped)")
    done = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "2 2\n"
    assert done.stderr == ("skipping 2 image names that are not regular files (FIFOs, devices, broken links), e.g. "
                           f"{src / 'x.jpg'}\n")


def test_files_above_the_byte_or_pixel_limit_are_skipped_and_counted(tmp_path, caplog):
    _png(tmp_path / "src" / "a.png")  # 6x6
    (tmp_path / "src" / "b.png").write_bytes((tmp_path / "src" / "a.png").read_bytes() + b"\0" * 500)
    size = (tmp_path / "src" / "b.png").stat().st_size
    with caplog.at_level("WARNING", logger="ssl_vit.data.writer"):
        summary = write_shards(tmp_path / "src", tmp_path / "out", progress=False, max_file_bytes=size - 1)
        assert (summary.n_samples, summary.n_skipped) == (1, 1)
        with pytest.raises(ValueError, match=r"^none of the 2 images under .* could be read$"):
            write_shards(tmp_path / "src", tmp_path / "out2", progress=False, max_pixels=35)
    assert caplog.messages == [f"skipping {tmp_path / 'src' / 'b.png'}: too_large: {size} bytes > {size - 1} bytes"] + [
        f"skipping {tmp_path / 'src' / n}: too_large: 6x6 > 35 pixels" for n in ("a.png", "b.png")]


def _slow_samples(n: int, die_after: int | None = None):
    for i in range(n):
        if i == die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        yield {"__key__": f"s{i}", "png": b"%d" % i}


def test_a_killed_run_leaves_no_shard_names_and_a_rerun_starts_over(tmp_path):
    # issue #20: a run killed mid-write left a truncated shard under a shard name, and a rerun was refused
    code = ("import sys; from test_writer import _slow_samples; from ssl_vit.data.writer import write_samples; "
            "write_samples(_slow_samples(9, die_after=5), sys.argv[1], max_count=2)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).parent, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".train-00000{i}.tar.part" for i in range(3)]
    assert write_samples(_slow_samples(5), tmp_path, max_count=2) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"train-00000{i}.tar" for i in range(3)]
    with tarfile.open(tmp_path / "train-000002.tar") as tar:
        assert tar.getnames() == ["s4.png"]


def test_an_error_while_writing_leaves_nothing_behind(tmp_path):
    def failing():
        yield from _slow_samples(3)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_samples(failing(), tmp_path, max_count=2)
    assert list(tmp_path.iterdir()) == []
    assert write_samples(_slow_samples(1), tmp_path) == 1


def test_a_prefix_with_glob_characters_still_finds_its_own_shards_only(tmp_path):
    (tmp_path / ".ab-000000.tar.part").write_bytes(b"another prefix's leftover")
    assert write_samples(_slow_samples(1), tmp_path, prefix="a[b]") == 1
    with pytest.raises(ValueError, match=r"already holds a\[b\] shards \(a\[b\]-000000.tar, ...\)"):
        write_samples(_slow_samples(1), tmp_path, prefix="a[b]")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ab-000000.tar.part", "a[b]-000000.tar"]
