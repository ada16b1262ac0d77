from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from genrec.config import EmbeddingsConfig, TableConfig
from genrec.embeddings.hashing import feature_seed, hash_ids
from genrec.embeddings.tables import SparseEmbeddings


def _cfg(**mc) -> EmbeddingsConfig:
    tables = [
        TableConfig(
            name="item", num_embeddings=97, dim=8, features=["item_id", "brand"], num_hashes=3
        ),
        TableConfig(name="user", num_embeddings=31, dim=8, features=["user_id"]),
    ]
    if mc:
        tables.append(
            TableConfig(
                name="cat",
                num_embeddings=16,
                dim=8,
                features=["category"],
                kind="managed_collision",
            )
        )
    return EmbeddingsConfig(tables=tables)


def _kjt() -> KeyedJaggedTensor:
    # 3 sequences; keys with different per-key lengths; "action" is not embedded
    return KeyedJaggedTensor(
        keys=["user_id", "item_id", "action"],
        values=torch.tensor([10**15, 5, 6, 7, 8, 9, 11, -3, 1, 2, 3, 4]),
        lengths=torch.tensor([1, 0, 1, 3, 2, 2, 0, 1, 2]),
    )


def test_k_hashes_are_summed_rows_and_unified_features_use_own_seeds():
    torch.manual_seed(0)
    m = SparseEmbeddings(_cfg())
    kjt = _kjt()
    out = m(kjt)
    assert sorted(out) == ["item_id", "user_id"]
    w_item = m.ec.embeddings["item"].weight.detach()
    w_user = m.ec.embeddings["user"].weight.detach()
    ids = kjt["item_id"].values()
    want = sum(w_item[hash_ids(ids, feature_seed("item_id", j), 97)] for j in range(3))
    torch.testing.assert_close(out["item_id"].values(), want)
    assert torch.equal(out["item_id"].lengths(), torch.tensor([3, 2, 2]))
    uids = kjt["user_id"].values()
    torch.testing.assert_close(
        out["user_id"].values(), w_user[hash_ids(uids, feature_seed("user_id", 0), 31)]
    )
    assert torch.equal(out["user_id"].offsets(), torch.tensor([0, 1, 1, 2]))
    # the same raw id under another feature of the unified table lands elsewhere
    brand = m(KeyedJaggedTensor(keys=["brand"], values=ids, lengths=torch.tensor([7])))["brand"]
    assert not torch.allclose(brand.values(), want)


def test_hash_features_emits_every_key_with_zero_lengths_for_missing():
    m = SparseEmbeddings(_cfg())
    rows = m.hash_features(_kjt())
    assert rows.keys() == [
        "item_id#0",
        "item_id#1",
        "item_id#2",
        "brand#0",
        "brand#1",
        "brand#2",
        "user_id",
    ]
    assert rows.stride() == 3
    assert rows["brand#1"].lengths().tolist() == [0, 0, 0]
    assert (
        rows["item_id#2"].values().tolist()
        == hash_ids(_kjt()["item_id"].values(), feature_seed("item_id", 2), 97).tolist()
    )
    assert int(rows.values().max()) < 97 and int(rows.values().min()) >= 0
    assert m.feature_dim("brand") == 8


def test_gradients_flow_to_every_hashed_row():
    m = SparseEmbeddings(_cfg())
    out = m(_kjt())
    (out["item_id"].values().sum() + out["user_id"].values().sum()).backward()
    grad = m.ec.embeddings["item"].weight.grad
    rows = m.hash_features(_kjt())
    used = torch.cat([rows[f"item_id#{j}"].values() for j in range(3)]).unique()
    assert torch.equal(grad.abs().sum(1).nonzero().flatten(), used)


def test_managed_collision_table_unsharded():
    m = SparseEmbeddings(_cfg(mc=True))
    m.train()
    kjt = KeyedJaggedTensor(
        keys=["category", "item_id"],
        values=torch.tensor([5, 5, 9, 123456789, 1, 2]),
        lengths=torch.tensor([2, 2, 1, 1]),
    )
    out = m(kjt)
    assert out["category"].values().shape == (4, 8)
    assert torch.equal(out["category"].lengths(), torch.tensor([2, 2]))
    # the same raw id maps to the same managed row: identical embeddings
    torch.testing.assert_close(out["category"].values()[0], out["category"].values()[1])


