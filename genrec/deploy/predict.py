"""`genrec predict`: top-k recommendations for a table of users, as a Ray Data batch job.

    genrec predict CONFIG --checkpoint DIR --users users.parquet --out recs.parquet [--k 100]

Model. The job scores with the exported artifact (genrec/deploy/artifact.py), the same
program and item index `genrec serve` answers /recommend with, so a user's row here equals
/recommend's answer for the same history. `--checkpoint` is an artifact directory
(manifest.json), or a checkpoint or run directory (its latest checkpoint), exported once
into a temporary directory without AOT compilation (for a cluster, export first to shared
storage and pass the artifact). Each Ray actor loads it once and scores batches of users.

Histories. users.parquet has `user_id` (int64) and, optionally, `history`
(list<int64>, oldest first) with aligned `timestamps` and `actions` lists: those are used as
given. Without a `history` column, each user's history is their newest prepared sequence
row in `data.prepared_dir`: that window's history and events (`item_ids`, `timestamps`,
`actions`), i.e. everything known of the user up to the end of the prepared data (the
model reads the last max_len of it). Windows are read newest first, only the user_id
column to find them, and the scan stops once every user is found: a user last seen long
ago costs reading older windows. Users with no history anywhere are not scored; they are
counted in the summary (never dropped silently). The driver holds the selected rows
(about 1.2 KB per user at max_len 50: ~50 GB for all 44M T-ECD users), so at that scale
run predict over slices of the users, or pass histories in users.parquet.

Output: one Parquet file, rows `user_id`, `item_ids` (list<int64>, best first), `scores`
(list<float32>), written as batches come back (row order follows completion, not input).
History items are excluded from a user's recommendations, as /recommend's default.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genrec.config import Config

OUT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
    ]
)
HISTORY_COLUMNS = ("history", "timestamps", "actions")


class PredictError(ValueError):
    """Bad input to `genrec predict`: the message names the file or flag and the fix."""


@dataclass
class PredictReport:
    users: int  # rows of users.parquet
    scored: int
    no_history: int  # users with no history anywhere: not scored
    history_from: str  # "users.parquet" or the prepared directory
    k: int
    out: str
    seconds: float

    def summary(self) -> str:
        text = (
            f"predicted top-{self.k} for {self.scored:,} of {self.users:,} users "
            f"(histories from {self.history_from}) -> {self.out} in {self.seconds:.1f} s "
            f"({self.scored / max(self.seconds, 1e-9):,.0f} users/s)"
        )
        if self.no_history:
            text += f"; {self.no_history:,} users without any history were not scored"
        return text


class Recommender:
    """A Ray Data actor: the artifact loaded once, then `Artifact.recommend` per batch."""

    def __init__(self, artifact: str, k: int, threads: int = 1) -> None:
        import torch

        from genrec.deploy.artifact import Artifact

        torch.set_num_threads(max(1, threads))
        self.art = Artifact(artifact)
        self.k = k

    def __call__(self, batch: pa.Table) -> pa.Table:
        histories = [np.asarray(h, np.int64) for h in batch.column("history").to_pylist()]
        extra = {
            name: batch.column(name).to_pylist() if name in batch.column_names else None
            for name in ("timestamps", "actions")
        }
        recs = self.art.recommend(histories, self.k, extra["timestamps"], extra["actions"])
        return pa.table(
            [
                batch.column("user_id").cast(pa.int64()),
                pa.array([r.ids for r in recs], pa.list_(pa.int64())),
                pa.array([r.scores.astype(np.float32) for r in recs], pa.list_(pa.float32())),
            ],
            schema=OUT_SCHEMA,
        )


def read_users(path: str | Path) -> pa.Table:
    """users.parquet: user_id, and optionally the history columns (checked here)."""
    p = Path(path)
    if not p.exists():
        raise PredictError(f"{p}: users file not found. Fix: pass --users a Parquet file")
    try:
        table = pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise PredictError(f"{p}: not a readable Parquet file ({e}). Fix: rewrite it") from None
    if "user_id" not in table.column_names:
        raise PredictError(
            f"{p}: no user_id column (it has {table.column_names}). Fix: name the column user_id"
        )
    if not pa.types.is_integer(table.schema.field("user_id").type):
        raise PredictError(f"{p}: column 'user_id' must be integers. Fix: write int64 ids")
    if table.column("user_id").null_count:
        raise PredictError(f"{p}: column 'user_id' has nulls. Fix: drop those rows")
    if "history" not in table.column_names:
        return table.select(["user_id"])
    for name in HISTORY_COLUMNS:
        if name in table.column_names and not pa.types.is_list(table.schema.field(name).type):
            raise PredictError(f"{p}: column '{name}' must be a list. Fix: write list<int64>")
    return table.select([c for c in ("user_id", *HISTORY_COLUMNS) if c in table.column_names])


def latest_histories(prepared_dir: str | Path, users: np.ndarray) -> pa.Table:
    """user_id, history, timestamps, actions of each user's newest prepared window."""
    from genrec.data_pipeline import schemas

    root = Path(prepared_dir)
    windows = sorted(root.glob("window=*"), reverse=True)
    if not windows:
        raise PredictError(
            f"{root}: no prepared windows. Fix: run genrec prepare into data.prepared_dir, "
            "or give users.parquet a history column"
        )
    wanted = pa.array(np.unique(users), pa.int64())
    found: list[pa.Table] = []
    for window in windows:
        if len(wanted) == 0:
            break
        for part in sorted(window.glob("*.parquet")):
            ids = pq.read_table(part, columns=["user_id"]).column(0)
            mask = pc.is_in(ids, value_set=wanted)
            if not pc.any(mask).as_py():
                continue
            rows = pq.read_table(part, columns=list(schemas.SEQUENCE_COLUMNS)).filter(mask)
            found.append(rows)
            wanted = pc.filter(wanted, pc.invert(pc.is_in(wanted, value_set=rows["user_id"])))
    if not found:
        return pa.table({"user_id": pa.array([], pa.int64())})
    rows = pa.concat_tables(found)
    return pa.table(
        {
            "user_id": rows["user_id"],
            "history": rows["item_ids"],
            "timestamps": rows["timestamps"],
            "actions": rows["actions"].cast(pa.list_(pa.int64())),
        }
    )


