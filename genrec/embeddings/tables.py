"""Embedding tables from config: hashed, direct, unified and managed-collision tables.

`SparseEmbeddings` is the one module the model and trainer use. It turns a KJT of RAW ids
into table rows on the local rank (`hash_features`), then looks the rows up in TorchRec
collections that DistributedModelParallel may replace by sharded ones:

- hashed tables: feature f goes through k seeded hashes into a fixed-size table and its
  embedding is the sum of the k rows (k=1: the hashing trick). Hash j of f is a feature
  of its own in the collection, named "f" (k=1) or "f#j".
- unified embeddings (Coleman et al., 2023): several features list the same table; each
  feature keeps its own seeds, so features share capacity but not collisions.
- direct tables (kind="direct"): the raw id is the row, one row per id and no collisions,
  for catalogs whose ids are dense integers in [0, num_embeddings). An id outside that
  range fails naming the feature, the id and the table (one host sync per step and feature
  for the check; an out-of-range row would otherwise read another table's memory or
  crash the device).
- managed collision (kind="managed_collision"): TorchRec's MCH module remaps raw ids to
  rows, keeping the most frequent ids (LFU eviction). Raw ids pass through unhashed.
- vocabulary tables (kind="vocab"): the feature's vocabulary file beside the prepared shards
  (PREPARED/vocab/FEATURE.parquet, see `genrec.data_pipeline.vocabulary`) maps each raw id
  to a row: frequent ids one row each, every other id (rare or never seen) a hashed
  overflow row. `num_embeddings` must equal the vocabulary's row count (checked when the
  module is built, naming the file). Export and serving map ids through the same file
  (its numpy twin); one vocab feature per table.

Hashed, direct and vocab tables live in `ec` (an EmbeddingCollection) and managed-collision
tables in `mc_ec` (a ManagedCollisionEmbeddingCollection); either is None when no table is
of its kind. Both are what DMP shards. Hashed or direct tables named in `replicated`
(their sharding strategy is data_parallel, see
`genrec.sharding_plans.strategies.replicated_tables`) are NOT in `ec`: they are plain
`ReplicatedTable` modules in `replicated`, which DMP's data-parallel wrapper (DDP)
replicates and whose gradients it averages across ranks; the trainer's dense optimizer
updates them. Same hashing, same k-row sum, same init bounds as
in `ec`, on every device (TorchRec's own DP sharding of an EmbeddingCollection needs the
dense kernel, whose CPU lookup pools sequence embeddings). All tables share one dim (an
EmbeddingCollection requirement); a smaller feature can live in its own table of that dim.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from genrec.config import Config, EmbeddingsConfig, TableConfig
from genrec.data_pipeline.vocabulary import Vocabulary, vocab_path
from genrec.embeddings.hashing import check_hash_version, feature_seed, hash_ids

MC_EVICTION_INTERVAL = 1  # MCH eviction every training step (in forward while training)


def hash_keys(feature: str, num_hashes: int) -> list[str]:
    """Collection feature names of `feature`'s k hashes."""
    return [feature] if num_hashes == 1 else [f"{feature}#{j}" for j in range(num_hashes)]


