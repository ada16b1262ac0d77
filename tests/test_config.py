import subprocess
import sys

import pytest

from genrec.config import ConfigError, load_config

from .conftest import ROOT

QUICKSTART = ROOT / "genrec" / "configs" / "quickstart.yaml"


def test_overrides_apply_with_types():
    cfg = load_config(
        QUICKSTART, ["trainer.batch_size=64", "model.dropout=0.5", "data.window=week"]
    )
    assert cfg.trainer.batch_size == 64
    assert cfg.model.dropout == 0.5
    assert cfg.data.window == "week"
    assert cfg.table("item").num_embeddings == 16384


SHIPPED = sorted((ROOT / "genrec" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Each config in genrec/configs/ parses into the schema (no unknown keys, right types), and
    a SASRec config pairs with its data set's HSTU config (same data, its own run dir)."""
    cfg = load_config(path)
    assert cfg.trainer.run_dir and cfg.data.prepared_dir
    if path.stem.endswith("_sasrec"):
        base = load_config(path.with_name(path.stem.removesuffix("_sasrec") + ".yaml"))
        assert cfg.model.kind == "sasrec" and base.model.kind == "hstu"
        assert (cfg.data.raw_dir, cfg.data.prepared_dir) == (
            base.data.raw_dir,
            base.data.prepared_dir,
        )
        assert cfg.trainer.run_dir != base.trainer.run_dir


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="trainer.batch_sise"):
        load_config(QUICKSTART, ["trainer.batch_sise=64"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"trainer.batch_size: expected int"):
        load_config(QUICKSTART, ["trainer.batch_size=lots"])
    with pytest.raises(ConfigError, match=r"model.kind: expected one of"):
        load_config(QUICKSTART, ["model.kind=rnn"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  dimm: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.dimm"):
        load_config(p)


def test_nested_list_of_tables_is_typed(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("embeddings:\n  tables:\n    - name: x\n      dim: nope\n")
    with pytest.raises(ConfigError, match=r"embeddings.tables\[0\].dim: expected int"):
        load_config(p)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "genrec.cli", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_cli_config_show_prints_resolved_config():
    r = _cli("config", "show", str(QUICKSTART), "trainer.batch_size=64")
    assert r.returncode == 0, r.stderr
    assert "batch_size: 64" in r.stdout


def test_cli_config_show_rejects_bad_key():
    r = _cli("config", "show", str(QUICKSTART), "trainer.batch_sise=64")
    assert r.returncode != 0
    assert "trainer.batch_sise" in r.stderr