def test_meta_device_and_validation():
    m = SparseEmbeddings(_cfg(mc=True), device=torch.device("meta"))
    assert m.ec.embeddings["item"].weight.is_meta
    bad = EmbeddingsConfig(
        tables=[TableConfig(name="a", features=["x"]), TableConfig(name="b", features=["x"])]
    )
    with pytest.raises(ValueError, match="feature 'x' is already embedded by table 'a'"):
        SparseEmbeddings(bad)
    with pytest.raises(ValueError, match="same dim"):
        SparseEmbeddings(
            EmbeddingsConfig(
                tables=[
                    TableConfig(name="a", dim=8, features=["x"]),
                    TableConfig(name="b", dim=16, features=["y"]),
                ]
            )
        )
    with pytest.raises(ValueError, match="hash_version"):
        SparseEmbeddings(EmbeddingsConfig(hash_version=9))
    with pytest.raises(KeyError, match="nope"):
        SparseEmbeddings(_cfg()).feature_dim("nope")


def test_replicated_tables_match_the_collection_path():
    """data_parallel tables: plain modules outside `ec`, same rows, sums, init and grads."""
    from genrec.config import Config
    from genrec.sharding_plans.strategies import replicated_tables

    cfg = Config()
    cfg.embeddings = _cfg(mc=True)
    cfg.sharding.overrides = {"item": "data_parallel"}
    assert replicated_tables(cfg) == ["item"]
    torch.manual_seed(0)
    ec_only = SparseEmbeddings(cfg.embeddings)
    mixed = SparseEmbeddings.from_config(cfg)
    assert sorted(mixed.ec.embeddings) == ["user"] and list(mixed.replicated) == ["item"]
    assert "replicated.item.weight" in mixed.state_dict()
    with torch.no_grad():
        mixed.table_weight("item").copy_(ec_only.table_weight("item"))
        mixed.table_weight("user").copy_(ec_only.table_weight("user"))
        mixed.mc_ec.load_state_dict(ec_only.mc_ec.state_dict())
    # the row KJT keeps every key (export compares it with numpy hashing)
    assert sorted(mixed.hash_features(_kjt()).keys()) == sorted(
        ec_only.hash_features(_kjt()).keys()
    )
    kjt = KeyedJaggedTensor(
        keys=["user_id", "item_id", "category", "brand"],
        values=torch.tensor([10**15, 5, 6, 7, 8, 9, 11, -3, 1, 2, 3, 4, 5, 6]),
        lengths=torch.tensor([1, 0, 1, 3, 2, 2, 0, 1, 2, 1, 0, 1]),
    )
    mixed.eval()  # no MCH eviction: both MC modules stay identical
    ec_only.eval()
    calls = []
    mixed.replicated["item"].register_forward_hook(lambda m, args, out: calls.append(out.shape))
    got, want = mixed(kjt), ec_only(kjt)
    # one lookup (so one dense gradient) for the table's 6 keys: 2 features x 3 hashes
    n_ids = int(kjt["item_id"].lengths().sum() + kjt["brand"].lengths().sum())
    assert calls == [torch.Size([3 * n_ids, 8])]
    assert sorted(got) == sorted(want) == ["brand", "category", "item_id", "user_id"]
    for f in want:
        assert torch.equal(got[f].values(), want[f].values()), f
        assert torch.equal(got[f].offsets(), want[f].offsets()), f
    sum(v.values().sum() * (i + 1) for i, v in enumerate(got.values())).backward()
    sum(v.values().sum() * (i + 1) for i, v in enumerate(want.values())).backward()
    torch.testing.assert_close(
        mixed.table_weight("item").grad, ec_only.table_weight("item").grad, rtol=0, atol=1e-6
    )
    # meta -> real as DMP does it: reset_parameters draws the EC path's uniform bound
    meta = SparseEmbeddings.from_config(cfg, device=torch.device("meta"))
    table = meta.replicated["item"]
    table.weight = torch.nn.Parameter(torch.empty_like(table.weight, device="cpu"))
    table.reset_parameters()
    w = table.weight.detach()
    bound = (3.0 / 8) ** 0.5 / 3**0.5
    assert float(w.abs().max()) <= bound and float(w.std()) > bound / 3
    cfg.sharding.overrides = {"cat": "data_parallel"}
    with pytest.raises(ValueError, match="managed_collision tables shard row_wise only"):
        replicated_tables(cfg)