def _validate(cfg: EmbeddingsConfig) -> None:
    check_hash_version(cfg.hash_version)
    if not cfg.tables:
        raise ValueError("embeddings.tables is empty: configure at least one table")
    dims = {t.dim for t in cfg.tables}
    if len(dims) > 1:
        raise ValueError(
            "embeddings.tables: every table needs the same dim (a TorchRec EmbeddingCollection "
            f"returns sequence embeddings of one width), got dims {sorted(dims)}"
        )
    names: set[str] = set()
    seen: dict[str, str] = {}
    for i, t in enumerate(cfg.tables):
        where = f"embeddings.tables[{i}] ({t.name!r})"
        if t.name in names:
            raise ValueError(f"{where}: duplicate table name; table names must be unique")
        names.add(t.name)
        if t.num_embeddings <= 0 or t.dim <= 0 or t.dim % 4:
            raise ValueError(
                f"{where}: num_embeddings must be > 0 and dim a positive multiple of 4 "
                f"(FBGEMM kernels), got {t.num_embeddings} x {t.dim}"
            )
        if t.num_hashes < 1:
            raise ValueError(f"{where}: num_hashes must be >= 1, got {t.num_hashes}")
        if t.kind != "hashed" and t.num_hashes != 1:
            raise ValueError(f"{where}: {t.kind} tables take num_hashes: 1 (no hashing)")
        if not t.features:
            raise ValueError(f"{where}: features is empty; list the features it embeds")
        if t.kind == "vocab" and len(t.features) != 1:
            raise ValueError(
                f"{where}: a kind: vocab table embeds exactly one feature (its rows are that "
                f"feature's vocabulary), got {t.features}; give each feature its own table"
            )
        for f in t.features:
            if f in seen:
                raise ValueError(
                    f"{where}: feature {f!r} is already embedded by table {seen[f]!r}; "
                    "a feature belongs to exactly one table"
                )
            seen[f] = t.name


def _init_bound(t: TableConfig) -> float:
    """Uniform init bound: the sum of k rows has per-coordinate std `init_std`
    (default 1/sqrt(dim))."""
    if t.init_std < 0:
        raise ValueError(f"embeddings table {t.name!r}: init_std={t.init_std} must be >= 0")
    std = t.init_std or 1.0 / math.sqrt(t.dim)
    return std * math.sqrt(3.0 / t.num_hashes)


def _embedding_config(t: TableConfig) -> EmbeddingConfig:
    bound = _init_bound(t)
    keys = [k for f in t.features for k in hash_keys(f, t.num_hashes)]
    return EmbeddingConfig(
        name=t.name,
        embedding_dim=t.dim,
        num_embeddings=t.num_embeddings,
        feature_names=keys,
        weight_init_min=-bound,
        weight_init_max=bound,
    )


def check_direct_ids(ids: torch.Tensor, feature: str, t: TableConfig) -> None:
    """Fail naming the feature, the id and the table when a direct table has no row for
    an id (the raw id is the row)."""
    bad = (ids < 0) | (ids >= t.num_embeddings)
    if ids.numel() and bool(bad.any()):
        first = int(ids[bad][0])
        raise ValueError(
            f"feature {feature!r}: raw id {first} (and {int(bad.sum()) - 1} more in this batch) "
            f"is outside table {t.name!r}'s rows [0, {t.num_embeddings}): a kind: direct table "
            "maps each id to its own row; raise num_embeddings above the largest id, re-map "
            "the ids to a dense range, or use kind: hashed"
        )


def check_vocab_rows(vocab: Vocabulary, t: TableConfig, path) -> None:
    """A vocab table's rows ARE its vocabulary's rows: fail naming the file and the fix."""
    if vocab.num_rows != t.num_embeddings:
        raise ValueError(
            f"{path}: the vocabulary has {vocab.num_rows} rows ({vocab.ids.size} ids + "
            f"{vocab.overflow_rows} overflow) but table {t.name!r} (kind: vocab) has "
            f"num_embeddings {t.num_embeddings}: set num_embeddings: {vocab.num_rows} for that "
            "table (`genrec plan` prints it), or point data.prepared_dir at the prepared data "
            "whose vocabulary this model was configured for"
        )


def load_vocabularies(cfg: EmbeddingsConfig, prepared_dir: str) -> dict[str, Vocabulary]:
    """{feature: vocabulary} of every kind: vocab table, read from `prepared_dir` and checked
    against the table's num_embeddings (empty without vocab tables: no file is read)."""
    _validate(cfg)
    out: dict[str, Vocabulary] = {}
    for t in cfg.tables:
        if t.kind != "vocab":
            continue
        for f in t.features:
            out[f] = read_vocabulary(prepared_dir, t, f)
            check_vocab_rows(out[f], t, vocab_path(prepared_dir, f))
    return out


