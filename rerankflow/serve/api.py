"""Request and error shapes of the ranking API (NIM ``/v1/ranking``, Cohere/Infinity ``/v1/rerank``).

Errors are answered as ``{"object": "error", "type", "message", "detail"}`` with the status of the
:class:`ApiError` raised (see :mod:`rerankflow.serve.app` for which status means what).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, ValidationError

LIVE_BODY = {"object": "health.response", "message": "Service is live.", "status": "live"}
READY_BODY = {"object": "health.response", "message": "Service is ready.", "status": "ready"}
NOT_READY_BODY = {"object": "health.response", "message": "Service is not ready.", "status": "not_ready"}


class _Text(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: StrictStr


class _Passage(_Text):
    """A ``/v1/ranking`` passage; ``first_stage_score`` is rerankflow's extension (fusion with the first stage)."""

    first_stage_score: Annotated[float, Strict(), AllowInfNan(False)] | None = None


class _Query(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: StrictStr = Field(min_length=1)


class RankingRequest(BaseModel):
    """NIM ``/v1/ranking`` request."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    query: _Query
    passages: list[_Passage] = Field(min_length=1)
    truncate: Literal["NONE", "END"] | None = None


class RerankRequest(BaseModel):
    """Cohere/Infinity ``/v1/rerank`` request."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    query: StrictStr = Field(min_length=1)
    documents: list[StrictStr | _Text] = Field(min_length=1)
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False
    truncate: Literal["NONE", "END"] | None = None


class ApiError(Exception):
    """An error answered to the client as ``{"object": "error", ...}`` with ``status``."""

    def __init__(self, status: int, kind: str, message: str, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.detail = status, kind, message, detail
        self.headers = dict(headers or {})


def error_response(exc: ApiError):
    """The JSON response of ``exc`` (401s carry ``WWW-Authenticate: Bearer``; ``exc.headers`` are added)."""
    from fastapi.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    headers.update(exc.headers)
    body = {"object": "error", "type": exc.kind, "message": exc.message, "detail": exc.detail if exc.detail is not None else exc.message}
    return JSONResponse(status_code=exc.status, content=body, headers=headers)


def validation_detail(err: ValidationError) -> list[dict]:
    """pydantic's errors as ``[{"loc", "msg", "type"}]`` (no input echoed, no URLs)."""
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in err.errors(include_url=False, include_input=False)]
