"""DINOv2's losses against naive restatements of their formulas: Sinkhorn-Knopp (marginals, a loop, ranks), KoLeo
(-log of the nearest-neighbour distance, loops), iBOT (cross-entropy over the masked patches only) and the masks."""

from __future__ import annotations

import math
import multiprocessing as mp

import pytest
import torch
import torch.nn.functional as F

from ssl_vit.methods.dino.loss import sinkhorn_knopp
from ssl_vit.methods.dinov2.loss import ibot_loss, koleo_loss
from ssl_vit.methods.dinov2.masking import block_mask, sample_masks

# ------------------------------------------------------------------------------------------------- Sinkhorn-Knopp


def _naive_sinkhorn(logits: list[list[float]], temp: float, iterations: int) -> list[list[float]]:
    """DINOv2's Algorithm, entry by entry: Q = exp(logits / τ), normalise the total, then `iterations` times make
    every prototype's column sum 1/K and every sample's row sum 1/N; finally scale the rows to sum to 1."""
    n, k = len(logits), len(logits[0])
    q = [[math.exp(v / temp) for v in row] for row in logits]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            col = sum(q[i][j] for i in range(n))
            for i in range(n):
                q[i][j] /= col * k
        for i in range(n):
            row = sum(q[i])
            q[i] = [v / (row * n) for v in q[i]]
    return [[v * n for v in row] for row in q]


@pytest.mark.parametrize("n,k,temp", [(6, 4, 0.5), (5, 9, 0.1), (3, 3, 1.0)])
def test_sinkhorn_matches_a_naive_loop(n, k, temp):
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k), dtype=torch.float64)
    expected = torch.tensor(_naive_sinkhorn(logits.tolist(), temp, 3))
    torch.testing.assert_close(sinkhorn_knopp(logits, temp, 3), expected.float(), rtol=1e-5, atol=1e-7)


def test_sinkhorn_marginals_hold():
    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 3
    q = sinkhorn_knopp(logits, 0.5, 3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(32))  # each sample's target is a distribution
    assert (q >= 0).all()
    converged = sinkhorn_knopp(logits, 0.5, 500)
    share = converged.sum(dim=0) / converged.sum()  # each prototype's share of the batch's mass
    torch.testing.assert_close(share, torch.full((8,), 1 / 8), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(32))


def test_sinkhorn_survives_logits_that_overflow_exp():
    logits = torch.tensor([[100.0, 0.0, -100.0], [0.0, 100.0, 0.0]])
    q = sinkhorn_knopp(logits, 0.04, 3)  # exp(2500) is inf in float32 without the shift
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(2))


def _sinkhorn_worker(rank: int, world: int, init_file: str, split: int, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    mine = logits[:split] if rank == 0 else logits[split:]  # unequal shares of one batch, or none (no masked patch)
    queue.put((rank, sinkhorn_knopp(mine, 0.3, 3).tolist()))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("split", [3, 0])
def test_sinkhorn_over_ranks_equals_one_process_over_the_whole_batch(tmp_path, split):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sinkhorn_worker, args=(r, 2, str(tmp_path / "pg"), split, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    whole = sinkhorn_knopp(torch.randn(7, 5, generator=torch.Generator().manual_seed(3)), 0.3, 3)
    torch.testing.assert_close(torch.tensor(results[0] + results[1]), whole)


# ----------------------------------------------------------------------------------------------------- KoLeo


def _naive_koleo(features: list[list[float]], eps: float = 1e-8) -> float:
    """−mean over i of log(min over j ≠ i of ‖x_i/‖x_i‖ − x_j/‖x_j‖‖ + eps), with explicit loops."""
    unit = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in features]
    total = 0.0
    for i, a in enumerate(unit):
        nearest = min(math.dist(a, b) for j, b in enumerate(unit) if j != i)
        total += -math.log(nearest + eps)
    return total / len(unit)


@pytest.mark.parametrize("n,d", [(2, 3), (7, 5), (16, 32)])
def test_koleo_matches_a_naive_loop(n, d):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d), dtype=torch.float64) * 4
    assert koleo_loss(x).item() == pytest.approx(_naive_koleo(x.tolist()), rel=1e-5)


def test_koleo_pushes_near_neighbours_apart_and_needs_two_rows():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0]], requires_grad=True)
    koleo_loss(x).backward()
    assert x.grad[1, 1] < 0  # descending moves row 1 away from its near twin, row 0 (larger y)
    one = torch.randn(1, 4, requires_grad=True)
    loss = koleo_loss(one)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(one.grad, torch.zeros(1, 4))


