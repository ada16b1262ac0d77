"""Typed experiment config: a dataclass tree loaded from YAML, overridable by dotted args.

    cfg = load_config("quickstart", ["trainer.batch_size=64"])   # or a path to a YAML file

Unknown keys and values of the wrong type fail with a `ConfigError` that names the dotted
key and the expected type. The tree is plain data: nothing here imports torch or ray.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# --------------------------------------------------------------------------- sections


@dataclass
class ParquetColumnsConfig:
    """`data.source: parquet`: your own event log, one row per event, any column names.

    Files are `data.raw_dir`/`files` (a glob). Every column below names a column of the
    files; rows go through the same validation as the built-in sources (nulls, negative
    ids, unknown actions: an error naming file, column and row, or skipped and counted).
    """

    files: str = "*.parquet"  # glob under data.raw_dir ("**/*.parquet" for nested folders)
    user: str = "user_id"  # integer user id column
    item: str = "item_id"  # integer item id column
    # time column: a Parquet timestamp, or integers in `timestamp_unit`; empty: row order is
    # time (files in path order, rows in file order; every event lands in window 0)
    timestamp: str = ""
    timestamp_unit: Literal["s", "ms", "us", "ns"] = "s"
    # action column (empty: every event is `default_action`), its values mapped onto
    # genrec's actions (view, click, cart, order, like, share, skip, other); a value
    # missing from the map is a bad row
    action: str = ""
    action_values: dict[str, str] = field(default_factory=dict)
    default_action: str = "view"
    # context features carried into sequences: genrec context name -> your column
    # (domain, surface, category, brand, author, price, watch_time)
    context: dict[str, str] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where events come from and how they become sequence shards and batches."""

    source: Literal["tecd", "vk_lsvd", "yambda", "text", "recbole", "parquet"] = "tecd"
    parquet: ParquetColumnsConfig = field(default_factory=ParquetColumnsConfig)
    raw_dir: str = "data/raw"  # the source's own layout (genrec generate writes here)
    prepared_dir: str = "data/prepared"  # sequence shards, window=NNNNN/part-*.parquet
    window: str = "day"  # day | week | a number of seconds
    max_len: int = 50  # history events kept before each window's targets
    on_bad_rows: Literal["error", "skip"] = "error"
    # streaming
    # each rank reads its own row groups with pyarrow ("ray" was removed: README, Reading)
    reader: str = "local"
    windows: list[int] = field(default_factory=list)  # empty: every prepared window
    shuffle_buffer: int = 0  # rows shuffled inside a window (0: file order)
    prefetch_batches: int = 2
    read_threads: int = 2  # threads per rank decoding its row groups ahead of the step
    object_store_mb: int = 256
    num_cpus: int = 0  # Ray logical CPUs (0: this machine's count)
    ray_address: str = ""  # empty: start a local Ray bound to 127.0.0.1
    seed: int = 0
    # synthetic generation (genrec generate / quickstart)
    synthetic_users: int = 2000
    synthetic_events: int = 200_000
    synthetic_items: int = 5000

    def __post_init__(self):
        if self.reader == "ray":
            raise ConfigError(
                "data.reader: 'ray' was removed; set data.reader: local. Each rank now reads "
                "only its own row groups with pyarrow (README, 'Reading the stream')"
            )
        if self.reader != "local":
            raise ConfigError(f"data.reader: expected 'local', got {self.reader!r}")


@dataclass
class TableConfig:
    """One embedding table; several features may share it (unified embeddings)."""

    name: str = "item"
    num_embeddings: int = 100_000
    dim: int = 64
    features: list[str] = field(default_factory=lambda: ["item_id"])
    # hashed: k seeded hashes of the raw id, rows summed (any int64 id, fixed memory);
    # direct: the raw id IS the row, one row per id and no collisions, for catalogs whose
    # ids are dense integers below num_embeddings (an id outside fails naming it);
    # managed_collision: TorchRec's MCH remaps ids, keeping the most frequent;
    # vocab: rows from the feature's vocabulary file beside the prepared shards
    # (PREPARED/vocab/FEATURE.parquet, `genrec prepare --vocab-min-count N`): frequent ids
    # a row each, the rest hashed overflow rows; num_embeddings must equal its row count
    kind: Literal["hashed", "direct", "managed_collision", "vocab"] = "hashed"
    num_hashes: int = 1  # k seeded hash functions, rows summed (k=1: hashing trick)
    # per-coordinate std of an id's embedding (the sum of its k rows) at init; 0: 1/sqrt(dim).
    # Raw dot-product models want it small (SASRec's recipe: 0.02)
    init_std: float = 0.0


