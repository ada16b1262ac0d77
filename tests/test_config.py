import re
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


# ------------------------------------------------------------------ checks against the source

TECD = ROOT / "configs" / "tecd.yaml"
TECD_FEATURES = r"\['item_id', 'action', 'domain', 'surface'\]"
TECD_COLUMNS = r"\['user_id', 'item_id', 'timestamp', 'action', 'domain', 'surface'\]"


def test_token_the_source_never_emits_names_key_and_columns():
    """The old tecd.yaml failed at its first forward on `user_id`; now at load."""
    with pytest.raises(ConfigError) as e:
        load_config(TECD, ["model.user_feature_tokens=[user_id]"])
    msg = str(e.value)
    assert "model.user_feature_tokens[0]: 'user_id' is not a feature of data.source 'tecd'" in msg
    assert re.search(TECD_FEATURES, msg) and re.search(TECD_COLUMNS, msg)


def test_table_feature_the_source_never_emits_names_key_and_columns():
    tables = (
        "embeddings.tables=[{name: item, features: [item_id]}, "
        "{name: context, features: [brand, category]}]"
    )
    with pytest.raises(ConfigError) as e:
        load_config(TECD, [tables, "model.user_feature_tokens=[]"])
    msg = str(e.value)
    assert "embeddings.tables[1].features[0]: 'brand' is not a feature of data.source" in msg
    assert re.search(TECD_FEATURES, msg) and re.search(TECD_COLUMNS, msg)


def test_float_column_is_not_a_feature():
    """VK-LSVD's watch_time is a float column: no table, token or regression target reads it."""
    with pytest.raises(ConfigError) as e:
        load_config(
            ROOT / "configs" / "vk_lsvd.yaml",
            [
                "model.task=ranking",
                "model.ranking.tasks=[click, watch_time]",
                "model.ranking.regression_tasks=[watch_time]",
            ],
        )
    msg = str(e.value)
    assert "model.ranking.regression_tasks[0]: 'watch_time'" in msg
    assert "['item_id', 'action', 'surface']" in msg
    assert "['user_id', 'item_id', 'timestamp', 'action', 'surface', 'watch_time']" in msg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.user_feature_tokens=[]"],
            "embeddings.tables[1] ('surface'): no feature the model reads feeds it "
            "(its features ['surface']",
        ),
        (
            ["model.user_feature_tokens=[surface, domain]"],
            "model.user_feature_tokens[1]: 'domain' is embedded by no table of "
            "embeddings.tables (['item', 'surface'])",
        ),
        (
            ["embeddings.tables=[{name: surface, features: [surface]}]"],
            "embeddings.tables: no table embeds 'item_id'",
        ),
    ],
    ids=["unfed_table", "token_without_table", "no_item_table"],
)
def test_tables_and_tokens_fit_together(overrides, message):
    """A table no feature feeds, a token no table embeds, a model with no item table."""
    with pytest.raises(ConfigError) as e:
        load_config(TECD, overrides)
    assert message in str(e.value)
