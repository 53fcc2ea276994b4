"""Extended features (cls / avg / last-N concat + avg) against naive block loops; every sample kept, skipped
ones counted; the on-disk feature cache."""

import os
import re
import stat

import pytest
import timm
import torch
from accelerate import Accelerator

import ssl_vit.eval.features as features_mod
from ssl_vit.data.demo import ensure_demo_data, render
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.data.writer import write_samples
from ssl_vit.eval.features import FeatureSpec, describe_skipped, extract_features, image_features
from ssl_vit.models.backbone import encode

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=0, dynamic_img_size=True)


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **KW).eval()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), n_train=8, n_knn_train=24, n_knn_val=12)


def naive_block_outputs(vit, x):
    """Every block's output after the final norm, by a plain loop over the blocks."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    outs = []
    for block in vit.blocks:
        x = block(x)
        outs.append(vit.norm(x))
    return outs


@torch.no_grad()
def test_default_specs_equal_encode_and_pool():
    vit, x = tiny_vit(), torch.randn(3, 3, 32, 32)
    tokens = encode(vit, x)
    pooled = {"cls": tokens[:, 0], "avg": tokens[:, vit.num_prefix_tokens:].mean(dim=1)}  # the naive definitions
    for mode, expected in pooled.items():
        assert torch.allclose(image_features(vit, x, FeatureSpec(mode)), expected, atol=1e-6)


def test_a_model_that_norms_after_pooling_gives_timms_pooled_features():
    # global_pool="avg": timm leaves `norm` an Identity and norms the pooled token with fc_norm (a fine-tune export
    # with model.pool avg, timm's *_gap ViTs)
    torch.manual_seed(0)
    vit, x = timm.create_model("vit_tiny_patch16_224", **{**KW, "global_pool": "avg"}).eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for p in vit.fc_norm.parameters():  # not the identity-like init, so a missing norm shows
            p.normal_()
        want = vit.forward_head(vit.forward_features(x), pre_logits=True)
        assert torch.allclose(image_features(vit, x, FeatureSpec("avg")), want, atol=1e-5)


def test_cls_pooling_is_refused_for_a_model_with_registers_but_no_cls_token():
    vit = timm.create_model("vit_tiny_patch16_224", **{**KW, "class_token": False, "reg_tokens": 2,
                                                       "global_pool": "avg"})
    assert vit.num_prefix_tokens == 2  # the old check (no prefix tokens) let register 0 pass for the cls token
    with pytest.raises(ValueError, match="no cls token"):
        image_features(vit, torch.randn(1, 3, 32, 32), FeatureSpec("cls"))


@torch.no_grad()
def test_last_n_blocks_concat_shape_and_values():
    vit, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    outs = naive_block_outputs(vit, x)
    got = image_features(vit, x, FeatureSpec("cls", n_last_blocks=2, avgpool=True))
    assert got.shape == (2, 3 * 48) == (2, FeatureSpec("cls", 2, True).dim(48))
    want = torch.cat([outs[1][:, 0], outs[2][:, 0], outs[2][:, 1:].mean(dim=1)], dim=1)
    assert torch.allclose(got, want, atol=1e-5)
    got_avg = image_features(vit, x, FeatureSpec("avg", n_last_blocks=3))
    assert torch.allclose(got_avg, torch.cat([o[:, 1:].mean(dim=1) for o in outs], dim=1), atol=1e-5)


def test_bad_specs_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown pool"):
        FeatureSpec("max")
    with pytest.raises(ValueError, match="already there"):
        FeatureSpec("avg", avgpool=True)
    with pytest.raises(ValueError, match="exceeds the backbone's 3 blocks"):
        image_features(tiny_vit(), torch.randn(1, 3, 32, 32), FeatureSpec("cls", n_last_blocks=4))


def test_cache_hit_identical_and_invalidated(tmp_path, demo, monkeypatch):
    acc, cache = Accelerator(), tmp_path / "cache"
    spec = FeatureSpec("cls", n_last_blocks=2)
    kwargs = dict(spec=spec, batch_size=8, num_workers=0, crop_ratio=1.0, cache_dir=cache)
    vit = tiny_vit()
    first = extract_features(vit, demo.knn_train, acc, **kwargs)
    assert first.features.shape == (24, 96) and len(list(cache.iterdir())) == 1
    assert torch.equal(first.features, extract_features(vit, demo.knn_train, acc, spec=spec, batch_size=8,
                                                        num_workers=0, crop_ratio=1.0).features)

    real = features_mod.image_features
    calls = []

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(features_mod, "image_features", counting)
    hit = extract_features(vit, demo.knn_train, acc, **kwargs)
    assert not calls  # served from disk: the backbone never ran
    assert torch.equal(hit.features, first.features) and torch.equal(hit.labels, first.labels)
    assert hit.keys == first.keys

    with torch.no_grad():  # another backbone (here: one weight changed) → a miss, fresh features
        vit.blocks[0].mlp.fc1.weight[0, 0] += 1.0
    changed = extract_features(vit, demo.knn_train, acc, **kwargs)
    assert calls and not torch.equal(changed.features, first.features) and len(list(cache.iterdir())) == 2

    calls.clear()  # the data changed (a shard rewritten: new mtime) → a miss
    shard = resolve_shards(demo.knn_train)[0]
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    extract_features(vit, demo.knn_train, acc, **kwargs)
    assert calls and len(list(cache.iterdir())) == 3

    calls.clear()  # another feature spec → a miss
    extract_features(vit, demo.knn_train, acc, **{**kwargs, "spec": FeatureSpec("avg")})
    assert calls and len(list(cache.iterdir())) == 4


def test_cache_misses_when_the_mixed_precision_changes(tmp_path, demo):
    from accelerate.state import AcceleratorState

    kwargs = dict(batch_size=8, num_workers=0, crop_ratio=1.0, cache_dir=tmp_path)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        bf16 = extract_features(tiny_vit(), demo.knn_val, Accelerator(mixed_precision="bf16"), **kwargs)
        AcceleratorState._reset_state(reset_partial_state=True)
        full = extract_features(tiny_vit(), demo.knn_val, Accelerator(mixed_precision="no"), **kwargs)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert len(list(tmp_path.iterdir())) == 2 and not torch.equal(bf16.features, full.features)
    uncached = extract_features(tiny_vit(), demo.knn_val, Accelerator(), batch_size=8, num_workers=0, crop_ratio=1.0)
    assert torch.equal(full.features, uncached.features)


def test_a_damaged_cache_file_is_a_one_line_error_naming_it(tmp_path, demo):
    kwargs = dict(batch_size=8, num_workers=0, crop_ratio=1.0, cache_dir=tmp_path)
    extract_features(tiny_vit(), demo.knn_val, Accelerator(), **kwargs)
    (cached,) = tmp_path.iterdir()
    cached.write_bytes(cached.read_bytes()[:100])  # cut short (a full disk, a copy interrupted): was a traceback
    with pytest.raises(ValueError, match=rf"^feature cache {re.escape(str(cached))} cannot be read \(\w+: .*\); "
                                         "delete it to extract the features again$"):
        extract_features(tiny_vit(), demo.knn_val, Accelerator(), **kwargs)


def _write(out, prefix, samples):
    """Shards out/prefix-*.tar of these samples (one shard); returns the shard's path."""
    write_samples(samples, out, prefix)
    return str(out / f"{prefix}-000000.tar")


