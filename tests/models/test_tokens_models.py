"""Token layouts, causality and leakage at model level, one lookup per step, export path."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from genrec.data_pipeline.batch import make_batch
from genrec.models.build import build_model
from genrec.models.ranking import HSTURanking
from genrec.models.retrieval import HSTURetrieval, target_events
from genrec.models.sasrec import SASRecRanking, SASRecRetrieval
from genrec.models.tokens import TokenBuilder
from tests.models.helpers import edit, random_batch, small_config


@pytest.mark.parametrize(
    "mode,candidates,offsets,state",
    [
        ("sum", True, [0, 4, 7], [1, 2, 3, 5, 6]),
        ("interleave", True, [0, 6, 9], [2, 4, 5, 7, 8]),
        ("interleave", False, [0, 7, 12], [2, 4, 6, 9, 11]),
    ],
)
def test_token_layout(mode, candidates, offsets, state):
    cfg = small_config(token_mode=mode, user_feature_tokens=["category"])
    tb = TokenBuilder(cfg.model, item_dim=16, context_dims={"category": 8})
    lengths, nt = torch.tensor([3, 2]), torch.tensor([1, 2])
    ts = torch.tensor([100, 200, 300, 400, 500])
    tok = tb(
        torch.randn(5, 16),
        torch.tensor([0, 1, 2, 3, 1]),
        ts,
        lengths,
        nt,
        {"category": torch.randn(5, 8)},
        candidates=candidates,
    )
    assert tok.offsets.tolist() == offsets
    assert tok.state_index.tolist() == state
    assert tok.max_len == max(b - a for a, b in zip(offsets, offsets[1:]))
    assert tok.timestamps[0] == 100 and tok.timestamps[offsets[1]] == 400  # context tokens
    assert tok.timestamps[state].tolist() == ts.tolist()
    assert (tok.num_targets.tolist() if candidates else None) == ([1, 2] if candidates else None)


def test_build_model_picks_class():
    for kind, task, cls in [
        ("hstu", "retrieval", HSTURetrieval),
        ("hstu", "ranking", HSTURanking),
        ("sasrec", "retrieval", SASRecRetrieval),
        ("sasrec", "ranking", SASRecRanking),
    ]:
        assert type(build_model(small_config(kind=kind, task=task))) is cls


@pytest.mark.parametrize(
    "kind,mode,ctx",
    [("hstu", "sum", True), ("hstu", "interleave", False), ("sasrec", "sum", False)],
)
@torch.no_grad()
def test_retrieval_states_are_causal_and_context_never_sees_targets(kind, mode, ctx):
    torch.manual_seed(0)
    cfg = small_config(kind=kind, token_mode=mode, user_feature_tokens=["category"] if ctx else [])
    model = build_model(cfg).eval()
    batch = random_batch([6, 9], [2, 5], seed=1)  # seq 1: events 6..14, targets 10..14
    states, targets, rows = model.user_states(batch)
    assert rows.tolist() == [0, 0, 1, 1, 1, 1, 1] and torch.equal(
        targets, batch.item_ids[[4, 5, 10, 11, 12, 13, 14]]
    )
    # change event 12 (a target): states predicting 10, 11, 12 (after events <= 11) stay
    after, _, _ = model.user_states(edit(batch, 12, item=49, action=3, category=9))
    torch.testing.assert_close(after[:5], states[:5], rtol=0, atol=1e-6)
    assert float((after[5:] - states[5:]).detach().abs().max()) > 1e-4
    if ctx:  # a target's context feature must not reach any state through the context token
        after, _, _ = model.user_states(edit(batch, 14, category=7))
        torch.testing.assert_close(after, states, rtol=0, atol=1e-6)
        after, _, _ = model.user_states(edit(batch, 1, category=7))  # history: it does
        assert float((after - states).detach().abs().max()) > 1e-4


@pytest.mark.parametrize("kind,mode", [("hstu", "sum"), ("hstu", "interleave"), ("sasrec", "sum")])
@torch.no_grad()
def test_ranking_candidates_do_not_see_each_other(kind, mode):
    torch.manual_seed(0)
    model = build_model(small_config(kind=kind, task="ranking", token_mode=mode)).eval()
    batch = random_batch([7, 5], [3, 2], seed=2)  # candidates: 4,5,6 and 10,11
    logits, cand, rows = model.predict(batch)
    assert cand.tolist() == [4, 5, 6, 10, 11] and rows.tolist() == [0, 0, 0, 1, 1]
    after, _, _ = model.predict(edit(batch, 5, item=49))
    changed = (after - logits).abs().amax(dim=1)
    assert float(changed[[0, 2, 3, 4]].max()) < 1e-6 and float(changed[1]) > 1e-5
    # a candidate's own action is its label: it must not reach any prediction
    after, _, _ = model.predict(edit(batch, 6, action=3 - int(batch.actions[6])))
    torch.testing.assert_close(after, logits, rtol=0, atol=1e-6)
    # history reaches every candidate of its sequence
    after, _, _ = model.predict(edit(batch, 1, item=48))
    assert float((after[:3] - logits[:3]).abs().amax(dim=1).min()) > 1e-6


def test_one_sparse_lookup_per_forward_and_empty_targets_keep_grad():
    torch.manual_seed(0)
    model = build_model(small_config(user_feature_tokens=["category"]))
    calls = []
    model.sparse.ec.register_forward_hook(lambda *a: calls.append(1))
    batch = random_batch([4, 6], [2, 3], seed=3)
    out = model(batch, torch.tensor([1, 2, 3, 4]), torch.full((4,), -2.0))
    assert len(calls) == 1 and out.num_targets == 5 and out.num_candidates == 1 + 5 + 4
    out.loss.backward()
    assert model.sparse.ec.embeddings["item"].weight.grad is not None
    # no target position (single-event sequences): loss 0 that still backpropagates
    empty = random_batch([1, 1], [1, 1], seed=4)
    out = model(empty, torch.tensor([1, 2]), torch.zeros(2))
    assert out.num_targets == 0 and float(out.loss.detach()) == 0.0
    out.loss.backward()


def test_full_softmax_matches_scores_over_catalog():
    torch.manual_seed(0)
    cfg = small_config()
    cfg.model.retrieval.full_softmax = True
    model = build_model(cfg).eval()
    batch = random_batch([5, 6], [2, 3], seed=5, num_items=20)
    catalog = torch.arange(20).flip(0)
    out = model(batch, catalog, torch.zeros(20))
    states, targets, _ = model.user_states(batch)
    logits = states @ model.item_embeddings(catalog).T / cfg.model.retrieval.temperature
    want = torch.nn.functional.cross_entropy(logits, 19 - targets)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not in the catalog"):
        model(batch, torch.arange(3), torch.zeros(3))


@torch.no_grad()
def test_top_k_blocks_and_history_exclusion():
    torch.manual_seed(0)
    model = build_model(small_config()).eval()
    batch = random_batch([6, 8], [2, 3], seed=6, num_items=30)
    catalog = torch.arange(30)
    states, targets, _ = model.user_states(batch)
    full = states @ model.item_embeddings(catalog).T
    ids, scores, tgt = model.top_k(batch, catalog, 5, exclude_history=False, block=7)
    assert torch.equal(tgt, targets)
    torch.testing.assert_close(scores, full.topk(5, dim=1).values, rtol=1e-5, atol=1e-6)
    ids, _, _ = model.top_k(batch, catalog, 5, exclude_history=True, block=4)
    pos, rows = target_events(batch)
    for p in range(ids.shape[0]):
        seen = set(batch.item_ids[int(batch.offsets[rows[p]]) : int(pos[p])].tolist())
        masked = full[p].clone()
        masked[list(seen)] = float("-inf")
        assert not seen & set(ids[p].tolist())
        assert ids[p].tolist() == masked.topk(5).indices.tolist()


@pytest.mark.parametrize(
    "mode,ctx,sasrec",
    [("sum", False, ""), ("interleave", True, ""), ("sum", False, "from_start"),
     ("sum", False, "from_end")],
)  # fmt: skip
def test_encode_last_equals_jagged_state_and_exports(mode, ctx, sasrec):
    """The exportable encoder on a padded history gives the state the jagged model reads
    for the next event (HSTU; SASRec with either position scheme: from_end counts from the
    last event read, which ends the exported row but not the jagged one)."""
    torch.manual_seed(0)
    cfg = small_config(token_mode=mode, user_feature_tokens=["category"] if ctx else [])
    if sasrec:
        cfg.model.kind, cfg.model.sasrec_positions = "sasrec", sasrec
    model = build_model(cfg).eval()
    batch = random_batch([5, 8], [1, 1], seed=7)  # target = last event; state after the rest
    states, _, _ = model.user_states(batch)
    # the exported encoder gets the looked-up item rows of the histories, padded
    hist_len = batch.lengths - 1
    L = int(hist_len.max())
    ar = torch.arange(L)
    valid = ar[None] < hist_len[:, None]
    idx = (batch.offsets[:-1, None] + ar[None]).clamp_max(batch.num_tokens - 1)
    rows = model.sparse(batch.features)
    item_emb = rows["item_id"].values()[idx] * valid[..., None]
    ctx_emb = [rows["category"].values()[idx]] if ctx else None
    args = (item_emb, batch.actions[idx], batch.timestamps[idx], hist_len, ctx_emb)
    last = model.encode_last(*args)
    torch.testing.assert_close(last, states, rtol=1e-5, atol=1e-5)

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, item_emb, actions, timestamps, lengths, context_emb=None):
            return self.m.encode_last(item_emb, actions, timestamps, lengths, context_emb)

    B, S = torch.export.Dim("B", min=1, max=64), torch.export.Dim("L", min=2, max=32)
    dyn = ({0: B, 1: S}, {0: B, 1: S}, {0: B, 1: S}, {0: B}, [{0: B, 1: S}] if ctx else None)
    exported = torch.export.export(Encoder(model), args, dynamic_shapes=dyn)
    torch.testing.assert_close(exported.module()(*args), last, rtol=1e-5, atol=1e-6)
    # other batch and length sizes run through the same exported program
    shorter = (
        args[0][:1, :3],
        args[1][:1, :3],
        args[2][:1, :3],
        torch.tensor([3]),
        [args[4][0][:1, :3]] if ctx else None,
    )
    torch.testing.assert_close(
        exported.module()(*shorter), model.encode_last(*shorter), rtol=1e-5, atol=1e-6
    )


def test_bad_actions_fail_early():
    model = build_model(small_config())
    b = random_batch([3], [1], seed=8)
    bad = make_batch(
        b.item_ids,
        torch.tensor([0, 9, 1]),
        b.timestamps,
        b.lengths,
        b.num_targets,
        b.user_ids,
        b.windows,
        context={},
    )
    with pytest.raises(ValueError, match="model.num_actions"):
        model.user_states(bad)


@torch.no_grad()
def test_dot_similarity_scores_raw_inner_products_everywhere():
    """retrieval.similarity=dot (SASRec's): the same vectors as cosine, unnormalized, in the
    BCE loss, in top-k and in the exportable encode_last."""
    batch = random_batch([5, 8], [2, 3], seed=8, num_items=30)
    catalog = torch.arange(30)
    models = {}
    for sim in ("cosine", "dot"):
        torch.manual_seed(0)
        cfg = small_config()
        cfg.model.kind = "sasrec"
        cfg.model.retrieval.similarity = sim
        cfg.model.retrieval.loss = "bce"
        cfg.model.retrieval.temperature = 1.0
        models[sim] = build_model(cfg).eval()
    states, targets, _ = models["dot"].user_states(batch)
    items = models["dot"].item_embeddings(catalog)
    norm = torch.nn.functional.normalize
    # same weights: cosine vectors are the dot vectors normalized, and dot ones are not unit
    torch.testing.assert_close(models["cosine"].user_states(batch)[0], norm(states, dim=-1))
    torch.testing.assert_close(models["cosine"].item_embeddings(catalog), norm(items, dim=-1))
    assert (states.norm(dim=-1) - 1).abs().max() > 0.1
    # BCE on raw inner products. per_position (the default): negative i for position i,
    # a target's own id among them dropped
    sp = torch.nn.functional.softplus
    pos = (states * items[targets]).sum(-1)
    negs = torch.randint(0, 30, (targets.numel(),), generator=torch.Generator().manual_seed(2))
    negs[0] = targets[0]
    out = models["dot"](batch, negs, torch.zeros(negs.numel()))
    neg = (states * items[negs]).sum(-1)
    keep = (targets != negs).float()
    torch.testing.assert_close(out.loss, (sp(-pos) + keep * sp(neg)).mean())
    with pytest.raises(ValueError, match="5 target positions"):
        models["dot"](batch, negs[:-1], torch.zeros(negs.numel() - 1))
    # pool: each position picks one of the pool (a pool of one: item 7 everywhere)
    models["dot"].rcfg.bce_negatives = "pool"
    out = models["dot"](batch, torch.tensor([7]), torch.zeros(1))
    neg = states @ items[7]
    keep = (targets != 7).float()
    torch.testing.assert_close(out.loss, (sp(-pos) + keep * sp(neg)).mean())
    # top-k ranks by the raw inner product
    _, scores, _ = models["dot"].top_k(batch, catalog, 5, exclude_history=False, block=7)
    torch.testing.assert_close(scores, (states @ items.T).topk(5, dim=1).values)
    # the exportable path returns the same raw state as the jagged one
    one = random_batch([5, 8], [1, 1], seed=9)
    want, _, _ = models["dot"].user_states(one)
    hist_len = one.lengths - 1
    ar = torch.arange(int(hist_len.max()))
    idx = (one.offsets[:-1, None] + ar[None]).clamp_max(one.num_tokens - 1)
    rows = models["dot"].sparse(one.features)["item_id"].values()[idx]
    rows = rows * (ar[None] < hist_len[:, None])[..., None]
    got = models["dot"].encode_last(rows, one.actions[idx], one.timestamps[idx], hist_len)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", ["pre_ln", "post_ln"])
@pytest.mark.parametrize("targets", [None, [1, 2, 3, 5, 10, 0, 3]])
def test_sasrec_length_groups_equal_one_padded_batch(targets, block):
    """The jagged SASRec forward (groups of similar length, each padded to its own longest)
    equals padding the whole batch to its longest sequence, values and gradients."""
    from genrec.models.sasrec import SASRecEncoder

    torch.manual_seed(0)
    cfg = small_config(kind="sasrec", num_heads=2, sasrec_block=block)
    enc = SASRecEncoder(cfg.model).eval()
    lengths = torch.tensor([1, 5, 9, 17, 30, 0, 3])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    nt = torch.tensor(targets) if targets else None
    x = torch.randn(int(lengths.sum()), cfg.model.dim, requires_grad=True)
    got = enc(x, offsets, 30, None, nt)
    L = int(lengths.max())
    ar = torch.arange(L)
    valid = ar[None] < lengths[:, None]
    rows = (offsets[:-1, None] + ar[None]).clamp_max(x.shape[0] - 1)
    want = enc.forward_padded(x[rows], lengths, None, nt)[valid]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(got)
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    (g_want,) = torch.autograd.grad((want * w).sum(), x)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)


def test_action_init_std():
    """model.action_init_std sets the action embedding's init scale; the default keeps
    nn.Embedding's own N(0, 1) draw (no second draw, so default models are unchanged)."""
    torch.manual_seed(0)
    default = TokenBuilder(small_config().model, 16, {})
    torch.manual_seed(0)
    plain = torch.nn.Embedding(small_config().model.num_actions + 1, 16)
    assert torch.equal(default.action_emb.weight, plain.weight)
    cfg = small_config(dim=64, num_actions=200)
    cfg.model.action_init_std = 0.02
    small = TokenBuilder(cfg.model, 64, {})
    assert abs(float(small.action_emb.weight.std()) / 0.02 - 1) < 0.05


def test_use_actions_false_leaves_the_items_alone():
    """model.use_actions=false: every token is its item's projection whatever the action
    (the embedding is zero and frozen); interleave mode, whose state is the action token,
    refuses it."""
    cfg = small_config(use_actions=False, action_init_std=0.5)
    tb = TokenBuilder(cfg.model, 16, {})
    items = torch.randn(6, 16)
    args = (torch.arange(6), torch.tensor([4, 2]), torch.tensor([1, 1]))
    for actions in (torch.zeros(6, dtype=torch.int64), torch.tensor([0, 1, 2, 3, 1, 0])):
        tok = tb(items, actions, *args)
        assert torch.equal(tok.x, items)
    assert not tb.action_emb.weight.requires_grad
    cfg.model.token_mode = "interleave"
    with pytest.raises(ValueError, match="token_mode=sum"):
        TokenBuilder(cfg.model, 16, {})


def test_sasrec_input_dropout_acts_on_items_and_positions():
    """SASRec drops the sum item + position (its paper's and the S3-Rec code's order), so the
    token builder's own dropout is off in SASRec models (HSTU keeps it): with zero item
    tokens in train mode, ~p of the position coordinates reach the first block as zeros and
    the rest scaled by 1 / (1 - p)."""
    torch.manual_seed(0)
    cfg = small_config(kind="sasrec", num_heads=2, dropout=0.5)
    model = build_model(cfg)
    assert isinstance(model.tokens.dropout, torch.nn.Identity)
    assert isinstance(build_model(small_config(dropout=0.5)).tokens.dropout, torch.nn.Dropout)
    enc = model.encoder.train()
    seen = []
    enc.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    L = 12
    enc.forward_padded(torch.zeros(8, L, cfg.model.dim), torch.full((8,), L))
    pos = enc.pos_emb.weight[:L].detach()
    x = seen[0].detach()
    dropped = x == 0
    assert 0.4 < float(dropped.float().mean()) < 0.6
    torch.testing.assert_close(x[~dropped], (2 * pos).expand_as(x)[~dropped])


def _sasrec_reference():
    """benchmarks/sasrec_reference.py as a module (an independent plain-PyTorch SASRec)."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location(
        "sasrec_reference", ROOT / "benchmarks" / "sasrec_reference.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "block,ffn_dropout,dropped",
    [("pre_ln", "auto", True), ("post_ln", "auto", False), ("post_ln", "on", True),
     ("pre_ln", "off", False)],
)  # fmt: skip
def test_sasrec_feed_forward_dropout_follows_its_block(block, ffn_dropout, dropped):
    """In training, the SASRec paper's pre-LN block drops the feed-forward's hidden units
    (~p of them zero, the rest scaled by 1 / (1 - p)); the S3-Rec code's post-LN block does
    not: its second linear layer sees activation(first layer) exactly.
    model.sasrec_ffn_dropout=on/off overrides either."""
    from genrec.models.sasrec import SASRecBlock

    torch.manual_seed(0)
    cfg = small_config(
        kind="sasrec", num_heads=2, dropout=0.5, sasrec_block=block, sasrec_ffn_dropout=ffn_dropout
    )
    blk = SASRecBlock(cfg.model).train()
    ffn_in, second_in = [], []
    blk.ffn[0].register_forward_pre_hook(lambda mod, args: ffn_in.append(args[0]))
    blk.ffn[3].register_forward_pre_hook(lambda mod, args: second_in.append(args[0]))
    B, L = 4, 9
    blk(torch.randn(B, L, cfg.model.dim), torch.tril(torch.ones(L, L, dtype=torch.bool))[None])
    with torch.no_grad():
        act = blk.ffn[1](blk.ffn[0](ffn_in[0]))
        got = second_in[0]
    if not dropped:
        torch.testing.assert_close(got, act)
    else:
        live = act != 0  # ReLU's own zeros aside
        zeroed = (got == 0) & live
        assert 0.4 < float(zeroed.sum() / live.sum()) < 0.6
        kept = got != 0
        torch.testing.assert_close(got[kept], 2 * act[kept])


@pytest.mark.parametrize("post_ln", [True, False])
def test_sasrec_blocks_equal_the_independent_reference(post_ln):
    """Both SASRec blocks equal benchmarks/sasrec_reference.py's (a separate plain-PyTorch
    implementation; its post-LN GELU 4x block reproduced the published Toys row) with the
    same weights, and the post_ln encoder puts a LayerNorm on item + position as it does."""
    from genrec.models.sasrec import SASRecEncoder

    ref_mod = _sasrec_reference()
    torch.manual_seed(0)
    cfg = small_config(kind="sasrec", num_heads=2, num_layers=1)
    cfg.model.sasrec_block = "post_ln" if post_ln else "pre_ln"
    enc = SASRecEncoder(cfg.model).eval()
    ours = enc.blocks[0]
    d = cfg.model.dim
    act = torch.nn.functional.gelu if post_ln else torch.nn.functional.relu
    ref = ref_mod.Block(d, 2, 4 * d if post_ln else d, 0.0, 0.0, post_ln, act).eval()
    with torch.no_grad():
        for p in (*ours.parameters(), *enc.input_norm.parameters()):
            p.normal_()  # away from the init, so a swapped or missing part shows
        for r, o in ref_mod.block_pairs(ref, ours):
            r.load_state_dict(o.state_dict())
    assert ours.norm1.eps == (1e-12 if post_ln else 1e-5)  # S3-Rec's / PyTorch's default
    ref.n1.eps = ref.n2.eps = ours.norm1.eps
    B, L = 3, 7
    x = torch.randn(B, L, d)
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool))[None].expand(B, L, L)
    torch.testing.assert_close(ours(x, mask), ref(x, mask[:, None]), rtol=1e-5, atol=1e-5)
    # the encoder around the block: (post_ln) LayerNorm(item + position), no final norm
    lengths = torch.full((B,), L)
    seen = []
    ours.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    out = enc.forward_padded(x, lengths)
    summed = x + enc.pos_emb.weight[:L]
    want_in = enc.input_norm(summed) if post_ln else summed
    torch.testing.assert_close(seen[0], want_in)
    want_out = ours(want_in, mask) if post_ln else enc.final_norm(ours(want_in, mask))
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    if post_ln:
        assert not torch.allclose(seen[0], summed, atol=1e-2)


@pytest.mark.parametrize(
    "use_actions,positions",
    [(True, "from_start"), (False, "from_start"), (True, "from_end"), (False, "from_end")],
)
def test_sasrec_bce_loss_and_gradients_equal_the_reference(use_actions, positions):
    """The whole SASRec recipe, forward and backward: genrec's model (post-LN block, one
    hashed row per item in a replicated table, a constant action token or, with
    model.use_actions=false, none, BCE against one negative per position, raw dot products,
    positions from the first event or, from_end, the slots of a left-padded row) gives the
    loss and every gradient of benchmarks/sasrec_reference.py's model (left-padded rows of
    each sequence but its last event, one nn.Embedding row per item) with the same weights,
    the same sequences and the same negatives."""
    from genrec.config import TableConfig

    ref_mod = _sasrec_reference()
    torch.manual_seed(0)
    L, n_items, dim = 12, 30, 16
    cfg = small_config(
        kind="sasrec",
        num_heads=2,
        sasrec_block="post_ln",
        max_len=L,
        action_init_std=0.02,
        use_actions=use_actions,
        sasrec_positions=positions,
    )
    cfg.embeddings.tables = [
        TableConfig(name="item", num_embeddings=4096, dim=dim, features=["item_id"], init_std=0.02)
    ]
    cfg.sharding.strategy = "data_parallel"
    r = cfg.model.retrieval
    r.loss, r.similarity, r.temperature, r.full_softmax = "bce", "dot", 1.0, False
    model = build_model(cfg).eval()  # eval: no dropout (both have dropout 0 anyway)
    a = ref_mod.parser().parse_args(
        f"--data x --dim {dim} --heads 2 --layers 2 --ffn {4 * dim} --dropout 0 "
        f"--attn-dropout 0 --pos {positions.removeprefix('from_')} --max-len {L} "
        f"--action-std {0.02 if use_actions else -1}".split()
    )
    ref = ref_mod.SASRec(n_items, a).eval()

    lengths = [5, 12, 3, 8]
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, n_items + 1, (n,), generator=g) for n in lengths]
    T = sum(lengths)
    batch = make_batch(
        item_ids=torch.cat(seqs),
        actions=torch.zeros(T, dtype=torch.int64),
        timestamps=torch.arange(T),
        lengths=torch.tensor(lengths),
        num_targets=torch.tensor(lengths),  # every event after the first is a target
        user_ids=torch.arange(len(lengths)),
        windows=torch.zeros(len(lengths), dtype=torch.int64),
    )
    table = model.sparse.table_weight("item")
    ids = torch.arange(1, n_items + 1)
    kjt = KeyedJaggedTensor(keys=["item_id"], values=ids, lengths=torch.tensor([n_items]))
    rows = model.sparse.hash_features(kjt).values()  # item i's table row (one hash)
    enc = model.encoder
    action_vec = model.tokens.action_emb.weight[0] if use_actions else None
    ref_mod.copy_genrec_weights(ref, table[rows].detach(), action_vec, enc)

    P = T - len(lengths)
    neg = torch.randint(1, n_items + 1, (P,), generator=g)  # one per position, in order
    neg[3] = seqs[0][4]  # a negative equal to its position's target: dropped by both
    out = model(batch, neg, torch.zeros(P))
    out.loss.backward()

    x = torch.zeros(len(lengths), L, dtype=torch.int64)  # inputs: all but the last event
    for b, s in enumerate(seqs):
        x[b, L - len(s) + 1 :] = s[:-1]
    h = ref(x)
    # the state after event t-1 predicts event t (t >= 1), sequence by sequence
    cols = [(b, L - len(s) + t) for b, s in enumerate(seqs) for t in range(1, len(s))]
    states = h[[b for b, _ in cols], [c for _, c in cols]]
    y = torch.cat([s[1:] for s in seqs])
    pos_l = (states * ref.item(y)).sum(-1)
    neg_l = (states * ref.item(neg)).sum(-1)
    sp = torch.nn.functional.softplus
    loss = (sp(-pos_l).sum() + (sp(neg_l) * (neg != y)).sum()) / y.numel()
    loss.backward()

    assert out.num_targets == y.numel()
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    want_table = torch.zeros_like(table).index_add_(0, rows, ref.item.weight.grad[1:])
    torch.testing.assert_close(table.grad, want_table, rtol=1e-4, atol=1e-7)
    action = model.tokens.action_emb.weight
    if use_actions:
        torch.testing.assert_close(action.grad[0], ref.action.grad)
    else:  # held at zero, frozen: no gradient, nothing for the optimizer
        assert ref.action is None and action.grad is None and not action.requires_grad
        assert float(action.abs().sum()) == 0.0
    torch.testing.assert_close(enc.pos_emb.weight.grad[:L], ref.pos.weight.grad)
    assert float(enc.pos_emb.weight.grad[L:].abs().sum()) == 0.0
    for rp, op in zip(ref.ln.parameters(), enc.input_norm.parameters()):
        torch.testing.assert_close(op.grad, rp.grad, rtol=1e-4, atol=1e-7)
    for rb, ob in zip(ref.blocks, enc.blocks):
        for rm, om in ref_mod.block_pairs(rb, ob):
            torch.testing.assert_close(om.weight.grad, rm.weight.grad, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(om.bias.grad, rm.bias.grad, rtol=1e-4, atol=1e-7)


def test_causal_ranking_sees_earlier_actions_never_its_own_or_later():
    """ranking.causal: event t's prediction depends on events < t with their actions and on
    its own item, never on its own or a later action (HSTU's causal ranking setting)."""
    torch.manual_seed(0)
    cfg = small_config(task="ranking", token_mode="interleave")
    cfg.model.ranking.causal = True
    model = build_model(cfg).eval()
    batch = random_batch([7, 5], [5, 5], seed=2)  # every event of row 1, 5 of row 0
    logits, cand, rows = model.predict(batch)
    assert cand.tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    after, _, _ = model.predict(edit(batch, 4, action=3 - int(batch.actions[4])))
    changed = (after - logits).abs().amax(dim=1)
    # events 2, 3, 4 (its own action) and row 1 unchanged; 5 and 6 see event 4's action
    assert float(changed[[0, 1, 2, 5, 6, 7, 8, 9]].max()) < 1e-6
    assert float(changed[[3, 4]].min()) > 1e-6
    after, _, _ = model.predict(edit(batch, 4, item=49))
    assert float((after - logits).abs().amax(dim=1)[2]) > 1e-6  # its own item counts
    # the last event scored causally == scored as the one candidate after its history,
    # which is what the exported ranker computes
    last = random_batch([7, 5], [1, 1], seed=2)
    model.causal = False
    as_candidate, _, _ = model.predict(last)
    torch.testing.assert_close(as_candidate, logits[[4, 9]], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs model.token_mode=interleave"):
        bad = small_config(task="ranking")
        bad.model.ranking.causal = True
        build_model(bad)
