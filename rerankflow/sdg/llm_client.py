"""A chat-completions client for any OpenAI-compatible endpoint that never wastes a call and never
leaks its key.

* Transport: the official ``openai`` client (``OpenAI(base_url=..., api_key=..., timeout=...)``).
* Retries: the client is built with ``max_retries=0`` and :meth:`LLMClient.chat` retries itself.
  The ``openai`` client's built-in retries do honour ``Retry-After`` and back off with jitter, but
  they are invisible to the caller (no count is exposed, only a log line) and their cap on
  ``Retry-After`` / backoff is not configurable; the run summary must report how many retries a
  run took, so the loop lives here. Retried: HTTP 429, 408, 409 and 5xx, timeouts, connection
  errors and 200 answers that are not a chat completion (never cached). The wait is the server's ``Retry-After`` / ``retry-after-ms`` when it sends one (capped
  at ``max_retry_after`` seconds), else exponential backoff ``initial * 2**attempt`` capped at
  ``backoff_max``, with full jitter (uniform between half and all of it).
* Fatal (:class:`LLMFatalError`, the run stops): 401/403/404 — a wrong key, model or URL that no
  retry can fix. Other failures (:class:`LLMCallError`) are per call: the caller skips the document.
* Cache (:class:`CallCache`): every finished call is stored under ``sha256`` of the request
  (model, messages and sampling parameters — never the key, never the base URL, so pointing the same
  model at another host reuses the answers) as one JSON file written atomically. A run killed at any
  point and started again finds every finished call there and repeats none of them.
* Secrets: the key is only handed to the ``openai`` client. Every message that leaves this module
  (exceptions, log lines) goes through :func:`scrub`, the ``openai``/``httpx`` loggers are capped at
  WARNING and filtered through the same scrubber, and no header is ever logged or cached.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rerankflow.io import write_json

log = logging.getLogger(__name__)

_REDACTED = "***REDACTED***"
_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember ``value`` so :func:`scrub` removes it from every message (values under 4 chars ignored)."""
    if value and len(value) >= 4:
        with _SECRETS_LOCK:
            _SECRETS.add(value)
        _install_log_scrubbing()


def scrub(text: Any) -> str:
    """``str(text)`` with every registered secret replaced by a placeholder."""
    s = str(text)
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for sec in secrets:
        if sec in s:
            s = s.replace(sec, _REDACTED)
    return s