def _labelled(split, n, key=lambda i: f"s{i:04d}"):
    for i in range(n):
        png, label = render(split, i)
        yield {"__key__": key(i), "png": png, "cls": str(label).encode()}


def test_same_keys_in_two_shards_are_two_samples_each_kept(tmp_path):
    # Two shards written apart (two make-shards runs), different images under the same keys s0000..s0039.
    a = _write(tmp_path, "a", _labelled("knn_train", 40))
    b = _write(tmp_path, "b", _labelled("knn_val", 40))
    acc, vit = Accelerator(), tiny_vit()
    kwargs = dict(batch_size=16, num_workers=0, crop_ratio=1.0)
    both = extract_features(vit, [a, b], acc, **kwargs)
    assert both.features.shape[0] == 80 and both.keys == sorted([f"s{i:04d}" for i in range(40)] * 2)
    alone = torch.cat([extract_features(vit, s, acc, **kwargs).features for s in (a, b)])
    assert sorted(map(tuple, both.features.tolist())) == sorted(map(tuple, alone.tolist()))
    # The order does not depend on the read order (the probe's batches follow it): shards swapped, same result.
    swapped = extract_features(vit, [b, a], acc, **kwargs)
    assert torch.equal(swapped.features, both.features) and torch.equal(swapped.labels, both.labels)


