"""Request bodies of the serving endpoints, and their validation with field-naming errors.

Pydantic checks the shape (unknown fields, non-integer or negative ids, ids beyond int64);
`check_*` checks what depends on the artifact (deploy.max_history, deploy.max_k, the
model's action codes, aligned list lengths, ids a direct item table has no row for; a
vocab table has a row for every id, its overflow rows, so no id is refused).
Every failure is a `RequestError` whose message starts with the offending field, e.g.
"history[3]: Input should be a valid integer".
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from genrec.config import DeployConfig
from genrec.deploy.programs import direct_rows_beyond

INT64_MAX = (1 << 63) - 1
RawId = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
Timestamp = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
Action = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]


class RequestError(ValueError):
    """A bad request: `status` is the HTTP code, the message names the field."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


class _History(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[RawId]
    timestamps: list[Timestamp] | None = None
    actions: list[Action] | None = None


class RecommendRequest(_History):
    k: StrictInt
    exclude_history: StrictBool = True
    rerank: StrictInt = 0  # > 0: retrieve this many, return the k the paired ranker likes best


class RankRequest(_History):
    candidates: list[RawId]


def _field_name(loc: tuple) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """Validate a JSON body; the first error becomes a RequestError naming its field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise RequestError("body", f"not valid JSON ({err['msg']})", status=400) from None
        more = f" (and {e.error_count() - 1} more errors)" if e.error_count() > 1 else ""
        raise RequestError(_field_name(err["loc"]), err["msg"] + more) from None


def _check_ids(field: str, ids: list[int], item_hashing: dict) -> None:
    i = direct_rows_beyond(ids, item_hashing)
    if i is not None:
        raise RequestError(
            f"{field}[{i}]",
            f"item id {ids[i]} has no row in the model's direct item table (ids 0.."
            f"{item_hashing['num_buckets'] - 1}); the model never saw it, leave it out",
        )


def _check_history(
    req: _History, limits: DeployConfig, num_actions: int, item_hashing: dict
) -> None:
    n = len(req.history)
    if n == 0:
        raise RequestError("history", "is empty; send at least one raw item id")
    if n > limits.max_history:
        raise RequestError(
            "history", f"has {n} ids, more than deploy.max_history={limits.max_history}"
        )
    for name in ("timestamps", "actions"):
        values = getattr(req, name)
        if values is not None and len(values) != n:
            raise RequestError(
                name, f"has {len(values)} entries but history has {n}; send one per event"
            )
    if req.actions is not None:
        for i, a in enumerate(req.actions):
            if a >= num_actions:
                raise RequestError(f"actions[{i}]", f"action code {a} is not in [0, {num_actions})")
    _check_ids("history", req.history, item_hashing)


def check_recommend(
    req: RecommendRequest,
    limits: DeployConfig,
    num_actions: int,
    item_hashing: dict,
    can_rerank: bool = False,
) -> None:
    """`item_hashing`: the artifact's id -> row spec of item_id (manifest hashing);
    `can_rerank`: the artifact carries a paired ranker."""
    _check_history(req, limits, num_actions, item_hashing)
    if not 1 <= req.k <= limits.max_k:
        raise RequestError(
            "k",
            f"must be in [1, {limits.max_k}] (deploy.max_k; a generative artifact: at most "
            f"model.generative.top_k), got {req.k}",
        )
    if req.rerank:
        if not can_rerank:
            raise RequestError(
                "rerank", "this artifact has no paired ranker (genrec export --ranker)", 400
            )
        if not req.k <= req.rerank <= limits.max_k:
            raise RequestError(
                "rerank",
                f"must be in [k={req.k}, {limits.max_k}] (deploy.max_k), got {req.rerank}",
            )


def check_rank(
    req: RankRequest, limits: DeployConfig, num_actions: int, item_hashing: dict
) -> None:
    _check_history(req, limits, num_actions, item_hashing)
    if not req.candidates:
        raise RequestError("candidates", "is empty; send at least one raw item id to score")
    if len(req.candidates) > limits.max_k:
        raise RequestError(
            "candidates",
            f"has {len(req.candidates)} ids, more than deploy.max_k={limits.max_k}",
        )
    _check_ids("candidates", req.candidates, item_hashing)