# ---------------------------------------------------------------------------------------------- iBOT and masks


def test_masks_follow_the_strata_the_share_and_the_weights():
    n, length, lo, hi = 40, 64, 0.1, 0.5
    masks = sample_masks(n, length, (lo, hi), 0.5, generator=torch.Generator().manual_seed(0))
    counts = masks.mask.sum(dim=1)
    masked = counts[counts > 0].sort().values
    assert len(masked) == 20  # int(0.5 · 40) crops, the others untouched
    edges = torch.linspace(lo, hi, 21, dtype=torch.float64)
    for i, c in enumerate(masked.tolist()):  # sorted counts fall one per stratum of the ratio range
        assert max(1, int(length * edges[i])) <= c <= int(length * edges[i + 1])
    assert torch.equal(masks.index, masks.mask.flatten().nonzero().squeeze(1))
    expected = [1.0 / counts[int(i) // length].item() for i in masks.index]
    torch.testing.assert_close(masks.weight, torch.tensor(expected))


def test_block_masks_are_rectangles_of_at_least_four_patches_up_to_the_count():
    g = torch.Generator().manual_seed(0)
    first = block_mask((14, 14), 6, 98, g)  # one draw of at least min_block patches fills the count or less
    rows, cols = first.any(dim=1).nonzero().squeeze(1), first.any(dim=0).nonzero().squeeze(1)
    assert 4 <= int(first.sum()) <= 6 and int(first.sum()) == len(rows) * len(cols)  # one solid rectangle
    assert len(rows) < 14 and len(cols) < 14
    hidden, neighbours = [], []
    for count in range(1, 99):  # up to DINOv2's cap, half the grid
        mask = block_mask((14, 14), count, 98, g)
        hidden.append(int(mask.sum()) / count)
        padded = torch.nn.functional.pad(mask, (1, 1, 1, 1))
        touching = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        neighbours.append(float((mask & touching).sum() / mask.sum().clamp(min=1)))
        assert int(mask.sum()) <= count
    assert sum(hidden) / len(hidden) > 0.95  # blocks sized to the room left reach the count almost always
    assert sum(neighbours[3:]) / len(neighbours[3:]) > 0.9  # blocky: random patches would touch ~25 % of the time
    masks = sample_masks(40, 196, (0.1, 0.5), 0.5, generator=g, grid=(14, 14))
    counts = masks.mask.sum(dim=1)
    assert int((counts > 0).sum()) == 20 and int(counts.max()) <= int(196 * 0.5)
    assert torch.equal(masks.index, masks.mask.flatten().nonzero().squeeze(1))
    torch.testing.assert_close(masks.weight, torch.tensor([1.0 / counts[int(i) // 196].item() for i in masks.index]))
    tiny = sample_masks(8, 4, (0.1, 0.2), 1.0, generator=g, grid=(2, 2))  # int(4 r) = 0: each still hides one
    assert tiny.mask.sum(dim=1).tolist() == [1] * 8


def _naive_ibot(student: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temp: float) -> float:
    """1/N Σ_n [crop n has masked patches] · mean over its masked patches p of −Σ_k q_npk log softmax(s_np / τ)_k."""
    total = 0.0
    for n in range(mask.shape[0]):
        terms = [-(targets[n, p] * F.log_softmax(student[n, p] / temp, dim=-1)).sum().item()
                 for p in range(mask.shape[1]) if mask[n, p]]
        total += sum(terms) / len(terms) if terms else 0.0
    return total / mask.shape[0]


def test_ibot_is_cross_entropy_over_masked_patches_only():
    n, length, k = 6, 9, 5
    g = torch.Generator().manual_seed(0)
    masks = sample_masks(n, length, (0.1, 0.5), 0.5, generator=g)
    student, targets = torch.randn(n, length, k, generator=g), F.softmax(torch.randn(n, length, k, generator=g), -1)

    def loss(s, t):  # as the objective feeds it: the masked rows, picked by the flat index
        pick = masks.index
        return ibot_loss(s.flatten(0, 1)[pick], t.flatten(0, 1)[pick], masks.weight, n, 0.1).item()

    assert loss(student, targets) == pytest.approx(_naive_ibot(student, targets, masks.mask, 0.1), rel=1e-5)
    unmasked = ~masks.mask
    noise = torch.randn(n, length, k, generator=g)
    assert loss(torch.where(unmasked[..., None], noise, student), torch.where(unmasked[..., None], noise.softmax(-1),
                                                                              targets)) == loss(student, targets)
    assert loss(torch.where(masks.mask[..., None], noise, student), targets) != loss(student, targets)
