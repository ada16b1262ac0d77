"""Expected failures of the CLI: one line on stderr naming the problem and the fix, exit 2,
no traceback (`--debug` raises instead); `--version`; serve's host and port from the config.

Each case calls `genrec.cli.main(argv)` in this process, as the console script does.
"""

from __future__ import annotations

import json
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrec import __version__
from genrec.cli import build_parser, main, serve_address
from genrec.config import ConfigError


def fails(capsys, argv: list[str], *needles: str) -> str:
    """main(argv) exits 2 with one line holding every needle (the problem and its fix)."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genrec: error: "), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"genrec {__version__}"


def test_missing_config_file_names_the_shipped_ones(capsys):
    fails(capsys, ["config", "show", "no/such.yaml"], "'no/such.yaml' does not exist",
          "Fix: give a path to a YAML file or the name of a shipped config", "tecd")  # fmt: skip
    fails(capsys, ["train", "nosuch"], "'nosuch' does not exist", "quickstart")


def test_bad_config_names_the_key(capsys, tmp_path):
    fails(capsys, ["config", "show", "quickstart", "trainer.batch_size=big"],
          "trainer.batch_size: expected int, got 'big'", "Fix: correct that key")  # fmt: skip
    fails(capsys, ["plan", "quickstart", "trainer.batch_sise=8"], "trainer.batch_sise",
          "TrainerConfig has: ", "batch_size")  # fmt: skip
    (tmp_path / "bad.yaml").write_text("trainer: [1, 2\n")
    fails(capsys, ["config", "show", str(tmp_path / "bad.yaml")], "not valid YAML at line 2",
          "Fix:")  # fmt: skip


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        main(["config", "show", "nosuch", "--debug"])


def test_missing_input_directory_does_not_suggest_skipping(capsys, tmp_path):
    err = fails(
        capsys,
        ["prepare", "--source", "tecd", "--in", str(tmp_path / "absent"), "--out", str(tmp_path)],
        "absent: is not a directory", "pass the tecd root",
    )  # fmt: skip
    assert "skip" not in err
    fails(capsys, ["prepare", "--source", "parquet", "--in", str(tmp_path), "--out", "x"],
          "needs its column mapping", "--config")  # fmt: skip


def test_bad_data_names_file_column_and_row(capsys, tmp_path, ray_local):
    """A null user id three rows into a user's Parquet: raised in a Ray task, reported here."""
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(
        pa.table({"uid": pa.array([1, 2, 3, None], pa.int64()), "iid": [5, 6, 7, 8]}),
        raw / "events.parquet",
    )
    (tmp_path / "cfg.yaml").write_text("data: {source: parquet, parquet: {user: uid, item: iid}}")
    argv = ["prepare", "--source", "parquet", "--config", str(tmp_path / "cfg.yaml"),
            "--in", str(raw), "--out", str(tmp_path / "out")]  # fmt: skip
    fails(capsys, argv, "events.parquet: column 'uid', row 3: null value",
          "Fix: drop or repair these rows", "--on-bad-rows skip")  # fmt: skip


def test_missing_prepared_data_fails_before_launching_ranks(capsys, tmp_path):
    fails(capsys, ["train", "quickstart", f"data.prepared_dir={tmp_path / 'none'}"],
          "none: no prepared data (items.parquet missing)", "Fix: run genrec prepare")  # fmt: skip


def test_missing_checkpoint(capsys, tmp_path):
    fails(capsys, ["export", str(tmp_path / "nockpt"), "--out", str(tmp_path / "a")],
          "nockpt is not a genrec checkpoint", "pass a RUN/checkpoints/step-")  # fmt: skip
    pq.write_table(pa.table({"user_id": [1, 2]}), tmp_path / "users.parquet")
    argv = [
        "predict",
        "quickstart",
        "--checkpoint",
        str(tmp_path / "nockpt"),
        "--users",
        str(tmp_path / "users.parquet"),
        "--out",
        str(tmp_path / "r.parquet"),
    ]
    fails(capsys, argv, "nockpt: checkpoint not found", "--checkpoint")  # fmt: skip
    fails(capsys, ["serve", str(tmp_path / "noart")], "noart is not a genrec artifact",
          "run genrec export")  # fmt: skip
    argv[argv.index("--checkpoint") + 1] = str(tmp_path)  # exists: the users file is next
    argv[argv.index("--users") + 1] = str(tmp_path / "nousers.parquet")
    fails(capsys, argv, "nousers.parquet: users file not found", "Fix: pass --users")


def test_port_in_use(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fails(capsys, ["serve", "art", f"deploy.port={port}", "--config", "quickstart"],
              f"port {port} on 127.0.0.1 is in use", "--port")  # fmt: skip


def test_serve_takes_host_and_port_from_the_config(tmp_path):
    from genrec.config import Config, to_dict
    from genrec.deploy.artifact import FORMAT_VERSION, MANIFEST
    from genrec.embeddings.hashing import HASH_VERSION

    parse = build_parser().parse_args
    args = parse(["serve", "art", "deploy.port=9123", "deploy.host=0.0.0.0",
                  "--config", "quickstart"])  # fmt: skip
    assert serve_address(args) == ("0.0.0.0", 9123)
    args = parse(["serve", "art", "deploy.port=9123", "--config", "quickstart", "--port", "9200"])
    assert serve_address(args) == ("127.0.0.1", 9200)  # a flag wins over the config
    # no --config: the deploy section the artifact was exported with
    cfg = to_dict(Config())
    cfg["deploy"].update(host="127.0.0.3", port=9301)
    (tmp_path / MANIFEST).write_text(
        json.dumps({"format_version": FORMAT_VERSION, "hashing": {"version": HASH_VERSION},
                    "config": cfg, "files": {}})
    )  # fmt: skip
    assert serve_address(parse(["serve", str(tmp_path)])) == ("127.0.0.3", 9301)
    assert serve_address(parse(["serve", str(tmp_path), "deploy.port=9302"]))[1] == 9302