@pytest.mark.parametrize("replicated", [False, True])
@pytest.mark.parametrize("init_std", [0.0, 0.02])
def test_init_std_is_the_std_of_an_ids_summed_rows(replicated, init_std):
    """An id's embedding (the sum of its k rows) starts with per-coordinate std init_std
    (default 1/sqrt(dim)), in the EC and in the replicated path alike."""
    from genrec.config import Config

    cfg = Config()
    cfg.embeddings = EmbeddingsConfig(
        tables=[
            TableConfig(
                name="item",
                num_embeddings=4096,
                dim=64,
                features=["item_id"],
                num_hashes=2,
                init_std=init_std,
            )
        ]
    )
    cfg.sharding.overrides = {"item": "data_parallel"} if replicated else {}
    torch.manual_seed(0)
    emb = SparseEmbeddings.from_config(cfg)
    ids = torch.arange(20_000)
    kjt = KeyedJaggedTensor(keys=["item_id"], values=ids, lengths=torch.tensor([ids.numel()]))
    with torch.no_grad():
        vecs = emb(kjt)["item_id"].values()
    want = init_std or 64**-0.5
    assert abs(float(vecs.std()) / want - 1) < 0.03, (float(vecs.std()), want)
    cfg.embeddings.tables[0].init_std = -1.0
    with pytest.raises(ValueError, match="init_std=-1.0 must be >= 0"):
        SparseEmbeddings.from_config(cfg)


@pytest.mark.parametrize("replicated", [False, True])
def test_direct_table_rows_are_the_raw_ids(replicated):
    """kind=direct: id i reads row i (no hashing, no collisions), in the EC and the
    replicated path; an id without a row fails naming the feature, the id and the table."""
    from genrec.config import Config

    cfg = Config()
    cfg.embeddings = EmbeddingsConfig(
        tables=[
            TableConfig(name="item", num_embeddings=12, dim=8, features=["item_id"], kind="direct"),
            TableConfig(name="user", num_embeddings=31, dim=8, features=["user_id"]),
        ]
    )
    if replicated:
        cfg.sharding.overrides = {"item": "data_parallel"}
    m = SparseEmbeddings.from_config(cfg)
    assert ("item" in m.replicated) == replicated
    ids = torch.tensor([11, 0, 3, 3, 7])
    kjt = KeyedJaggedTensor(
        keys=["item_id", "user_id"],
        values=torch.cat([ids, torch.tensor([10**15, 4])]),
        lengths=torch.tensor([2, 3, 1, 1]),
    )
    assert m.hash_features(kjt)["item_id"].values().tolist() == ids.tolist()
    out = m(kjt)["item_id"].values()
    w = m.table_weight("item")
    assert torch.equal(out, w.detach()[ids])
    out.sum().backward()  # row 3 twice, every other row of ids once, the rest untouched
    counts = torch.zeros(12)
    counts.index_add_(0, ids, torch.ones(5))
    torch.testing.assert_close(w.grad.sum(dim=1), counts * 8)
    for bad in (12, -1):
        jt = KeyedJaggedTensor(
            keys=["item_id"], values=torch.tensor([1, bad, 2]), lengths=torch.tensor([3])
        )
        with pytest.raises(
            ValueError,
            match=rf"feature 'item_id': raw id {bad} .*table 'item'"
            r"'s rows \[0, 12\)",
        ):
            m(jt)
    with pytest.raises(ValueError, match="direct tables take num_hashes: 1"):
        SparseEmbeddings(
            EmbeddingsConfig(
                tables=[TableConfig(name="item", features=["item_id"], kind="direct", num_hashes=2)]
            )
        )


def _vocab_cfg(prepared_dir, num_embeddings: int):
    from genrec.config import Config

    cfg = Config()
    cfg.data.prepared_dir = str(prepared_dir)
    cfg.embeddings = EmbeddingsConfig(
        tables=[
            TableConfig(
                name="item",
                num_embeddings=num_embeddings,
                dim=8,
                features=["item_id"],
                kind="vocab",
            ),  # fmt: skip
            TableConfig(name="user", num_embeddings=31, dim=8, features=["user_id"]),
        ]
    )
    return cfg


