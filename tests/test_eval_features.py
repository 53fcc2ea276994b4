"""Extended features (cls / avg / last-N concat + avg) against naive block loops; the on-disk feature cache."""

import os

import pytest
import timm
import torch
from accelerate import Accelerator

import ssl_vit.eval.features as features_mod
from ssl_vit.backbone import encode
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.data.shards import resolve_shards
from ssl_vit.eval.features import FeatureSpec, extract_features, image_features

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