@dataclass
class FrequencyConfig:
    """Count-min sketch of item frequencies (logQ correction, popularity negatives)."""

    depth: int = 4
    width: int = 1 << 18
    conservative: bool = True
    decay: float = 1.0  # multiply counters by this per window (1.0: no decay)


@dataclass
class EmbeddingsConfig:
    tables: list[TableConfig] = field(default_factory=lambda: [TableConfig()])
    hash_version: int = 1
    frequency: FrequencyConfig = field(default_factory=FrequencyConfig)


@dataclass
class RetrievalConfig:
    num_negatives: int = 256
    # fractions of the negatives drawn from each source (in-batch come free on top)
    in_batch: bool = True
    uniform_fraction: float = 0.5
    popularity_fraction: float = 0.5
    logq_correction: bool = True
    temperature: float = 0.05
    full_softmax: bool = False  # exact softmax over the catalog (small catalogs only)
    # softmax: the above; bce: SASRec's original objective, binary cross-entropy on each
    # position's target and one sampled negative (see bce_negatives)
    loss: Literal["softmax", "bce"] = "softmax"
    # bce's negatives. per_position: every target position draws its own (SASRec's);
    # pool: num_negatives per step, each position picks one of them. Under Adam an item's
    # row moves about as far per push as it is pushed often, and a 512 pool pushes each item
    # down ~2.5x less often per epoch: SASRec on Sports trained markedly slower with it
    # (benchmarks/RESULTS.md)
    bce_negatives: Literal["per_position", "pool"] = "per_position"
    # cosine: L2-normalized states and items (HSTU's); dot: raw inner products (SASRec's).
    # Training, evaluation and the exported program all score the same way.
    similarity: Literal["cosine", "dot"] = "cosine"
    top_k_block: int = 65536  # catalog rows scored per block in top-K
    exclude_history: bool = True


@dataclass
class RankingConfig:
    tasks: list[str] = field(default_factory=lambda: ["click", "cart", "order"])
    task_weights: list[float] = field(default_factory=list)  # empty: all 1.0
    regression_tasks: list[str] = field(default_factory=list)  # MSE instead of BCE
    # true (token_mode interleave only): every target event is predicted at its own item
    # token, causally, seeing all events before it with their actions (HSTU's ranking
    # setting); false: candidates sit after the history and never see each other
    causal: bool = False


@dataclass
class GenerativeConfig:
    """`model.task: generative`: the next item's semantic ID (genrec tokenize's codes),
    decoded level by level after the HSTU encoder (genrec/models/generative.py)."""

    # codes.parquet of `genrec tokenize`; empty: data.prepared_dir/semantic/codes.parquet
    codes: str = ""
    decoder_layers: int = 2  # causal transformer layers over [user state, code prefix]
    decoder_heads: int = 2
    decoder_dropout: float = 0.1  # the decoder's own (the encoder's is model.dropout)
    # true: each level's softmax runs over the codes that continue the prefix to a real item
    # (the trie's children), in training and in beam search, so the loss is the item's NLL
    # under constrained decoding; false: over the level's whole codebook (TIGER's)
    constrained: bool = False
    # > 0: a level's logits are cosines of the decoder's output and the code's output
    # vector divided by this (as the retriever scores items); 0: a plain linear head
    temperature: float = 0.0
    # add the item's own embedding (a table fed by item_id) to its code-token embeddings
    item_embedding: bool = True
    beam_width: int = 20  # constrained beam search: beams kept per user and level
    top_k: int = 20  # items a beam search returns (<= beam_width); evaluation needs >= 10
    exclude_history: bool = True  # drop the user's own history from the beam's items

    def __post_init__(self):
        if not 1 <= self.top_k <= self.beam_width:
            raise ConfigError(
                f"model.generative.top_k={self.top_k}: expected 1 <= top_k <= beam_width "
                f"({self.beam_width})"
            )
        if self.decoder_layers < 1 or self.decoder_heads < 1:
            raise ConfigError("model.generative.decoder_layers and decoder_heads must be >= 1")


