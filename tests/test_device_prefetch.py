"""The CUDA prefetcher's protocol, with the CUDA stream calls recorded (no GPU in CI): batches in order and
unchanged, the next batch's copy issued on the side stream before the current one is handed out, the training
stream made to wait for each copy, and each copied tensor recorded on the stream that uses it."""

import contextlib

import torch

import ssl_vit.data.batches as batches


class FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: "FakeStream") -> None:
        self.log.append(("wait", self.name, other.name))


def test_prefetcher_copies_one_batch_ahead_on_its_own_stream(monkeypatch):
    log: list = []
    active = ["compute"]
    compute = FakeStream("compute", log)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: FakeStream("copy", log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)

    @contextlib.contextmanager
    def on(stream):
        active.append(stream.name)
        yield
        active.pop()
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(batches, "to_device", lambda batch, device: log.append(("copy", batch["id"], active[-1]))
                        or {**batch, "copied": True})
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(("record", int(t[0]), s.name)))

    source = [{"id": i, "image": torch.full((2,), i), "skipped": [torch.full((1,), i)], "key": ["k"]}
              for i in range(3)]
    out = []
    for batch in batches.DevicePrefetcher(iter(source), torch.device("cuda")):
        out.append(batch)
        log.append(("step", batch["id"]))
    assert [b["id"] for b in out] == [0, 1, 2] and all(b["copied"] and b["key"] == ["k"] for b in out)
    assert log == [
        ("copy", 0, "copy"), ("wait", "compute", "copy"), ("record", 0, "compute"), ("record", 0, "compute"),
        ("copy", 1, "copy"), ("step", 0),
        ("wait", "compute", "copy"), ("record", 1, "compute"), ("record", 1, "compute"), ("copy", 2, "copy"),
        ("step", 1),
        ("wait", "compute", "copy"), ("record", 2, "compute"), ("record", 2, "compute"), ("step", 2),
    ]


def test_training_batches_skip_then_prefetch_on_cuda_only(monkeypatch):
    source = [{"image": torch.full((1,), i)} for i in range(3)]
    monkeypatch.setattr(batches, "train_stream", lambda *a, **k: iter(source))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)  # no GPU in CI: only the type is checked
    cfg = batches.DataConfig(train="x")
    on_cpu = batches.training_batches(cfg, lambda img: img, torch.device("cpu"), img_size=32, rank=0, world_size=1,
                                      seed=0, skip=1)
    assert [b["image"].item() for b in on_cpu] == [1, 2]  # the first batch dropped, the rest as they were
    on_cuda = batches.training_batches(cfg, lambda img: img, torch.device("cuda"), img_size=32, rank=0,
                                       world_size=1, seed=0)
    assert isinstance(on_cuda, batches.DevicePrefetcher)
