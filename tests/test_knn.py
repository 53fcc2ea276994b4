"""Weighted k-NN against a per-sample re-statement of the rule (Wu et al. 2018; DINO's eval_knn)."""

import math

import pytest
import torch

from ssl_vit.data.writer import write_samples
from ssl_vit.eval.features import Features, no_skips
from ssl_vit.eval.knn import knn_classify
from ssl_vit.eval.labelled import ClassList, check_class_lists, check_usable


def naive_knn(train, train_labels, val, val_labels, k, t, n_classes):
    hits1 = hits5 = 0
    for x, y in zip(val, val_labels, strict=True):
        sims = [float(torch.dot(x / x.norm(), f / f.norm())) for f in train]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * n_classes
        for i in order:
            votes[int(train_labels[i])] += math.exp(sims[i] / t)
        ranked = sorted(range(n_classes), key=lambda c: -votes[c])
        hits1 += ranked[0] == int(y)
        hits5 += int(y) in ranked[:5] and votes[int(y)] > 0
    return 100.0 * hits1 / len(val), 100.0 * hits5 / len(val)


@pytest.mark.parametrize("k, t", [(1, 0.07), (5, 0.07), (20, 0.5), (20, 0.005)])  # 0.005: exp(1/T) overflows fp32
def test_matches_naive(k, t):
    torch.manual_seed(k)
    train, val = torch.randn(60, 8), torch.randn(25, 8)
    train_labels, val_labels = torch.randint(0, 7, (60,)), torch.randint(0, 7, (25,))
    got = knn_classify(train, train_labels, val, val_labels, ks=(k,), temperature=t, chunk=7)[k]
    top1, top5 = naive_knn(train, train_labels, val, val_labels, k, t, 7)
    assert got["top1"] == pytest.approx(top1) and got["top5"] == pytest.approx(top5)


def test_several_k_in_one_pass_and_separable_clusters():
    torch.manual_seed(0)
    centers = torch.randn(4, 16) * 5
    labels = torch.arange(4).repeat_interleave(30)
    feats = centers[labels] + 0.1 * torch.randn(120, 16)
    out = knn_classify(feats[::2], labels[::2], feats[1::2], labels[1::2], ks=(1, 10, 60))
    assert set(out) == {1, 10, 60}
    assert all(r["top1"] == 100.0 for r in out.values())


@pytest.mark.parametrize("ks, t, message", [
    ((20, 20), 0.07, r"k-NN ks \[20, 20\] repeat a value"),  # counted each k's hits twice: top-5 above 100%
    ((0,), 0.07, "k-NN k must be ≥ 1, got 0"),  # scored 0% silently
    ((5, 31), 0.07, "k-NN k=31 exceeds the 30 train samples; choose k ≤ 30"),  # reported k=30's score as k=31's
    ((), 0.07, "at least one k"),
    ((5,), 0.0, "k-NN temperature must be finite and > 0, got 0.0"),
    ((5,), -0.07, "k-NN temperature must be finite and > 0, got -0.07"),
    ((5,), float("nan"), "k-NN temperature must be finite and > 0, got nan"),
    ((5,), math.inf, "k-NN temperature must be finite and > 0, got inf"),  # every weight 1: a plain majority vote
])
def test_bad_ks_and_temperature_are_one_line_errors(ks, t, message):
    torch.manual_seed(0)
    train, val = torch.randn(30, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=message):
        knn_classify(train, torch.randint(0, 7, (30,)), val, torch.randint(0, 7, (10,)), ks=ks, temperature=t)


def test_k_equal_to_the_train_size_is_allowed():
    torch.manual_seed(0)
    train, val = torch.randn(30, 8), torch.randn(10, 8)
    train_labels, val_labels = torch.randint(0, 7, (30,)), torch.randint(0, 7, (10,))
    out = knn_classify(train, train_labels, val, val_labels, ks=(30,))
    top1, top5 = naive_knn(train, train_labels, val, val_labels, 30, 0.07, 7)  # every train sample votes
    assert out[30]["top1"] == pytest.approx(top1) and out[30]["top5"] == pytest.approx(top5)


def test_a_class_voted_for_stays_in_the_top_5_when_its_weight_underflows():
    # k=2, T=0.005: the second neighbour's weight exp((0.3 - 1) / 0.005) is 0 in float32, yet it voted
    train = torch.tensor([[1.0, 0.0], [0.3, (1 - 0.09) ** 0.5]])
    for c in range(1, 10):
        out = knn_classify(train, torch.tensor([0, c]), torch.tensor([[1.0, 0.0]]), torch.tensor([c]), ks=(2,),
                           temperature=0.005)
        assert out[2] == {"top1": 0.0, "top5": 100.0}, c