def test_a_shard_listed_twice_is_read_once(tmp_path, caplog):
    a = _write(tmp_path, "a", _labelled("knn_train", 12))
    acc, vit = Accelerator(), tiny_vit()
    with caplog.at_level("WARNING"):
        twice = extract_features(vit, [str(tmp_path), a], acc, batch_size=8, num_workers=0, crop_ratio=1.0)
    assert twice.features.shape[0] == 12 and "1 of 2 shards are listed more than once" in caplog.text


def test_skipped_samples_are_counted_by_reason_and_kept_in_the_cache(tmp_path):
    good = list(_labelled("knn_val", 15))
    bad = [{"__key__": f"bad{i}", "png": b"not a png", "cls": b"1"} for i in range(4)]
    bad.append({"__key__": "badlabel", "png": good[0]["png"], "cls": b"cat"})
    shard = _write(tmp_path / "shards", "val", good[:8] + bad + good[8:])
    acc, vit = Accelerator(), tiny_vit()
    kwargs = dict(batch_size=4, num_workers=0, crop_ratio=1.0, cache_dir=tmp_path / "cache")
    feats = extract_features(vit, shard, acc, **kwargs)
    want = {"read_error": 0, "no_image": 0, "corrupt_image": 4, "too_large": 0, "bad_label": 1}
    assert feats.features.shape[0] == 15 and feats.skipped == want
    assert describe_skipped(feats.skipped) == "5 skipped (corrupt_image 4, bad_label 1)"
    assert extract_features(vit, shard, acc, **kwargs).skipped == want  # a cache hit keeps the counts


def test_a_loader_worker_with_only_bad_samples_still_has_its_skips_counted(tmp_path):
    good = _write(tmp_path / "good", "val", _labelled("knn_val", 6))
    bad = _write(tmp_path / "bad", "val", [{"__key__": f"bad{i}", "png": b"not a png", "cls": b"1"} for i in range(3)])
    feats = extract_features(tiny_vit(), [good, bad], Accelerator(), batch_size=4, num_workers=2, crop_ratio=1.0)
    assert feats.features.shape[0] == 6 and feats.skipped["corrupt_image"] == 3


def test_the_loader_is_iterated_once(tmp_path, monkeypatch):
    # each iter() of a DataLoader starts its workers, which then read shards for nothing
    calls = []
    real = features_mod.eval_stream

    class Counted:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            calls.append(1)
            return iter(self.loader)

    monkeypatch.setattr(features_mod, "eval_stream", lambda *a, **kw: Counted(real(*a, **kw)))
    shard = _write(tmp_path, "val", _labelled("knn_val", 6))
    feats = extract_features(tiny_vit(), shard, Accelerator(), batch_size=4, num_workers=0, crop_ratio=1.0)
    assert feats.features.shape[0] == 6 and calls == [1]


def test_cache_files_are_readable_by_others_as_the_umask_allows(tmp_path, demo):
    # 0o666 & ~umask; safetensors alone makes it 0o600
    for umask, mode in [(0o027, 0o640), (0o022, 0o644)]:
        old = os.umask(umask)
        try:
            extract_features(tiny_vit(), demo.knn_val, Accelerator(), batch_size=8, num_workers=0, crop_ratio=1.0,
                             cache_dir=tmp_path / oct(umask))
        finally:
            os.umask(old)
        (entry,) = (tmp_path / oct(umask)).iterdir()
        assert stat.S_IMODE(entry.stat().st_mode) == mode
