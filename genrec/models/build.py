"""`build_model(cfg, inputs)`: the one place that maps model.kind x model.task onto a class.

`inputs` (data_pipeline.model_inputs): the vocabularies and semantic-ID codes the model is
built from, read by the caller; None: a model that needs neither."""

from __future__ import annotations

from torch import nn

from genrec.config import Config
from genrec.data_pipeline.model_inputs import ModelInputs
from genrec.models.generative import HSTUGenerative
from genrec.models.ranking import HSTURanking
from genrec.models.retrieval import HSTURetrieval
from genrec.models.sasrec import SASRecRanking, SASRecRetrieval

MODELS: dict[tuple[str, str], type[nn.Module]] = {
    ("hstu", "retrieval"): HSTURetrieval,
    ("hstu", "ranking"): HSTURanking,
    ("hstu", "generative"): HSTUGenerative,
    ("sasrec", "retrieval"): SASRecRetrieval,
    ("sasrec", "ranking"): SASRecRanking,
}


def build_model(cfg: Config, inputs: ModelInputs | None = None) -> nn.Module:
    """A fresh, unsharded model; its `sparse.ec` is what DMP shards."""
    key = (cfg.model.kind, cfg.model.task)
    if key not in MODELS:
        raise ValueError(
            f"no model for model.kind={key[0]!r} and model.task={key[1]!r}; known: {sorted(MODELS)}"
        )
    return MODELS[key](cfg, inputs)