class _ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        clean = scrub(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


_SCRUB_FILTER = _ScrubFilter()
_NOISY_LOGGERS = ("openai", "openai._base_client", "httpx", "httpx2", "httpcore", "httpcore2")


def _install_log_scrubbing() -> None:
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        # DEBUG logging of these libraries prints request options; never let it reach a log file.
        if lg.level == logging.NOTSET or lg.level < logging.WARNING:
            lg.setLevel(logging.WARNING)
        if _SCRUB_FILTER not in lg.filters:
            lg.addFilter(_SCRUB_FILTER)
    root = logging.getLogger()
    if _SCRUB_FILTER not in root.filters:
        root.addFilter(_SCRUB_FILTER)
    # Every handler that exists now (the rule's log file, the console) scrubs what passes through it.
    loggers = [root] + [lg for lg in list(logging.root.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if _SCRUB_FILTER not in h.filters:
                h.addFilter(_SCRUB_FILTER)


class LLMCallError(RuntimeError):
    """A call that failed after its retries (or with a non-retryable status); the message is scrubbed.
    ``status``: the HTTP status when the server answered one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class LLMFatalError(LLMCallError):
    """A failure no retry or other document can fix (bad key, unknown model or URL): stop the run."""


class LLMUnreachableError(LLMFatalError):
    """The endpoint stopped answering (connection refused or reset on every retry): the server is down,
    so every other call would fail the same way. The run stops; finished calls stay in the cache."""


def request_key(payload: dict) -> str:
    """Cache key of a chat-completions request body: sha256 over model, messages and every sampling
    parameter, canonical JSON. ``payload`` is exactly the JSON body sent (the API key is a header,
    so it can never be part of it)."""
    body = {k: v for k, v in payload.items() if k not in ("stream",)}
    canon = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


class CallCache:
    """Finished calls on disk: ``<dir>/<key[:2]>/<key>.json`` = ``{"key", "model", "response"}``.

    ``read_only`` (preview mode) reads hits but never writes.
    """

    def __init__(self, directory, read_only: bool = False):
        self.dir = Path(directory) if directory else None
        self.read_only = read_only

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        if self.dir is None:
            return None
        p = self._path(key)
        if not p.exists():
            return None
        try:
            entry = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):  # written atomically, so only a foreign file can be bad
            log.warning("ignoring unreadable cache entry %s", p)
            return None
        if entry.get("key") != key or "response" not in entry:
            return None
        return entry["response"]

    def put(self, key: str, model: str, response: dict) -> None:
        if self.dir is None or self.read_only:
            return
        write_json(self._path(key), {"key": key, "model": model, "response": response}, indent=None)

    def __contains__(self, key: str) -> bool:
        return self.dir is not None and self._path(key).exists()


@dataclass
class CallStats:
    """Counters shared by every thread of a run (guarded by a lock)."""

    calls: int = 0            # requests that returned a completion (fresh, not from the cache)
    cache_hits: int = 0
    retries: int = 0          # transport-level retries (429/5xx/timeouts/connection errors)
    failed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    tokens_reported: bool = False
    retry_reasons: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def add_retry(self, reason: str) -> None:
        with self._lock:
            self.retries += 1
            self.retry_reasons[reason] = self.retry_reasons.get(reason, 0) + 1

    def add_usage(self, usage: dict | None) -> None:
        if not usage:
            return
        with self._lock:
            self.tokens_reported = True
            for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
                v = usage.get(k)
                if isinstance(v, int):
                    setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        with self._lock:
            d = {
                "calls": self.calls, "cache_hits": self.cache_hits, "retries": self.retries,
                "retry_reasons": dict(self.retry_reasons), "failed_calls": self.failed_calls,
            }
            if self.tokens_reported:
                d["tokens"] = {"prompt": self.prompt_tokens, "completion": self.completion_tokens,
                               "total": self.total_tokens}
            else:
                d["tokens"] = None
            return d


def _retry_after_seconds(headers) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(ra)
    if parsed is None:
        return None
    return max(0.0, email.utils.mktime_tz(parsed) - time.time())


@dataclass
class RetryPolicy:
    """Transport retries of one request (``sdg.llm.max_retries``, ``retry_backoff_initial``,
    ``retry_backoff_max``, ``max_retry_after``)."""

    max_retries: int
    backoff_initial: float
    backoff_max: float
    max_retry_after: float

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number ``attempt + 1``."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        cap = min(self.backoff_max, self.backoff_initial * (2 ** attempt))
        return cap * (0.5 + 0.5 * rng.random())


class LLMClient:
    """One endpoint + model. Thread-safe: share one instance between worker threads."""

    def __init__(self, base_url: str, model: str, api_key: str | None, *, timeout: float, retry: RetryPolicy,
                 cache: CallCache | None = None, stats: CallStats | None = None, seed: int):
        import openai

        self.base_url = base_url
        self.model = model
        self.retry = retry
        self.cache = cache or CallCache(None)
        self.stats = stats or CallStats()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        register_secret(api_key)
        # Local servers (vLLM, Ollama) ignore the key but the client requires a non-empty one.
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", timeout=timeout,
                                     max_retries=0)

    def payload(self, messages: list[dict], *, temperature: float | None = None, top_p: float | None = None,
                max_tokens: int | None = None, extra_body: dict | None = None,
                response_format: dict | None = None) -> dict:
        """The JSON body a call sends (and the input of its cache key). ``response_format``: the
        structured-output request (see :func:`response_format`), None = plain text."""
        body: dict = {"model": self.model, "messages": messages}
        if temperature is not None:
            body["temperature"] = float(temperature)
        if top_p is not None:
            body["top_p"] = float(top_p)
        if max_tokens:
            body["max_tokens"] = int(max_tokens)
        if response_format is not None:
            body["response_format"] = response_format
        for k, v in (extra_body or {}).items():
            body[k] = v
        return body

    def _sleep(self, attempt: int, retry_after: float | None) -> float:
        with self._rng_lock:
            d = self.retry.delay(attempt, retry_after, self._rng)
        time.sleep(d)
        return d

    def chat(self, messages: list[dict], *, retry_http: bool = True, **params) -> dict:
        """Send one chat completion (or answer it from the cache).

        Returns ``{"content": str, "finish_reason", "usage": {...}|None, "cached": bool}``.
        Raises :class:`LLMFatalError` or :class:`LLMCallError` (scrubbed messages). ``retry_http=False``
        (the structured-output probe): an HTTP error status is not retried but raised at once (some
        servers answer an unknown request field with a 500, e.g. llama-cpp-python's).
        """
        import openai

        body = self.payload(messages, **params)
        key = request_key(body)
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.add(cache_hits=1)
            return {**hit, "cached": True}
        fixed = {"model", "messages", "temperature", "top_p", "max_tokens"}
        extra = {k: v for k, v in body.items() if k not in fixed}
        attempt = 0
        while True:
            reason, retry_after = None, None
            try:
                resp = self._client.chat.completions.create(
                    model=body["model"], messages=body["messages"],
                    temperature=body.get("temperature", openai.NOT_GIVEN),
                    top_p=body.get("top_p", openai.NOT_GIVEN),
                    max_tokens=body.get("max_tokens", openai.NOT_GIVEN),
                    extra_body=extra or None,
                )
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
                self.stats.add(failed_calls=1)
                raise LLMFatalError(
                    f"{self.base_url} answered HTTP {exc.status_code} for model {self.model!r}: "
                    f"{scrub(_short(exc))} — check the API key variable, the model name and the base URL"
                ) from None
            except openai.APIStatusError as exc:
                code = exc.status_code
                if retry_http and (code in (408, 409, 429) or code >= 500):
                    reason = f"http_{code}"
                    retry_after = _retry_after_seconds(exc.response.headers)
                else:
                    self.stats.add(failed_calls=1)
                    raise LLMCallError(f"HTTP {code} from {self.base_url}: {scrub(_short(exc))}", status=code) from None
            except openai.APITimeoutError:
                reason = "timeout"
            except openai.APIConnectionError as exc:
                reason = "connection_error"
                log.debug("connection error: %s", scrub(exc))
            except openai.OpenAIError as exc:  # e.g. a body the client cannot decode
                self.stats.add(failed_calls=1)
                raise LLMCallError(f"{type(exc).__name__} from {self.base_url}: {scrub(_short(exc))}") from None
            else:
                if not getattr(resp, "choices", None):
                    # Not a chat completion (e.g. a proxy's HTML page with status 200): a transport
                    # failure, retried and never cached.
                    reason = "invalid_response"
                else:
                    result = _result_of(resp)
                    self.stats.add(calls=1)
                    self.stats.add_usage(result["usage"])
                    self.cache.put(key, self.model, result)
                    return {**result, "cached": False}
            if attempt >= self.retry.max_retries:
                self.stats.add(failed_calls=1)
                if reason == "connection_error":
                    raise LLMUnreachableError(
                        f"{scrub(self.base_url)} stopped answering (connection refused or reset on every one of "
                        f"{attempt + 1} attempts): is the server running?")
                raise LLMCallError(f"{reason} from {self.base_url} after {attempt} retries")
            self.stats.add_retry(reason)
            waited = self._sleep(attempt, retry_after)
            log.info("retrying %s call (%s), retry %d/%d after %.2fs", self.model, reason, attempt + 1,
                     self.retry.max_retries, waited)
            attempt += 1


def _short(exc: Exception, limit: int = 300) -> str:
    msg = getattr(exc, "message", None) or str(exc)
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[:limit] + "..."


def _result_of(resp) -> dict:
    choice = resp.choices[0] if getattr(resp, "choices", None) else None
    content = ""
    finish = None
    if choice is not None:
        finish = getattr(choice, "finish_reason", None)
        msg = getattr(choice, "message", None)
        content = (getattr(msg, "content", None) or "") if msg is not None else ""
    usage = None
    u = getattr(resp, "usage", None)
    if u is not None:
        usage = {k: getattr(u, k, None) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"content": content, "finish_reason": finish, "usage": usage}


# ---------------------------------------------------------------- structured outputs

#: ``sdg.llm.structured_output`` values that send a ``response_format`` (``auto`` probes which one works).
STRUCTURED_MODES = ("json_schema", "json_object")


def response_format(mode: str | None, name: str, schema: dict) -> dict | None:
    """The ``response_format`` request field of a structured-output ``mode``:

    * ``json_schema`` — OpenAI's form ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
      (OpenAI, vLLM, NIM, llama.cpp's ``llama-server``, Ollama);
    * ``json_object`` — ``{"type": "json_object", "schema": ...}``: JSON mode with the schema beside it,
      the form llama-cpp-python's server (and Anyscale-style endpoints) turn into a grammar; servers
      that ignore ``schema`` still return JSON;
    * ``none`` / None — no ``response_format``: plain text, strict parsing and retries only.
    """
    if mode in (None, "none"):
        return None
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    if mode == "json_object":
        return {"type": "json_object", "schema": bounded_strings(schema)}
    raise ValueError(f"unknown structured-output mode {mode!r}")


#: Length bounds of free-text fields in the ``json_object`` form: grammar-based servers turn them into
#: the grammar, so a small model can neither leave a field empty nor run a string on until
#: ``max_tokens`` cuts the JSON off (both seen with SmolLM2-135M). Not sent in the ``json_schema`` form:
#: OpenAI's strict mode rejects schemas with keywords it does not support.
STRING_MIN_LENGTH, STRING_MAX_LENGTH = 2, 400


def bounded_strings(schema):
    """A copy of ``schema`` whose free-text strings (no ``enum``) get ``minLength``/``maxLength``."""
    if isinstance(schema, list):
        return [bounded_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded_strings(v) for k, v in schema.items()}
    if out.get("type") == "string" and "enum" not in out:
        out.setdefault("minLength", STRING_MIN_LENGTH)
        out.setdefault("maxLength", STRING_MAX_LENGTH)
    return out


#: The probe's schema: a reply can only be exactly ``{"rerankflow_probe": "ok"}`` if the server
#: enforces it (the prompt never names the key), so a server that ignores ``response_format`` fails.
PROBE_SCHEMA = {"type": "object", "properties": {"rerankflow_probe": {"type": "string", "enum": ["ok"]}},
                "required": ["rerankflow_probe"], "additionalProperties": False}
PROBE_MESSAGES = [{"role": "user", "content": "Reply with a JSON object."}]


def probe_key(client: LLMClient, params: dict) -> str:
    """Cache key of a probe outcome: the endpoint (base URL: capabilities are the server's), the model
    and the request parameters."""
    return request_key({"probe": "structured_output", "version": 1, "base_url": client.base_url,
                        "model": client.model, "params": params})


def probe_structured_output(client: LLMClient, cache: CallCache, params: dict) -> dict:
    """Which structured-output mode ``client``'s endpoint honours: the first of :data:`STRUCTURED_MODES`
    whose probe request (:data:`PROBE_SCHEMA`) is answered with exactly the schema's only valid object,
    else ``none``. Returns ``{"mode", "tried": {mode: outcome}, "calls", "cached"}``.

    One probe per endpoint and model: the outcome is stored in ``cache`` under a key of (base URL,
    model, parameters), so a rerun makes no probe call. An HTTP error (400/422 from most servers; 500
    from llama-cpp-python's, which reports its request validation errors that way; not retried here)
    or a reply that breaks the schema means "not supported"; a 401/403/404, an unreachable server or
    timeouts raise, as for any other call.
    """
    key = probe_key(client, params)
    hit = cache.get(key)
    if hit is not None and hit.get("mode") in (*STRUCTURED_MODES, "none"):
        return {**hit, "calls": 0, "cached": True}
    tried: dict[str, str] = {}
    mode = "none"
    calls_before = client.stats.calls
    for m in STRUCTURED_MODES:
        try:
            res = client.chat(PROBE_MESSAGES, retry_http=False,
                              **{**params, "temperature": 0.0, "response_format": response_format(m, "probe", PROBE_SCHEMA)})
        except LLMFatalError:
            raise
        except LLMCallError as exc:
            if exc.status is None:  # timeouts, connection errors after retries: the endpoint is not usable
                raise
            detail = str(exc).split(": ", 1)[-1][:120]
            tried[m] = f"refused: HTTP {exc.status} ({detail})"
            continue
        try:
            obj = json.loads((res["content"] or "").strip())
        except json.JSONDecodeError:
            obj = None
        if obj == {"rerankflow_probe": "ok"}:
            tried[m] = "honoured"
            mode = m
            break
        tried[m] = f"ignored: replied {scrub(_short(Exception(res['content'] or ''), 80))!r}"
    out = {"mode": mode, "tried": tried}
    cache.put(key, client.model, out)
    log.info("structured outputs at %s (%s): %s (%s)", scrub(client.base_url), client.model, mode,
             "; ".join(f"{k}: {v}" for k, v in tried.items()))
    return {**out, "calls": client.stats.calls - calls_before, "cached": False}