def read_vocabulary(prepared_dir: str, t: TableConfig, feature: str) -> Vocabulary:
    """The vocabulary file of `feature` of vocab table `t`; a missing one fails naming it."""
    fix = (
        f"table {t.name!r} is kind: vocab; build the file with `genrec prepare ... "
        "--vocab-min-count N`, point data.prepared_dir at the prepared data that has "
        "it, or use kind: hashed"
    )
    return Vocabulary.read(prepared_dir, feature, fix=fix)


def vocab_digest_name(feature: str) -> str:
    return f"vocab_digest_{feature}"


class ReplicatedTable(torch.nn.Module):
    """A data-parallel table: one full fp32 weight per rank, dense gradients (DDP averages).

    `reset_parameters` draws the same uniform init as the EC path, also when DMP
    materializes a meta-device model (it calls reset_parameters on modules it allocates).
    """

    def __init__(self, t: TableConfig, device: torch.device) -> None:
        super().__init__()
        self.bound = _init_bound(t)
        self.weight = torch.nn.Parameter(torch.empty(t.num_embeddings, t.dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            with torch.no_grad():
                self.weight.uniform_(-self.bound, self.bound)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return F.embedding(rows, self.weight)


class SparseEmbeddings(torch.nn.Module):
    """Raw-id KJT -> per-feature jagged embeddings over hashed/direct/unified/MC tables."""

    def __init__(
        self,
        cfg: EmbeddingsConfig,
        device: torch.device | None = None,
        mc_buckets: int | None = None,
        replicated: list[str] | tuple[str, ...] = (),
        vocabularies: dict[str, Vocabulary] | None = None,
    ) -> None:
        """`mc_buckets`: buckets of MCH tables, a multiple of the world size for row-wise
        sharding (None: the process group's world size, 1 without one). `replicated`:
        hashed/direct tables held as data-parallel `ReplicatedTable`s instead of in `ec`
        (use `from_config`, which reads them from the sharding config). `vocabularies`:
        {feature: Vocabulary} of the kind: vocab tables (`from_config` reads them from
        data.prepared_dir)."""
        super().__init__()
        if mc_buckets is None:
            mc_buckets = dist.get_world_size() if dist.is_initialized() else 1
        _validate(cfg)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.cfg = cfg
        self._table_of: dict[str, TableConfig] = {f: t for t in cfg.tables for f in t.features}
        by_name = {t.name: t for t in cfg.tables}
        for name in replicated:
            if name not in by_name or by_name[name].kind == "managed_collision":
                raise ValueError(
                    f"replicated (data_parallel) table {name!r}: not a hashed, direct or vocab table "
                    f"of embeddings.tables ({sorted(by_name)}); managed_collision tables shard "
                    "row_wise only"
                )
        ec_tables = [
            t for t in cfg.tables if t.kind != "managed_collision" and t.name not in replicated
        ]
        dp = [t for t in cfg.tables if t.name in replicated]
        managed = [t for t in cfg.tables if t.kind == "managed_collision"]
        # row-KJT key order: EC tables' keys, replicated tables' keys, managed tables' keys
        self._ec_keys = [
            k for t in ec_tables for f in t.features for k in hash_keys(f, t.num_hashes)
        ]
        self._dp_keys = [k for t in dp for f in t.features for k in hash_keys(f, t.num_hashes)]
        self._mc_keys = [f for t in managed for f in t.features]
        self._seeds = {
            k: feature_seed(f, j, cfg.hash_version)
            for t in ec_tables + dp
            if t.kind == "hashed"
            for f in t.features
            for j, k in enumerate(hash_keys(f, t.num_hashes))
        }
        self._direct = {f for t in ec_tables + dp if t.kind == "direct" for f in t.features}
        self._vocab: dict[str, Vocabulary] = {}
        for t in cfg.tables:
            for f in t.features if t.kind == "vocab" else ():
                if f not in (vocabularies or {}):
                    raise ValueError(
                        f"table {t.name!r} is kind: vocab but no vocabulary of feature {f!r} "
                        "was given; pass the vocabularies read by data_pipeline.model_inputs."
                        "read_model_inputs (PREPARED/vocab/FEATURE.parquet)"
                    )
                check_vocab_rows(vocabularies[f], t, vocabularies[f].source or repr(f))
                self._vocab[f] = vocabularies[f]
                # the checkpoint records which vocabulary the rows were trained under
                self.register_buffer(
                    vocab_digest_name(f), torch.from_numpy(self._vocab[f].digest())
                )
        self._vocab_checked = False
        self.replicated = torch.nn.ModuleDict({t.name: ReplicatedTable(t, device) for t in dp})
        self.ec: EmbeddingCollection | None = None
        self.mc_ec: ManagedCollisionEmbeddingCollection | None = None
        if ec_tables:
            self.ec = EmbeddingCollection(
                tables=[_embedding_config(t) for t in ec_tables], device=device
            )
        if managed:
            mc_tables = EmbeddingCollection(
                tables=[_embedding_config(t) for t in managed], device=device
            )
            modules = {
                t.name: MCHManagedCollisionModule(
                    zch_size=t.num_embeddings,
                    device=device,
                    eviction_policy=LFU_EvictionPolicy(),
                    eviction_interval=MC_EVICTION_INTERVAL,
                    buckets=mc_buckets,
                )
                for t in managed
            }
            mcc = ManagedCollisionCollection(modules, mc_tables.embedding_configs())
            self.mc_ec = ManagedCollisionEmbeddingCollection(mc_tables, mcc)

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        device: torch.device | None = None,
        vocabularies: dict[str, Vocabulary] | None = None,
    ) -> SparseEmbeddings:
        """The model's embeddings: data_parallel tables (sharding config) replicated; the
        kind: vocab tables' `vocabularies` as read by data_pipeline.model_inputs."""
        from genrec.sharding_plans.strategies import replicated_tables

        return cls(
            cfg.embeddings,
            device=device,
            replicated=replicated_tables(cfg),
            vocabularies=vocabularies,
        )

    def table_weight(self, name: str) -> torch.Tensor:
        """The full weight of a hashed/direct table of an UNSHARDED module (export, tests)."""
        if name in self.replicated:
            return self.replicated[name].weight
        if self.ec is not None and name in self.ec.embeddings:
            return self.ec.embeddings[name].weight
        raise KeyError(f"no hashed or direct table {name!r} (replicated or in ec)")

    @property
    def vocabularies(self) -> dict[str, Vocabulary]:
        """{feature: Vocabulary} of the kind: vocab tables (export copies their files)."""
        return dict(self._vocab)

    def check_vocabularies(self) -> None:
        """Fail naming the file when a vocab table's vocabulary is not the one its weights
        were trained under (the digest a loaded checkpoint put in the buffer differs)."""
        for f, vocab in self._vocab.items():
            recorded = getattr(self, vocab_digest_name(f))
            if recorded.is_meta:
                continue
            if not torch.equal(recorded.cpu(), torch.from_numpy(vocab.digest())):
                raise ValueError(
                    f"{vocab.source or f}: this vocabulary of {f!r} is not the one the "
                    "checkpoint's rows were trained under (its recorded digest differs): "
                    "point data.prepared_dir at the prepared data of that training run (or "
                    "restore its vocab/ file), or train anew on this vocabulary"
                )
        self._vocab_checked = True

    @property
    def features(self) -> list[str]:
        return list(self._table_of)

    def feature_dim(self, feature: str) -> int:
        if feature not in self._table_of:
            raise KeyError(f"feature {feature!r} is not in embeddings.tables ({self.features})")
        return self._table_of[feature].dim

    def hash_features(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Raw ids -> table rows, keyed by collection feature (all of them, in order).

        Configured features missing from `kjt` get zero lengths (sharded collections want
        every key); keys that no table embeds (e.g. "action") are not looked up.
        """
        if self._vocab and not self._vocab_checked:  # once, after any checkpoint load
            self.check_vocabularies()
        jts = kjt.to_dict()
        stride = kjt.stride()
        empty_lengths = torch.zeros(stride, dtype=torch.int32, device=kjt.values().device)
        values: list[torch.Tensor] = []
        lengths: list[torch.Tensor] = []
        keys = self._ec_keys + self._dp_keys + self._mc_keys
        for key in keys:
            feature = key.split("#", 1)[0]
            jt = jts.get(feature)
            if jt is None:
                lengths.append(empty_lengths)
                continue
            ids = jt.values()
            if key in self._seeds:
                ids = hash_ids(ids, self._seeds[key], self._table_of[feature].num_embeddings)
            elif feature in self._direct:
                check_direct_ids(ids, feature, self._table_of[feature])
            elif feature in self._vocab:
                ids = self._vocab[feature].rows_torch(ids)
            values.append(ids.to(torch.int64))
            lengths.append(jt.lengths().to(torch.int32))
        device = kjt.values().device
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.cat(values)
            if values
            else torch.zeros(0, dtype=torch.int64, device=device),
            lengths=torch.cat(lengths),
            stride=stride,
        )

    def _replicated_lookup(
        self, rows: KeyedJaggedTensor, keys: list[str]
    ) -> dict[str, torch.Tensor]:
        """Rows of every key of the replicated tables, ONE lookup per table.

        A table's keys (its features' k hashes) are looked up together: the backward then
        builds one dense [num_embeddings, dim] gradient per table and step instead of one
        per key plus their sum (the replicated path's cost grows with the table, not the
        batch: two hashes into 262k rows spent ~15 % of a SASRec step on the extra pass)."""
        ids = rows.to_dict()
        by_table: dict[str, list[str]] = {}
        for key in keys:
            by_table.setdefault(self._table_of[key.split("#", 1)[0]].name, []).append(key)
        out: dict[str, torch.Tensor] = {}
        for table, table_keys in by_table.items():
            values = [ids[key].values() for key in table_keys]
            emb = self.replicated[table](torch.cat(values))
            out.update(zip(table_keys, emb.split([v.numel() for v in values])))
        return out

    def row_groups(self, kjt: KeyedJaggedTensor) -> dict[str, KeyedJaggedTensor]:
        """Raw ids -> table rows split by where they are looked up: "ec" (the sharded
        collection), "dp" (replicated tables), "mc" (managed collision); present groups only.
        Host work (hashing, vocabulary, range checks): the trainer's batch preparation runs it
        before the device copy, so the sharded collections' inputs are batch attributes."""
        rows = self.hash_features(kjt)
        groups = [
            (name, keys)
            for name, keys in (("ec", self._ec_keys), ("dp", self._dp_keys), ("mc", self._mc_keys))
            if keys
        ]
        parts = rows.split([len(keys) for _, keys in groups]) if len(groups) > 1 else [rows]
        return {name: part for (name, _), part in zip(groups, parts)}

    def feature_values(
        self,
        features: list[str],
        groups: dict[str, KeyedJaggedTensor],
        ec_out: dict[str, JaggedTensor] | None,
        mc_out: dict[str, JaggedTensor] | None,
    ) -> dict[str, torch.Tensor]:
        """Each embedded feature's values [n_f, dim] (the sum of its k hashes' rows) from the
        collections' outputs and the replicated tables' rows in `groups["dp"]`."""
        looked_up: dict[str, torch.Tensor] = {}
        for out, keys in ((ec_out, self._ec_keys), (mc_out, self._mc_keys)):
            for key in keys if out is not None else ():
                looked_up[key] = out[key].values()
        if "dp" in groups:
            looked_up.update(self._replicated_lookup(groups["dp"], self._dp_keys))
        result: dict[str, torch.Tensor] = {}
        for feature in features:
            table = self._table_of.get(feature)
            if table is None:
                continue
            keys = hash_keys(feature, table.num_hashes)
            emb = looked_up[keys[0]]
            for key in keys[1:]:
                emb = emb + looked_up[key]
            result[feature] = emb
        return result

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        groups = self.row_groups(kjt)
        ec_out = self.ec(groups["ec"]) if "ec" in groups else None
        mc_out = self.mc_ec(groups["mc"])[0] if "mc" in groups else None
        values = self.feature_values(kjt.keys(), groups, ec_out, mc_out)
        return {
            f: JaggedTensor(values=v, lengths=kjt[f].lengths(), offsets=kjt[f].offsets())
            for f, v in values.items()
        }