@dataclass
class ModelConfig:
    kind: Literal["hstu", "sasrec"] = "hstu"
    # generative: semantic-ID generation with constrained beam search (model.generative)
    task: Literal["retrieval", "ranking", "generative"] = "retrieval"
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    attn_dim: int = 32  # per-head query/key dim
    linear_dim: int = 32  # per-head value/gate dim
    dropout: float = 0.2
    attn_dropout: float = 0.0
    max_len: int = 50  # longest sequence the encoder sees (history + targets)
    rab_position: bool = True
    rab_time: bool = True
    num_time_buckets: int = 64
    # std of the action embedding at init (1.0: PyTorch's default). With one action (Amazon)
    # it is a constant added to every item token: at 1.0 it dwarfs items that start small
    action_init_std: float = 1.0
    # false: no action signal in the tokens (the action embedding is held at zero, frozen).
    # For logs with one action (Amazon reviews) the embedding is a learnable constant on
    # every item token (SASRec's recipe on Sports: ~4 % lower validation at epoch 9 with it,
    # benchmarks/RESULTS.md).
    # sum token_mode only (in interleave mode the action token is the state token)
    use_actions: bool = True
    # n in A = SiLU(QK^T + rab) / n; "constant" (= max tokens) keeps states strictly causal
    attn_norm: Literal["length", "constant"] = "constant"
    token_mode: Literal["sum", "interleave"] = "sum"  # item+action tokens
    # model.kind=sasrec only. pre_ln: the SASRec paper's block (pre-LayerNorm, ReLU
    # feed-forward of width dim); post_ln: the S3-Rec code's BERT block behind the published
    # Amazon rows (post-LayerNorm, GELU feed-forward of width 4 dim, LayerNorm on item +
    # position)
    sasrec_block: Literal["pre_ln", "post_ln"] = "pre_ln"
    # dropout on the feed-forward's hidden units. auto: the block's own (pre_ln: on, as the
    # SASRec paper; post_ln: off, as the S3-Rec code)
    sasrec_ffn_dropout: Literal["auto", "on", "off"] = "auto"
    # learned absolute positions. from_start: 0 at a sequence's first event; from_end: the
    # slots of a left-padded max_len row, as SASRec's and the S3-Rec code's (the newest event
    # read sits in the last slot, whatever the length; ~9 % better validation at epoch 9 in
    # SASRec's recipe on Sports, benchmarks/RESULTS.md). from_end is for retrieval
    sasrec_positions: Literal["from_start", "from_end"] = "from_start"
    num_actions: int = 8
    user_feature_tokens: list[str] = field(default_factory=list)  # contextual tokens
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    generative: GenerativeConfig = field(default_factory=GenerativeConfig)


@dataclass
class TopologyConfig:
    world_size: int = 2
    device: Literal["cpu", "cuda"] = "cpu"
    hosts: int = 1
    hbm_gb: float = 4.0  # memory per device the planner may use
    ddr_gb: float = 16.0  # host memory per host (UVM / UVM-caching)


@dataclass
class ShardingConfig:
    strategy: Literal[
        "auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"
    ] = "row_wise"
    overrides: dict[str, str] = field(default_factory=dict)  # table -> strategy
    compute_kernel: str = "fused"  # fused | fused_uvm | fused_uvm_caching | dense
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    plan_file: str = ""  # load this saved plan instead of planning


@dataclass
class TrainerConfig:
    mode: Literal["stream", "epochs"] = "stream"
    launcher: Literal["local", "torchrun", "ray"] = "local"
    world_size: int = 2
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    batch_size: int = 128  # sequences per rank per step
    lr: float = 1e-3  # dense AdamW
    weight_decay: float = 0.0
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    sparse_lr: float = 0.05
    # both learning rates ramp linearly from lr/warmup_steps to lr over the first steps
    # (row-wise Adagrad's first step moves every touched row by ~sparse_lr per coordinate)
    warmup_steps: int = 0
    grad_clip: float = 1.0
    bf16: bool = True  # autocast on GPU only
    # TorchRec's TrainPipelineSparseDist (trainer/pipeline.py): the next batch's input dist
    # overlaps this step's compute; steps that progressive eval scores run plain (none: all)
    pipeline: Literal["none", "sparse_dist"] = "sparse_dist"
    seed: int = 0
    run_dir: str = "runs/default"
    eval_batches: int = 0  # progressive eval batches per window (0: the whole window)
    epochs: int = 1
    patience: int = 3  # validations (not epochs) without improvement before stopping
    eval_every: int = 1  # epochs mode: validate after every N-th epoch (and the last)
    checkpoint_every: int = 0  # steps (0: only at window ends)
    # stage model + optimizer into host memory and write them in the background (DCP
    # async_save); the step stalls only for the copy
    async_checkpoint: bool = True
    keep_last: int = 2
    max_steps: int = 0  # stop after this many steps (0: until the stream ends)
    log_every: int = 10
    ray_workers_cpus: float = 0.5  # CPUs each Ray Train worker reserves
    max_failures: int = 1
    # keep freed large host blocks mapped (glibc mallopt; genrec.trainer.host_memory): a
    # replicated table's dense gradient is reallocated every step and page-faulted afresh
    # otherwise (half the CPU time of the SASRec Sports recipe). Costs the peak heap staying mapped
    reuse_freed_host_memory: bool = True
    # warm start: a checkpoint directory whose model weights this run starts from (optimizer,
    # step and stream position start fresh; ignored when resuming this run's own checkpoint)
    init_from: str = ""