def test_unlabelled_is_refused():
    with pytest.raises(ValueError, match=r"k-NN needs labelled shards \(samples with a `cls` member\): 1 of 4 "
                                         "train samples have none"):
        knn_classify(torch.randn(4, 3), torch.tensor([0, 1, -1, 0]), torch.randn(2, 3), torch.tensor([0, 1]))


def _listed(folder, classes):
    """A one-sample shard in `folder`, with a classes.txt of `classes` beside it (None: no classes.txt)."""
    write_samples([{"__key__": "a", "png": b"x", "cls": b"0"}], folder)
    if classes is not None:
        (folder / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return str(folder / "train-000000.tar")


@pytest.mark.parametrize("val_classes, difference", [
    (["dog", "emu"], "first difference at class 0: 'cat' vs 'dog'"),  # every val label shifted: 0% silently
    (["cat", "dog"], "first difference at class 2: 'emu' vs nothing (end of list)"),
])
def test_train_and_val_with_different_class_lists_are_refused(tmp_path, val_classes, difference):
    train, val = _listed(tmp_path / "A", ["cat", "dog", "emu"]), _listed(tmp_path / "B", val_classes)
    with pytest.raises(ValueError) as err:
        check_class_lists(train, val)
    assert str(err.value) == ("train and val shards list different classes (labels are indices into them): "
                              f"{tmp_path}/A/classes.txt (3 classes) vs {tmp_path}/B/classes.txt (2), {difference}")


def test_one_class_list_is_taken_from_either_side_and_none_without_any(tmp_path):
    listed, bare = _listed(tmp_path / "A", ["cat", "", "dog"]), _listed(tmp_path / "B", None)
    expected = ClassList(tmp_path / "A" / "classes.txt", ["cat", "dog"])  # blank lines are no classes
    assert check_class_lists(listed, bare) == expected == check_class_lists(bare, listed)
    assert check_class_lists(listed, listed) == expected
    assert check_class_lists(bare, bare) is None


def labelled(*labels):
    return Features(torch.zeros(len(labels), 2), torch.tensor(labels), [f"s{i}" for i in range(len(labels))])


def test_a_label_beyond_the_class_list_is_refused(tmp_path):
    classes = ClassList(tmp_path / "classes.txt", ["cat", "dog", "emu"])
    check_usable(labelled(0, 2), "k-NN", "val", classes)
    check_usable(labelled(99_999), "k-NN", "val")  # no list: below the stated bound is fine
    with pytest.raises(ValueError) as err:
        check_usable(labelled(0, 999, 3, 1), "k-NN", "val", classes)
    assert str(err.value) == (f"k-NN val labels must be < the 3 classes in {tmp_path}/classes.txt: 2 of 4 "
                              "samples have a larger one (up to 999)")
    with pytest.raises(ValueError, match=r"^k-NN needs labelled shards \(samples with a `cls` member\): 1 of 3 val "):
        check_usable(labelled(0, 2, -1), "k-NN", "val", classes)


def test_a_huge_label_is_refused_before_it_sizes_the_votes():
    # a `cls` of 10^12 made k-NN allocate (1024, 10^12) floats: 8 TB
    with pytest.raises(ValueError) as err:
        knn_classify(torch.randn(4, 3), torch.tensor([0, 1, 10**12, 0]), torch.randn(2, 3), torch.tensor([0, 1]))
    assert str(err.value) == ("k-NN train labels must be < the 100000 classes allowed without a classes.txt: 1 of 4 "
                              "samples have a larger one (up to 1000000000000)")
    with pytest.raises(ValueError) as err:
        check_usable(labelled(3, 100_000), "k-NN", "val")
    assert str(err.value) == ("k-NN val labels must be < the 100000 classes allowed without a classes.txt: 1 of 2 "
                              "samples have a larger one (up to 100000)")


def test_a_set_with_no_usable_sample_says_why():
    empty = Features(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), [])
    with pytest.raises(ValueError) as err:
        check_usable(Features(empty.features, empty.labels, [], {**no_skips(), "bad_label": 36}), "k-NN", "train")
    assert str(err.value) == ("no usable k-NN train sample was read: all 36 train samples were skipped: "
                              "{'bad_label': 36}")
    with pytest.raises(ValueError, match="^no k-NN val sample was read: the val shards hold no samples$"):
        check_usable(empty, "k-NN", "val")
    check_usable(Features(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), ["a"]), "k-NN", "train")