def _artifact_dir(checkpoint: str, tmp: Path) -> str:
    """An artifact for `checkpoint`: itself, or its export (no AOT) under `tmp`."""
    from genrec.deploy.artifact import MANIFEST

    path = Path(checkpoint)
    if (path / MANIFEST).is_file():
        return str(path)
    from genrec.deploy.export import export

    out = tmp / "artifact"
    export(str(path), str(out), compile_aot=False)
    return str(out)


def predict(
    cfg: Config,
    checkpoint: str,
    users: str,
    out: str,
    k: int = 100,
    batch_size: int = 256,
    workers: int = 1,
) -> PredictReport:
    """Write top-`k` recommendations of every user in `users` to `out` (see module doc)."""
    import ray
    from tqdm import tqdm

    from genrec.deploy.artifact import read_manifest
    from genrec.ray_runtime import ray_session

    t0 = time.time()
    if k < 1:
        raise PredictError(f"--k must be >= 1, got {k}. Fix: pass a positive k")
    if not Path(checkpoint).exists():
        raise PredictError(
            f"{checkpoint}: checkpoint not found. Fix: pass --checkpoint an artifact (genrec "
            "export), a RUN/checkpoints/step-N directory, or a run directory"
        )
    table = read_users(users)
    if "history" in table.column_names:
        history_from, requested = str(users), table.num_rows
        scored = table.filter(pc.invert(pc.is_null(table["history"])))
    else:
        history_from = cfg.data.prepared_dir
        requested = pc.count_distinct(table["user_id"]).as_py()
        scored = latest_histories(cfg.data.prepared_dir, table["user_id"].to_numpy())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="genrec-predict-"))
    try:
        artifact = _artifact_dir(checkpoint, tmp)
        task = read_manifest(artifact, verify=False)["task"]
        if task != "retrieval":
            raise PredictError(
                f"{checkpoint}: a {task} model has no top-k retrieval. Fix: pass a retrieval "
                "checkpoint or artifact (genrec predict writes recommendations)"
            )
        with ray_session(
            num_cpus=cfg.data.num_cpus, object_store_mb=cfg.data.object_store_mb,
            address=cfg.data.ray_address,
        ):  # fmt: skip
            # blocks of whole batches, several per actor so every actor gets work
            rows = max(batch_size, -(-scored.num_rows // (4 * max(1, workers))))
            blocks = [scored.slice(i, rows) for i in range(0, max(1, scored.num_rows), rows)]
            ds = ray.data.from_arrow(blocks).map_batches(
                Recommender,
                fn_constructor_kwargs={"artifact": artifact, "k": k},
                batch_size=batch_size,
                batch_format="pyarrow",
                concurrency=max(1, workers),
                num_cpus=1,
            )
            with (
                pq.ParquetWriter(out, OUT_SCHEMA) as writer,
                tqdm(total=scored.num_rows, desc="predict", unit="user", file=sys.stderr,
                     disable=None, mininterval=1.0) as bar,
            ):  # fmt: skip
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    writer.write_table(batch.cast(OUT_SCHEMA))
                    bar.update(batch.num_rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PredictReport(
        users=requested,
        scored=scored.num_rows,
        no_history=requested - scored.num_rows,
        history_from=history_from,
        k=k,
        out=str(out),
        seconds=time.time() - t0,
    )
