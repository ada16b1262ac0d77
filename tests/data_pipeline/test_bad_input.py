"""Bad input: a DataError naming file, column and row; or, with skip, skipped and counted."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrec.data_pipeline.sequences import prepare
from genrec.data_pipeline.sources import get_source, iter_events
from genrec.data_pipeline.synthetic import generate
from genrec.data_pipeline.validation import BadRows, DataError

VICTIM = os.path.join("marketplace", "events", "00003.pq")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[str, int]:
    path = str(tmp_path_factory.mktemp("clean"))
    report = generate("tecd", path, users=40, events=3000, items=150, seed=11)
    return path, report.events


def _rewrite(path: str, edit) -> None:
    table = pq.read_table(path)
    pq.write_table(edit(table), path)


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def _nulls(t: pa.Table) -> pa.Table:
    mask = np.zeros(t.num_rows, bool)
    mask[[3, 5]] = True
    return _set(t, "user_id", pa.array(t["user_id"].to_numpy(), mask=mask))


def _negative(t: pa.Table) -> pa.Table:
    ids = t["item_id"].to_numpy().copy()
    ids[4] = -9
    return _set(t, "item_id", pa.array(ids))


def _unknown_action(t: pa.Table) -> pa.Table:
    acts = t["action_type"].to_pylist()
    acts[2] = "wishlist"
    return _set(t, "action_type", pa.array(acts))


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


# name -> (corrupt(path), reason, column, row, skipped rows: int or "file")
CASES = {
    "missing_column": (
        lambda p: _rewrite(p, lambda t: t.drop(["item_id"])),
        "missing_column",
        "item_id",
        None,
        "file",
    ),
    "wrong_type": (
        lambda p: _rewrite(p, lambda t: _set(t, "user_id", t["user_id"].cast(pa.string()))),
        "wrong_type",
        "user_id",
        None,
        "file",
    ),
    "nulls": (lambda p: _rewrite(p, _nulls), "null_value", "user_id", 3, 2),
    "negative_id": (lambda p: _rewrite(p, _negative), "negative_value", "item_id", 4, 1),
    "unknown_action": (
        lambda p: _rewrite(p, _unknown_action),
        "unknown_action",
        "action_type",
        2,
        1,
    ),
    "truncated": (_truncate, "unreadable_file", None, None, "file"),
    "not_parquet": (
        lambda p: open(p, "w").write("user_id,item_id\n1,2\n"),
        "unreadable_file",
        None,
        None,
        "file",
    ),
    "empty_file": (lambda p: open(p, "wb").close(), "empty_file", None, None, "file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_error_and_skip(ray_local, clean, tmp_path, case):
    corrupt, reason, column, row, skipped = CASES[case]
    raw = str(tmp_path / "raw")
    shutil.copytree(clean[0], raw)
    victim = os.path.join(raw, VICTIM)
    victim_rows = pq.read_metadata(victim).num_rows
    corrupt(victim)

    with pytest.raises(DataError) as err:
        prepare("tecd", raw, str(tmp_path / "out_error"), window="day", max_len=5)
    msg = str(err.value)
    assert victim in msg and err.value.reason == reason
    if column:
        assert f"column '{column}'" in msg
    if row is not None:
        assert f"row {row}" in msg and err.value.row == row
    assert not os.path.exists(tmp_path / "out_error" / "_meta.json")

    report = prepare(
        "tecd", raw, str(tmp_path / "out_skip"), window="day", max_len=5, on_bad_rows="skip"
    )
    lost = victim_rows if skipped == "file" else skipped
    assert report.events == clean[1] - lost
    if skipped == "file":
        assert report.skipped_files == [f"{victim} ({reason})"]
        # rows of an unreadable file are unknown; of a readable one, counted
        assert report.bad_rows[reason] == (
            0 if reason in ("unreadable_file", "empty_file") else victim_rows
        )
    else:
        assert report.bad_rows == {reason: skipped} and report.skipped_files == []
    assert reason in report.summary()


def test_text_bad_token_both_modes(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("1 10 11 12\n2 20 x21 22\n3 30 -31\n4 40\n")
    with pytest.raises(DataError, match=r"seq.txt: column 'item_id', row 1: token 'x21'"):
        list(iter_events(get_source("text"), str(path)))
    bad = BadRows("skip")
    events = pa.Table.from_batches(list(iter_events(get_source("text"), str(path), bad=bad)))
    assert events["user_id"].to_pylist() == [1, 1, 1, 4]
    assert bad.rows == {"bad_token": 3, "negative_value": 2}


def test_recbole_malformed_line_both_modes(tmp_path):
    path = tmp_path / "x.inter"
    path.write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n1\t5\t100\n2\t6\n3\t7\tnoon\n4\t8\t400\n"
    )
    with pytest.raises(DataError, match=r"x.inter, row 1: malformed line"):
        list(iter_events(get_source("recbole"), str(path)))
    bad = BadRows("skip")
    events = pa.Table.from_batches(list(iter_events(get_source("recbole"), str(path), bad=bad)))
    assert events["user_id"].to_pylist() == [1, 4]
    assert events["timestamp"].to_pylist() == [100, 400]
    assert bad.rows == {"bad_token": 2}


def test_recbole_missing_column(tmp_path):
    path = tmp_path / "y.inter"
    path.write_text("user_id:token\trating:float\n1\t5\n")
    with pytest.raises(DataError, match=r"y.inter: column 'item_id'"):
        list(iter_events(get_source("recbole"), str(path)))
