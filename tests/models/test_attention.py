"""The jagged HSTU attention reference against a straightforward per-sequence implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genrec.models.attention import (
    attention_plan,
    hstu_attention,
    hstu_attention_padded,
    time_bucket,
)
from genrec.models.jagged import length_groups, padded_rows

H, DQK, DV, P, NB = 2, 8, 6, 20, 16


def naive_attention(q, k, v, offsets, ts, pos_bias, time_bias, num_targets, norm):
    """Loops over sequences and builds the mask and biases entry by entry (slow, obvious)."""
    outs = []
    for b in range(offsets.numel() - 1):
        s0, s1 = int(offsets[b]), int(offsets[b + 1])
        n = s1 - s0
        if n == 0:
            continue
        h = n - int(num_targets[b]) if num_targets is not None else n
        scores = torch.einsum("ihd,jhd->hij", q[s0:s1], k[s0:s1])
        bias = torch.zeros(n, n)
        mask = torch.zeros(n, n)
        for i in range(n):
            for j in range(n):
                if num_targets is None:
                    ok = j <= i
                else:
                    ok = (j <= i and j < h) or i == j
                if not ok:
                    continue
                mask[i, j] = 1.0
                pi = i if i < h else h
                pj = j if j < h else h
                terms = []
                if pos_bias is not None:
                    terms.append(pos_bias[min(pi - pj, pos_bias.numel() - 1)])
                if time_bias is not None:
                    gap = abs(int(ts[s0 + i]) - int(ts[s0 + j]))
                    bucket = min(int(math.floor(2 * math.log2(1 + gap))), time_bias.numel() - 1)
                    terms.append(time_bias[bucket])
                if terms:
                    bias = bias.index_put((torch.tensor([i]), torch.tensor([j])), sum(terms)[None])
        denom = n if norm == "length" else norm
        a = F.silu(scores + bias[None]) * mask[None] / denom
        outs.append(torch.einsum("hij,jhd->ihd", a, v[s0:s1]))
    return torch.cat(outs)


def random_batch(lengths, seed=0, with_targets=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    T = int(lengths.sum())
    q = torch.randn(T, H, DQK, generator=g, requires_grad=True)
    k = torch.randn(T, H, DQK, generator=g, requires_grad=True)
    v = torch.randn(T, H, DV, generator=g, requires_grad=True)
    gaps = torch.randint(0, 5000, (T,), generator=g)
    ts = torch.cumsum(gaps, 0)
    pos_bias = torch.randn(P, generator=g, requires_grad=True)
    time_bias = torch.randn(NB, generator=g, requires_grad=True)
    nt = None
    if with_targets:
        nt = torch.minimum(torch.randint(0, 4, (lengths.numel(),), generator=g), lengths)
    return q, k, v, offsets, ts, pos_bias, time_bias, nt


LENGTHS = [5, 0, 1, 23, 9, 33, 2, 17, 30]


@pytest.mark.parametrize(
    "with_targets,use_bias,norm",
    [(False, True, "length"), (True, True, "length"), (False, False, 7.0), (True, False, 10.0)],
)
def test_reference_matches_naive_forward_and_grads(with_targets, use_bias, norm):
    q, k, v, offsets, ts, pb, tb, nt = random_batch(LENGTHS, seed=1, with_targets=with_targets)
    if not use_bias:
        pb = tb = None
    kw = dict(timestamps=ts, pos_bias=pb, time_bias=tb, num_targets=nt, norm=norm)
    got = hstu_attention(q, k, v, offsets, max(LENGTHS), backend="reference", **kw)
    want = naive_attention(q, k, v, offsets, ts, pb, tb, nt, norm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(want)
    params = [q, k, v] + ([pb, tb] if use_bias else [])
    g_got = torch.autograd.grad((got * w).sum(), params)
    g_want = torch.autograd.grad((want * w).sum(), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if use_bias:  # the biases really receive gradient
        assert float(g_got[3].abs().sum()) > 0 and float(g_got[4].abs().sum()) > 0


def test_padded_variant_matches_jagged():
    q, k, v, offsets, ts, pb, tb, nt = random_batch(LENGTHS, seed=2, with_targets=True)
    lengths = offsets[1:] - offsets[:-1]
    L = max(LENGTHS)
    ar = torch.arange(L)
    valid = ar[None] < lengths[:, None]
    rows = offsets[:-1, None] + torch.where(valid, ar[None], 0)
    rows = rows.clamp_max(q.shape[0] - 1)
    pad = hstu_attention_padded(
        q[rows],
        k[rows],
        v[rows],
        lengths,
        timestamps=ts[rows],
        pos_bias=pb,
        time_bias=tb,
        num_targets=nt,
    )
    jag = hstu_attention(
        q, k, v, offsets, L, timestamps=ts, pos_bias=pb, time_bias=tb, num_targets=nt
    )
    torch.testing.assert_close(pad[valid], jag, rtol=1e-5, atol=1e-6)
    assert float(pad[~valid].detach().abs().max()) == 0.0


def test_causal_later_tokens_do_not_change_earlier_outputs():
    q, k, v, offsets, ts, pb, tb, _ = random_batch([12, 20], seed=3)
    kw = dict(timestamps=ts, pos_bias=pb, time_bias=tb)
    before = hstu_attention(q, k, v, offsets, 20, **kw).detach()
    cut = 12 + 9  # token 9 of the second sequence
    q2, k2, v2, ts2 = q.detach().clone(), k.detach().clone(), v.detach().clone(), ts.clone()
    q2[cut:] += 3.0
    k2[cut:] -= 2.0
    v2[cut:] *= 5.0
    ts2[cut:] += 10_000
    after = hstu_attention(q2, k2, v2, offsets, 20, **{**kw, "timestamps": ts2}).detach()
    torch.testing.assert_close(after[:cut], before[:cut], rtol=0, atol=0)
    assert float((after[cut:] - before[cut:]).abs().max()) > 1e-3


def test_target_aware_candidates_do_not_see_each_other():
    q, k, v, offsets, ts, pb, tb, _ = random_batch([10], seed=4)
    nt = torch.tensor([4])  # rows 6..9 are candidates
    kw = dict(timestamps=ts, pos_bias=pb, time_bias=tb, num_targets=nt)
    before = hstu_attention(q, k, v, offsets, 10, **kw).detach()
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[7] += 4.0
    v2[7] *= -3.0
    after = hstu_attention(q, k2, v2, offsets, 10, **kw).detach()
    changed = (after - before).abs().amax(dim=(1, 2))
    assert float(changed[:6].max()) == 0.0  # history never sees candidates
    assert float(changed[[6, 8, 9]].max()) == 0.0  # other candidates unaffected
    assert float(changed[7]) > 1e-3  # the candidate sees itself
    # a candidate sees the full history: perturbing history row 5 changes every candidate
    v3 = v.detach().clone()
    v3[5] += 1.0
    after3 = hstu_attention(q, k, v3, offsets, 10, **kw).detach()
    assert float((after3[6:] - before[6:]).abs().amax(dim=(1, 2)).min()) > 1e-6


def test_time_bucket_values():
    dt = torch.tensor([0, 1, 2, 3, -3, 7, 8, 14, 15, 10**9, -(10**9)])
    # floor(2*log2(1+|dt|)): 0, 2, 3.17->3, 4, 4, 6, 6.34->6, 7.8->7, 8, 59.8->59 (clamped 40)
    want = torch.tensor([0, 2, 3, 4, 4, 6, 6, 7, 8, 40, 40])
    assert torch.equal(time_bucket(dt, 41), want)
    assert torch.equal(time_bucket(torch.tensor([10**9]), 64), torch.tensor([59]))
    assert time_bucket(dt, 41).dtype == torch.int64


def test_time_bucket_is_exact_integer_arithmetic():
    """floor(log2((1+|dt|)^2)) by Python's exact bit_length at every bucket edge (one off
    either side), up to gaps past 2^32 s, and every bucket count up to 64."""
    xs = sorted({e + d for k in range(1, 64) for e in (round(2 ** (k / 2)),) for d in (-1, 0, 1)})
    xs = [x for x in xs if 1 <= x <= 2**33]
    dt = torch.tensor([x - 1 for x in xs])
    want = torch.tensor([min((x * x).bit_length() - 1, 63) for x in xs])
    assert torch.equal(time_bucket(dt, 64), want)
    assert torch.equal(time_bucket(-dt, 64), want)
    for nb in (1, 2, 7, 64, 128):
        assert torch.equal(time_bucket(dt, nb), want.clamp_max(nb - 1)), nb
    fits = dt < 2**31  # the int32 path (the grouped plan's gaps), written into int32 `out`
    out = torch.empty(int(fits.sum()), dtype=torch.int32)
    for nb in (2, 64, 128):
        time_bucket(-dt[fits].to(torch.int32), nb, out=out)
        assert torch.equal(out, want[fits].clamp_max(nb - 1).to(torch.int32)), nb


def test_length_groups_do_not_pad_short_sequences_to_the_longest():
    lengths = [3] * 100 + [500] + [0, 40]
    groups = length_groups(lengths, num_heads=2)
    covered = sorted(b for members, _ in groups for b in members)
    assert covered == [b for b, n in enumerate(lengths) if n > 0]
    for members, L in groups:
        assert L == max(lengths[b] for b in members)
        assert all(lengths[b] * 2 > L for b in members)  # within a factor 2 of the pad
    padded_scores = sum(len(m) * L * L for m, L in groups)
    assert padded_scores <= 2 * sum(n * n for n in lengths)


@pytest.mark.parametrize(
    "with_targets,biases,norm",
    [
        (False, "both", "length"),
        (True, "both", "length"),
        (False, "pos", 9.0),
        (True, "time", "length"),
        (False, "none", 7.0),
    ],
)
@pytest.mark.parametrize("block_min", [96, 8])
def test_grouped_backend_matches_reference_outputs_and_all_grads(
    with_targets, biases, norm, block_min, monkeypatch
):
    """The fast path (hand-written backward, one shared plan) against autograd through the
    padded reference: outputs and the gradients of q, k, v and both bias tables; with groups
    split in 2 row blocks from 8 tokens and from the default length."""
    import genrec.models.attention_grouped as grouped

    monkeypatch.setattr(grouped, "ROW_BLOCK_MIN_L", block_min)
    monkeypatch.setattr(grouped, "ROW_BLOCK_MAX_THREADS", 1 << 10)
    lengths = [5, 0, 1, 23, 9, 33, 2, 17, 30, 64, 3, 48, 47]
    q, k, v, offsets, ts, pb, tb, nt = random_batch(lengths, seed=7, with_targets=with_targets)
    pb = pb if biases in ("both", "pos") else None
    tb = tb if biases in ("both", "time") else None
    kw = dict(timestamps=ts, pos_bias=pb, time_bias=tb, num_targets=nt, norm=norm)
    want = hstu_attention(q, k, v, offsets, 64, backend="reference", **kw)
    got = hstu_attention(q, k, v, offsets, 64, backend="grouped", **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(want)
    params = [t for t in (q, k, v, pb, tb) if t is not None]
    g_want = torch.autograd.grad((want * w).sum(), params)
    g_got = torch.autograd.grad((got * w).sum(), params)
    for name, a, b in zip("q k v pos time".split(), g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for g in g_got[3:]:  # the bias tables really receive gradient
        assert float(g.abs().sum()) > 0


@pytest.mark.parametrize("with_targets", [False, True])
def test_grouped_dense_groups_match_reference(with_targets, monkeypatch):
    """Full rows (every group dense: Q/K/V read as views, results written in place), chunked
    into several dense groups, with gaps past 2^31 s in one batch (the plan's int64 gaps) and
    under it in another (int32 gaps): outputs and all gradients against the reference."""
    import genrec.models.attention_grouped as grouped
    import genrec.models.jagged as jagged

    monkeypatch.setattr(jagged, "GROUP_SCORE_ELEMS", 3 * H * 24 * 24)  # chunks of 3 rows
    monkeypatch.setattr(grouped, "ROW_BLOCK_MIN_L", 13)  # 2 row blocks: 12 x 12, 12 x 24
    monkeypatch.setattr(grouped, "ROW_BLOCK_MAX_THREADS", 1 << 10)
    for gap in (40, 3 * 10**9):
        q, k, v, offsets, _, pb, tb, nt = random_batch([24] * 7, seed=11, with_targets=True)
        nt = nt if with_targets else None
        ts = torch.cumsum(torch.randint(0, gap, (q.shape[0],)), 0)
        plan = attention_plan(offsets, 24, H, ts, pb, tb, nt, "length")
        assert [g.G for g in plan.groups] == [3, 3, 1]
        assert [g.start for g in plan.groups] == [0, 72, 144]  # dense: contiguous rows
        assert all(g.blocks == [(0, 12), (12, 24)] for g in plan.groups)
        kw = dict(timestamps=ts, pos_bias=pb, time_bias=tb, num_targets=nt)
        want = hstu_attention(q, k, v, offsets, 24, backend="reference", **kw)
        got = hstu_attention(q, k, v, offsets, 24, plan=plan, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        w = torch.randn_like(want)
        g_want = torch.autograd.grad((want * w).sum(), (q, k, v, pb, tb))
        g_got = torch.autograd.grad((got * w).sum(), (q, k, v, pb, tb))
        for name, a, b in zip("q k v pos time".split(), g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} gap {gap}")


def test_encoder_jagged_matches_padded_outputs_and_grads():
    """The training path (grouped op, one plan per encoder, Q/K/V/U recomputed from W1's
    output in the backward) against the padded reference path of the same weights: outputs,
    input gradients and every parameter's gradient."""
    from genrec.config import ModelConfig
    from genrec.models.hstu import HSTUEncoder

    torch.manual_seed(3)
    cfg = ModelConfig(
        dim=16,
        num_layers=2,
        num_heads=H,
        attn_dim=8,
        linear_dim=6,
        dropout=0.0,
        max_len=24,
        num_time_buckets=NB,
    )
    enc = HSTUEncoder(cfg).train()
    for layer in enc.layers:  # non-zero biases, so their gradients flow through both terms
        torch.nn.init.normal_(layer.pos_bias)
        torch.nn.init.normal_(layer.time_bias)
    lengths = torch.tensor([24, 24, 24, 5, 0, 17, 24, 1])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    T, L = int(offsets[-1]), 24
    x = torch.randn(T, 16, requires_grad=True)
    ts = torch.cumsum(torch.randint(0, 40, (T,)), 0)
    rows, valid = padded_rows(offsets, torch.arange(lengths.numel()), L)
    w = torch.randn(T, 16)
    got = enc(x, offsets, L, ts)
    g_got = torch.autograd.grad((got * w).sum(), [x, *enc.parameters()])
    want = enc.forward_padded(x[rows] * valid[..., None], lengths, ts[rows])[valid]
    g_want = torch.autograd.grad((want * w).sum(), [x, *enc.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    names = ["x"] + [n for n, _ in enc.named_parameters()]
    for name, a, b in zip(names, g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_encoder_recompute_hooks_are_bitwise_plain_autograd(monkeypatch):
    """The saved-tensor hooks (U, V, Q, K and both LayerNorm outputs rebuilt in the backward)
    change what is kept, not the numbers: every gradient is bitwise the one autograd gives
    when it keeps those tensors (full rows of 40 tokens, so Q/K/V are strided views of a
    wide W1 output, as in training)."""
    import genrec.models.hstu as hstu
    from genrec.config import ModelConfig

    torch.manual_seed(5)
    cfg = ModelConfig(
        dim=24,
        num_layers=2,
        num_heads=1,
        attn_dim=24,
        linear_dim=24,
        dropout=0.0,
        max_len=40,
        num_time_buckets=NB,
    )
    enc = hstu.HSTUEncoder(cfg).train()
    offsets = torch.arange(0, 6 * 40 + 1, 40)
    x0, w = torch.randn(240, 24), torch.randn(240, 24)
    ts = torch.cumsum(torch.randint(0, 9000, (240,)), 0)

    def grads():
        x = x0.clone().requires_grad_()
        return torch.autograd.grad((enc(x, offsets, 40, ts) * w).sum(), [x, *enc.parameters()])

    got = grads()
    monkeypatch.setattr(hstu._Recomputed, "register", lambda self, t, fn: t)  # keep all
    want = grads()
    for name, a, b in zip(["x"] + [n for n, _ in enc.named_parameters()], got, want):
        assert torch.equal(a, b), name


def test_grouped_plan_is_shared_and_checked():
    q, k, v, offsets, ts, pb, tb, _ = random_batch([7, 12, 3], seed=8)
    plan = attention_plan(offsets, 12, H, ts, pb, tb, None, "length")
    kw = dict(timestamps=ts, pos_bias=pb, time_bias=tb)
    with_plan = hstu_attention(q, k, v, offsets, 12, plan=plan, **kw)
    again = hstu_attention(q * 2, k, v, offsets, 12, plan=plan, **kw)  # reused plan
    torch.testing.assert_close(with_plan, hstu_attention(q, k, v, offsets, 12, **kw))
    torch.testing.assert_close(again, hstu_attention(q * 2, k, v, offsets, 12, **kw))
    with pytest.raises(ValueError, match="plan made for"):
        hstu_attention(q, k, v, offsets, 12, plan=plan, timestamps=ts, pos_bias=pb)
    with pytest.raises(ValueError, match="max_seq_len"):
        hstu_attention(q, k, v, offsets, 11, **kw)


def test_grouped_backend_bf16_follows_float32():
    q, k, v, offsets, ts, pb, tb, nt = random_batch([6, 19, 31], seed=9, with_targets=True)
    kw = dict(timestamps=ts, pos_bias=pb, time_bias=tb, num_targets=nt)
    want = hstu_attention(q, k, v, offsets, 31, backend="grouped", **kw)
    half = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    got = hstu_attention(*half, offsets, 31, backend="grouped", **kw)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    got.float().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 for t in half) and pb.grad.dtype == torch.float32
