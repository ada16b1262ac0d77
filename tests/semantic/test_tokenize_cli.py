import json

import numpy as np
import pytest

from genrec.cli import main
from genrec.config import ConfigError, load_config
from genrec.semantic.features import ItemFeatures, attribute_features, concat_features
from genrec.semantic.tokenize import read_codes


def write_attributes(path, n=60):
    # items 1..n: brand b = i % 6 (attribute 10 + b), category 2 shared by all
    path.write_text(json.dumps({str(i): [2, 10 + i % 6] for i in range(1, n + 1)}))
    return path


def test_attribute_features_weight_rare_attributes(tmp_path):
    f = attribute_features(write_attributes(tmp_path / "a.json"), dim=0)
    assert f.item_ids.tolist() == list(range(1, 61))
    # the shared category has idf log(1) = 0: rows are one-hot on the brand
    assert np.allclose(f.vectors[:, 2], 0) and np.allclose(np.linalg.norm(f.vectors, axis=1), 1)
    assert f.vectors[0, 11] == 1.0  # item 1: brand 1 -> attribute 11
    proj = attribute_features(tmp_path / "a.json", dim=16, seed=3)
    same = proj.vectors[0] @ proj.vectors[6]  # items 1 and 7 share brand 1
    assert np.allclose(proj.vectors[0], proj.vectors[6]) and same > 0


def test_concat_features_align_on_item_and_count_missing():
    a = ItemFeatures(np.array([1, 2, 3]), np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]))
    b = ItemFeatures(np.array([2, 4]), np.array([[0.0, 0.0, 5.0], [2.0, 0.0, 0.0]]))
    c = concat_features({"a": a, "b": b})
    assert c.item_ids.tolist() == [1, 2, 3, 4]
    assert np.allclose(c.vectors[0], [0.6, 0.8, 0, 0, 0])  # item 1: no b vector -> zeros
    assert np.allclose(c.vectors[1], [1, 0, 0, 0, 1])
    assert np.allclose(c.vectors[3], [0, 0, 1, 0, 0])
    assert c.missing == {"a": 1, "b": 2}


def test_bad_attributes_file_names_the_item(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"1": [2], "x7": [3]}))
    with pytest.raises(ValueError, match="bad.json.*'x7'"):
        attribute_features(p)


@pytest.mark.parametrize("method", ["residual_kmeans", "rqvae"])
def test_tokenize_cli_writes_unique_codes_and_stats(tmp_path, capsys, method):
    attrs = write_attributes(tmp_path / "a.json")
    out = tmp_path / "sem"
    rc = main(
        [
            "tokenize",
            "quickstart",
            f"semantic.attributes={attrs}",
            "semantic.attribute_dim=0",
            f"semantic.method={method}",
            "semantic.codebook_sizes=[6,2]",
            "semantic.kmeans_iters=5",
            "semantic.rqvae.epochs=3",
            "semantic.rqvae.batch_size=32",
            "semantic.rqvae.hidden_dim=16",
            "semantic.rqvae.latent_dim=8",
            f"semantic.out_dir={out}",
        ]
    )
    assert rc == 0
    assert "collision rate" in capsys.readouterr().out
    ids, codes = read_codes(out / "codes.parquet")
    assert ids.tolist() == list(range(1, 61)) and codes.shape == (60, 3)
    assert len(np.unique(codes, axis=0)) == 60
    stats = json.loads((out / "stats.json").read_text())
    assert stats["items"] == 60 and [lv["size"] for lv in stats["levels"]] == [6, 2]
    # 6 brands of 10 identical items: at most 12 distinct codes before disambiguation
    assert stats["unique_codes"] <= 12 and stats["collision_rate"] == 1.0
    assert stats["disambiguation_size"] >= 5
    if method == "residual_kmeans":  # each brand its own first-level code
        first = codes[:, 0]
        assert all(len(set(first[(ids % 6) == b])) == 1 for b in range(6))
        assert len(set(first)) == 6 and stats["reconstruction_error"] < 1e-6


def test_semantic_config_checks():
    with pytest.raises(ConfigError, match="codebook_sizes"):
        load_config("quickstart", ["semantic.codebook_sizes=[256,1]"])
    with pytest.raises(ConfigError, match="balanced"):
        load_config("quickstart", ["semantic.method=rqvae", "semantic.balanced=true"])


def test_tokenize_without_vectors_fails_with_fix(tmp_path, capsys):
    assert main(["tokenize", "quickstart", f"semantic.out_dir={tmp_path}"]) != 0
    assert "semantic.attributes" in capsys.readouterr().err