def _from_prepared(cfg) -> SparseEmbeddings:
    """As trainer assembly builds them: the vocabularies read from data.prepared_dir."""
    from genrec.data_pipeline.model_inputs import read_model_inputs

    return SparseEmbeddings.from_config(cfg, vocabularies=read_model_inputs(cfg).vocabularies)


@pytest.mark.parametrize("replicated", [False, True])
def test_vocab_table_maps_ids_through_the_prepared_vocabulary(tmp_path, replicated):
    """kind=vocab: seen ids read their own vocabulary row, rare and unseen ids the hashed
    overflow rows of the numpy mapping, in the EC and the replicated path; num_embeddings
    must equal the file's rows, and a missing file fails naming it and the fix."""
    import numpy as np

    from genrec.data_pipeline.vocabulary import Vocabulary

    vocab = Vocabulary.from_counts(
        np.array([7, 10**12, 3, 42, 5]), np.array([9, 4, 4, 1, 2]), min_count=2,
        overflow_rows=3,
    )  # fmt: skip
    vocab.write(tmp_path)
    cfg = _vocab_cfg(tmp_path, vocab.num_rows)
    if replicated:
        cfg.sharding.overrides = {"item": "data_parallel"}
    m = _from_prepared(cfg)
    assert ("item" in m.replicated) == replicated
    ids = torch.tensor([7, 3, 10**12, 5, 42, 123456789, -4, 7])  # seen, rare (42), unseen
    kjt = KeyedJaggedTensor(
        keys=["item_id", "user_id"],
        values=torch.cat([ids, torch.tensor([10**15, 4])]),
        lengths=torch.tensor([5, 3, 1, 1]),
    )
    rows = m.hash_features(kjt)["item_id"].values()
    assert rows[:4].tolist() == [0, 1, 2, 3]  # by count, ties by smaller id
    assert rows.tolist() == vocab.rows(ids.numpy()).tolist()
    assert (rows[4:7] >= 4).all() and (rows < vocab.num_rows).all()
    out = m(kjt)["item_id"].values()
    w = m.table_weight("item")
    assert w.shape[0] == vocab.num_rows
    assert torch.equal(out, w.detach()[rows])
    # weights trained under another vocabulary of the same size: refused at the first lookup
    sd = m.state_dict()
    assert torch.equal(sd["vocab_digest_item_id"], torch.from_numpy(vocab.digest()))
    other = Vocabulary.from_counts(np.array([8, 3, 2, 5]), np.array([9, 4, 4, 2]), 1, 3)
    assert other.num_rows == vocab.num_rows
    sd["vocab_digest_item_id"] = torch.from_numpy(other.digest())
    fresh = _from_prepared(cfg)
    fresh.load_state_dict(sd)
    with pytest.raises(
        ValueError,
        match=r"item_id.parquet: this vocabulary of 'item_id' is not "
        r"the one the checkpoint's rows were trained under",
    ):
        fresh(kjt)
    cfg.embeddings.tables[0].num_embeddings = 100
    with pytest.raises(
        ValueError,
        match=r"item_id.parquet: the vocabulary has 7 rows \(4 ids \+ 3 overflow\) but table "
        r"'item' \(kind: vocab\) has num_embeddings 100: set num_embeddings: 7",
    ):
        _from_prepared(cfg)
    cfg.data.prepared_dir = str(tmp_path / "elsewhere")
    with pytest.raises(
        FileNotFoundError,
        match=r"elsewhere/vocab/item_id.parquet is missing: "
        r"table 'item' is kind: vocab; build the file with `genrec prepare",
    ):
        _from_prepared(cfg)
    with pytest.raises(ValueError, match="kind: vocab but no vocabulary of feature 'item_id'"):
        SparseEmbeddings(cfg.embeddings)
    cfg.data.prepared_dir = str(tmp_path)
    cfg.embeddings.tables[0].num_embeddings = vocab.num_rows
    cfg.embeddings.tables[0].features = ["item_id", "brand_id"]
    with pytest.raises(ValueError, match="a kind: vocab table embeds exactly one feature"):
        _from_prepared(cfg)