@dataclass
class DeployConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_history: int = 512
    max_k: int = 1000
    max_body_bytes: int = 1 << 20
    exact_search_below: int = 200_000  # items; above it an ANN index is built
    index: Literal["hnsw", "ivf"] = "hnsw"


@dataclass
class RQVAEConfig:
    """`semantic.method: rqvae`: TIGER's RQ-VAE (genrec/semantic/tokenizers.py)."""

    hidden_dim: int = 256
    latent_dim: int = 32
    epochs: int = 50
    batch_size: int = 1024
    lr: float = 1e-3
    beta: float = 0.25  # commitment loss weight
    # share of items trained on a random prefix of the levels (progressive masking; 0: off)
    mask_prob: float = 0.0


@dataclass
class SemanticConfig:
    """`genrec tokenize`: item vectors -> semantic-ID codes (README, Semantic IDs)."""

    # item vectors: Amazon's *_item2attributes.json and/or an exported retriever artifact
    # (its item table); both set: concatenated per item
    attributes: str = ""
    attribute_dim: int = 64  # random projection of the multi-hot attributes (0: raw)
    artifact: str = ""
    method: Literal["residual_kmeans", "rqvae"] = "residual_kmeans"
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256])
    balanced: bool = False  # residual_kmeans: OneRec's equal-size clusters
    kmeans_iters: int = 20  # residual_kmeans, and rqvae's codebook init
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    seed: int = 0
    out_dir: str = ""  # codes.parquet + stats.json; empty: data.prepared_dir/semantic

    def __post_init__(self):
        if not self.codebook_sizes or min(self.codebook_sizes) < 2:
            raise ConfigError(
                f"semantic.codebook_sizes: expected one size >= 2 per level, got "
                f"{self.codebook_sizes}"
            )
        if self.balanced and self.method != "residual_kmeans":
            raise ConfigError("semantic.balanced applies to method residual_kmeans only")
        if not 0.0 <= self.rqvae.mask_prob <= 1.0:
            raise ConfigError(
                f"semantic.rqvae.mask_prob: expected [0, 1], got {self.rqvae.mask_prob}"
            )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)

    def table(self, name: str) -> TableConfig:
        for t in self.embeddings.tables:
            if t.name == name:
                return t
        raise ConfigError(f"embeddings.tables has no table named {name!r}")


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`, converting what YAML/CLI gives us."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(
                f"unknown config key {key!r}; {cls.__name__} has: {', '.join(sorted(names))}"
            )
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def check_parquet_columns(cols: ParquetColumnsConfig) -> None:
    """Cross-field checks of `data.parquet` (names against genrec's actions and contexts)."""
    from genrec.data_pipeline.schemas import ACTIONS, CONTEXT_FIELDS

    if not cols.user or not cols.item:
        raise ConfigError("data.parquet.user and data.parquet.item must name columns")
    for key, name in [("default_action", cols.default_action)] + [
        (f"action_values.{v}", a) for v, a in cols.action_values.items()
    ]:
        if name not in ACTIONS:
            raise ConfigError(f"data.parquet.{key}: {name!r} is not one of {list(ACTIONS)}")
    if cols.action_values and not cols.action:
        raise ConfigError("data.parquet.action_values is set but data.parquet.action is empty")
    for name in cols.context:
        if name not in CONTEXT_FIELDS:
            known = list(CONTEXT_FIELDS)
            raise ConfigError(f"data.parquet.context.{name}: not a context feature; one of {known}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    return _build(Config, data or {})


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML) onto a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node: Any = data
        cls: Any = Config
        for i, part in enumerate(parts):
            key = ".".join(parts[: i + 1])
            hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
            if dataclasses.is_dataclass(cls) and part not in hints:
                raise ConfigError(
                    f"unknown config key {key!r}; {cls.__name__} has: {', '.join(sorted(hints))}"
                )
            if i == len(parts) - 1:
                node[part] = _parse_scalar(raw)
            else:
                cls = hints.get(part)
                if not dataclasses.is_dataclass(cls) and get_origin(cls) is not dict:
                    raise ConfigError(f"config key {key!r} is not a section")
                node = node.setdefault(part, {})
                if get_origin(cls) is dict:
                    node[parts[i + 1]] = _parse_scalar(raw) if i + 2 == len(parts) else {}
                    if i + 2 != len(parts):
                        raise ConfigError(f"config key {dotted!r} nests too deep")
                    break
    return data


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # package data


def shipped_configs() -> list[str]:
    """Names of the configs inside the package (`genrec train tecd`)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: an existing path, else a shipped config's name (`tecd`, `tecd.yaml`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.parent == Path("."):  # a bare name: look among the package's configs
        shipped = SHIPPED_CONFIGS / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
        if shipped.is_file():
            return shipped
    raise ConfigError(
        f"config file {str(p)!r} does not exist. Fix: give a path to a YAML file or the name "
        f"of a shipped config ({', '.join(shipped_configs())})"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """`path`: a YAML file or a shipped config's name (see `resolve_config`)."""
    data: dict = {}
    if path is not None:
        p = resolve_config(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides or []))
    try:
        cfg = from_dict(data)
        if cfg.data.source == "parquet":
            check_parquet_columns(cfg.data.parquet)
        check_features(cfg)
        return cfg
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


# --------------------------------------------------------------------------- cross-field checks

ITEM_FEATURE = "item_id"  # the feature every model embeds (data_pipeline.batch.ITEM_KEY)
# model.task=generative: every event's semantic-ID tokens (level l's code + the level's row
# offset), looked up from item_id by the model; not a column of the batches
SID_FEATURE = "sid"


def _not_in_source(key: str, feature: str, source: str, features: tuple[str, ...]) -> ConfigError:
    from genrec.data_pipeline.schemas import events_schema
    from genrec.data_pipeline.sources import get_source

    columns = events_schema(get_source(source).context).names
    name = source.split(":", 1)[0]  # `parquet:{mapping}` -> parquet
    return ConfigError(
        f"{key}: {feature!r} is not a feature of data.source {name!r}: its batches carry "
        f"{list(features)} (its event columns are {columns}; user_id, timestamp and float "
        "columns are not embedded features); name one of those or remove it"
    )


def check_features(cfg: Config) -> None:
    """Every feature, token and table the model names exists in the source's batches, and
    every table is fed by a feature the model reads (item_id or a contextual token).

    Raises `ConfigError` naming the dotted key, the feature and the source's features.
    """
    from genrec.data_pipeline.sources import batch_features, source_spec

    source = cfg.data.source
    if source == "parquet":  # a parquet log carries the context columns its mapping names
        source = source_spec(cfg.data.parquet)
    generative = cfg.model.task == "generative"
    # generative: the model derives the sid feature from item_id; its items' own embedding
    # is optional (model.generative.item_embedding)
    derived = (SID_FEATURE,) if generative else ()
    needs_item = not generative or cfg.model.generative.item_embedding
    features = (*batch_features(source), *derived)
    tables = cfg.embeddings.tables
    embedded = {f: t.name for t in tables for f in t.features}
    for i, t in enumerate(tables):
        for j, f in enumerate(t.features):
            if f not in features:
                raise _not_in_source(f"embeddings.tables[{i}].features[{j}]", f, source, features)
    tokens = list(cfg.model.user_feature_tokens)
    for j, f in enumerate(tokens):
        key = f"model.user_feature_tokens[{j}]"
        if f not in features:
            raise _not_in_source(key, f, source, features)
        if f not in embedded:
            raise ConfigError(
                f"{key}: {f!r} is embedded by no table of embeddings.tables "
                f"({[t.name for t in tables]}); add it to a table's features"
            )
    for f in (ITEM_FEATURE,) * needs_item + derived:
        if f not in embedded:
            why = (
                "the generative task embeds each event's codes"
                if f in derived
                else "every model embeds its items"
            )
            raise ConfigError(
                f"embeddings.tables: no table embeds {f!r} (tables: "
                f"{ {t.name: t.features for t in tables} }); {why}"
            )
    if generative and cfg.model.kind != "hstu":
        raise ConfigError(f"model.task=generative: model.kind must be hstu, got {cfg.model.kind!r}")
    read = {ITEM_FEATURE, *tokens} if needs_item else set(tokens)
    read |= set(derived)
    for i, t in enumerate(tables):
        if not read & set(t.features):
            raise ConfigError(
                f"embeddings.tables[{i}] ({t.name!r}): no feature the model reads feeds it "
                f"(its features {t.features}; the model reads {sorted(read)}, "
                f"model.user_feature_tokens {tokens} included); list one of its features in "
                "model.user_feature_tokens or remove the table"
            )
    if cfg.model.task == "ranking":
        for j, f in enumerate(cfg.model.ranking.regression_tasks):
            if f not in features:
                raise _not_in_source(f"model.ranking.regression_tasks[{j}]", f, source, features)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
