"""Collaborative item vectors from a real exported retrieval artifact (ml-100k catalog)."""

import numpy as np
import torch

from genrec.config import to_dict
from genrec.semantic.features import artifact_features, attribute_features, concat_features
from tests.deploy.helpers import read_ml100k, tiny_config, write_prepared


def test_artifact_item_table_equals_the_models_item_embeddings(tmp_path, shared_data):
    from genrec.deploy.export import export, item_embeddings
    from genrec.models.build import build_model
    from genrec.trainer.checkpoint import save_checkpoint

    catalog = write_prepared(read_ml100k(shared_data / "ml-100k"), tmp_path / "prepared")
    cfg = tiny_config(str(tmp_path / "prepared"))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    state = {"step": 0, "world_size": 1, "config": to_dict(cfg), "position": None}
    ckpt = save_checkpoint(tmp_path / "run", 0, {"model": model.state_dict()}, state, {}).wait()
    export(str(ckpt), str(tmp_path / "artifact"), compile_aot=False)

    f = artifact_features(tmp_path / "artifact")
    ids = np.unique(catalog)
    assert f.item_ids.tolist() == ids.tolist()
    with torch.no_grad():
        np.testing.assert_allclose(f.vectors, item_embeddings(model, ids), rtol=1e-6)

    # concatenated with attributes of a few items: cold items get zeros in the artifact part
    attrs = tmp_path / "attrs.json"
    attrs.write_text('{"1": [3, 4], "2": [4], "999999": [3]}')
    both = concat_features({"artifact": f, "attributes": attribute_features(attrs, dim=0)})
    assert both.missing == {"artifact": 1, "attributes": len(ids) - 2}
    assert np.allclose(both.vectors[-1, : f.vectors.shape[1]], 0)  # item 999999
