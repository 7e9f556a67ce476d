"""A fake OpenAI-compatible chat-completions server for the tests of the ``llm`` SDG backend.

It listens on 127.0.0.1 (real sockets, ``http.server`` in a thread) and answers
``POST /v1/chat/completions`` like a model that follows the prompts of
:mod:`rerankflow.sdg.prompts`: generation requests (recognised by ``"qa_pairs"`` in the first user
message) get pairs built from the numbered segments, in the query forms asked for; query-judge
(``"query_evaluations"``) and answer-judge (``"answer_evaluations"``) requests get one evaluation per
listed query. It records every request body and counts them.

Structured outputs (``structured``): ``"both"`` (default, like vLLM: honours OpenAI's
``{"type": "json_schema"}`` and ``{"type": "json_object", "schema"}``), ``"json_object"`` (like
llama-cpp-python's server: HTTP 422 for ``json_schema``), ``"ignore"`` (accepts the field and ignores
it), ``"refuse"`` (HTTP 400 for any ``response_format``). An honoured request gets bare JSON (no
``<think>`` block, no code fence); the probe request (no marker) gets the schema's only valid object.

Behaviour switches (attributes):

* ``inject`` — a list consumed one entry per request: ``"429"`` (with ``Retry-After``), ``"500"``,
  ``"400"``, ``"401"``, ``"html200"`` (a 200 answer that is an HTML page),
  ``"slow"`` (sleeps ``slow_seconds`` before answering), ``None`` (normal). Error bodies echo the
  request's ``Authorization`` header, as a careless proxy might, to prove the client scrubs it.
* documents whose text contains ``MALFORMED_DOC`` always get non-JSON generation replies;
  ``BADONCE_DOC``: the first generation reply is broken JSON, the corrected request gets a valid one;
  ``OFFTOPIC_DOC``: one extra pair whose question has nothing to do with its cited segment.
* every generation reply also carries one invalid pair (segment id 999), which the client must drop.
* ``REJECTS_DOC``: the first five pairs each break one deterministic check of
  :mod:`rerankflow.sdg.checks` (source-relative wording, answer in the query, "not specified" answer,
  numeric answer repeated in the query, a "question" without "?"), in that order.
* ``delay`` — seconds to wait before every answer.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_SEG = re.compile(r"^\[Segment (\d+)\] (.*)$", re.M)
_COUNT = re.compile(r"^- (multi_hop|structural|contextual) questions: (\d+)", re.M)
_FORM = re.compile(r"^- (question|instruction|keyword): (\d+)", re.M)
_QUERY = re.compile(r"^Query (\d+): (.*)$", re.M)
_CITED = re.compile(r"^cited segments: \[([\d, ]*)\]", re.M)
BAD_PAIRS = [  # (question, answer): each fails one check, in the order of rerankflow.sdg.checks.CHECKS
    ("What does the table above list about the module?", "Its functions."),
    ("How does the sort method order a list in place?", "the sort method"),
    ("Which function writes JSON text to a file object?", "Not specified in the documentation."),
    ("Which protocol version shipped in 2019 with the module?", "2019 version 3"),
    ("json module dumps function string output explained for beginners", "dumps returns a string."),
]


def _words(text: str, n_words: int) -> str:
    return " ".join(re.findall(r"[A-Za-z][A-Za-z0-9_-]*", text)[:n_words])


def _question_from(text: str, n_words: int = 14) -> str:
    return "What does the documentation explain about " + _words(text, n_words) + "?"


def _query(form: str, text: str, n_words: int = 14) -> str:
    if form == "instruction":
        return "Explain what the documentation says about " + _words(text, n_words) + "."
    if form == "keyword":
        return _words(text, min(n_words, 7))
    return _question_from(text, n_words)


def generation_reply(messages: list[dict]) -> dict:
    user = messages[1]["content"]
    segs = [(int(i), t) for i, t in _SEG.findall(user)]
    counts = {t: int(n) for t, n in _COUNT.findall(user)}
    forms = [f for f, n in _FORM.findall(user) for _ in range(int(n))] or ["question"] * sum(counts.values())
    rt = re.search(r"reasoning_type is one of: ([^.\n]+)\.", user).group(1).split(", ")[0]
    pairs = []
    k = 0
    for qtype in ("multi_hop", "structural", "contextual"):
        for _ in range(counts.get(qtype, 0)):
            sid, text = segs[k % len(segs)]
            form = forms[k % len(forms)]
            if qtype == "multi_hop":
                sid2, text2 = segs[(k + 1) % len(segs)]
                q = _question_from(text, 8)[:-1] + " and " + _words(text2, 6) + "?"
                if form != "question":
                    q = _query(form, text + " " + text2, 12)
                cited, hops = [sid, sid2], 2
            else:
                cited, q, hops = [sid], _query(form, text), 1
            pairs.append({"question": q, "answer": text[:200], "query_type": qtype, "query_form": form,
                          "reasoning_type": rt, "question_complexity": 3, "segment_ids": cited, "hop_count": hops})
            k += 1
    if "REJECTS_DOC" in user:
        for p, (q, a) in zip(pairs, BAD_PAIRS):
            p.update(question=q, answer=a, query_form="question")
    if "OFFTOPIC_DOC" in user:
        pairs.insert(0, {"question": "Which flavour of ice cream do zebras in the savanna prefer on hot afternoons?",
                      "answer": "Mango.", "query_type": "contextual", "query_form": "question", "reasoning_type": rt,
                      "question_complexity": 3, "segment_ids": [segs[0][0]], "hop_count": 1})
    pairs.append({"question": "An invalid pair citing a missing segment?", "answer": "It cites segment 999.", "query_type": "contextual",
                  "query_form": "question", "reasoning_type": rt, "question_complexity": 3, "segment_ids": [999], "hop_count": 1})
    return {"qa_pairs": pairs}


def query_judge_reply(messages: list[dict]) -> dict:
    n = len(_QUERY.findall(messages[1]["content"]))
    ev = {c: {"score": 8, "justification": f"fake judge: {c} is fine"} for c in ("standalone", "plausible", "discriminative")}
    return {"query_evaluations": [ev for _ in range(n)]}


def answer_judge_reply(messages: list[dict]) -> dict:
    """Scores plus the judge's own answer: the first words of the first cited segment (so it agrees
    with the generated answer, which the fake takes from the same segment)."""
    user = messages[1]["content"]
    segs = {int(i): t for i, t in _SEG.findall(user)}
    out = []
    for cited in _CITED.findall(user):
        ids = [int(x) for x in cited.split(",") if x.strip()]
        own = _words(segs.get(ids[0], ""), 10) if ids else "not answerable"
        out.append({"relevance": {"score": 9, "justification": "fake judge: on topic"},
                    "context_support": {"score": 8, "justification": "fake judge: the segments answer it"},
                    "answer": own})
    return {"answer_evaluations": out}


def kind_of(body: dict) -> str:
    """``generation``, ``query_judge``, ``answer_judge`` or ``probe`` (anything else)."""
    first_user = next((m["content"] for m in body["messages"] if m["role"] == "user"), "")
    if '"qa_pairs"' in first_user:
        return "generation"
    if '"query_evaluations"' in first_user:
        return "query_judge"
    if '"answer_evaluations"' in first_user:
        return "answer_judge"
    return "probe"


class FakeOpenAIServer:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []       # every request body received (in arrival order)
        self.completed: list[dict] = []      # bodies whose 200 answer was fully written
        self.auth_headers: list[str] = []
        self.times: list[float] = []         # arrival time of each request
        self.inject: list = []
        self.structured = "both"
        self.retry_after = "1"
        self.slow_seconds = 2.0
        self.delay = 0.0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.completed.clear()
            self.auth_headers.clear()
            self.times.clear()
            self.inject = []
            self.delay = 0.0
            self.structured = "both"

    def count(self, kind: str | None = None, contains: str | None = None) -> int:
        with self.lock:
            reqs = list(self.requests)
        out = 0
        for b in reqs:
            first_user = next((m["content"] for m in b["messages"] if m["role"] == "user"), "")
            k = kind_of(b)
            if kind == "judge" and k in ("query_judge", "answer_judge"):
                k = "judge"
            if (kind is None or k == kind) and (contains is None or contains in first_user):
                out += 1
        return out

    def honours(self, body: dict) -> bool:
        rf = body.get("response_format")
        if not rf or self.structured == "ignore":
            return False
        if self.structured == "json_object":
            return rf.get("type") == "json_object"
        return rf.get("type") in ("json_schema", "json_object")

    def _answer(self, body: dict) -> str:
        msgs = body["messages"]
        first_user = next((m["content"] for m in msgs if m["role"] == "user"), "")
        corrected = len(msgs) > 2
        structured = self.honours(body)
        kind = kind_of(body)
        if kind == "generation":
            if "MALFORMED_DOC" in first_user:
                return "Sure! Here are the questions you asked for: {qa_pairs: [oops"
            if "BADONCE_DOC" in first_user and not corrected:
                return '```json\n{"qa_pairs": [{"question": "unterminated\n```'
            if structured:
                return json.dumps(generation_reply(msgs))
            return "<think>Let me read the segments.</think>\n```json\n" + json.dumps(generation_reply(msgs)) + "\n```"
        if kind == "query_judge":
            return json.dumps(query_judge_reply(msgs))
        if kind == "answer_judge":
            return json.dumps(answer_judge_reply(msgs))
        if structured:  # the structured-output probe
            return json.dumps({"rerankflow_probe": "ok"})
        return "I do not understand this request."

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, obj: dict, headers: dict | None = None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                try:  # a client killed mid-request leaves a short or empty body
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    body = {}
                if not isinstance(body, dict) or "messages" not in body:
                    self._send(400, {"error": {"message": "no messages in the request body"}})
                    return
                auth = self.headers.get("Authorization", "")
                if not self.path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with server.lock:
                    server.requests.append(body)
                    server.auth_headers.append(auth)
                    server.times.append(time.monotonic())
                    action = server.inject.pop(0) if server.inject else None
                    delay = server.delay
                if action == "429":
                    self._send(429, {"error": {"message": f"rate limited (you sent {auth})", "type": "rate_limit"}},
                               {"Retry-After": server.retry_after})
                    return
                if action in ("400", "401"):
                    self._send(int(action), {"error": {"message": f"rejected request with credentials {auth}"}})
                    return
                if action == "html200":  # a misconfigured proxy: 200 with an HTML page
                    data = b"<html><body>Gateway login page</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                rf = body.get("response_format")
                if rf and (server.structured == "refuse"
                           or (server.structured == "json_object" and rf.get("type") != "json_object")):
                    self._send(400 if server.structured == "refuse" else 422,
                               {"error": {"message": f"response_format {rf.get('type')!r} is not supported"}})
                    return
                if action == "500":
                    self._send(500, {"error": {"message": f"upstream failure for credentials {auth}"}})
                    return
                if action == "slow":
                    time.sleep(server.slow_seconds)
                if delay:
                    time.sleep(delay)
                content = server._answer(body)
                reply = {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "fake"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
                }
                try:
                    self._send(200, reply)
                except (BrokenPipeError, ConnectionResetError):
                    return
                with server.lock:
                    server.completed.append(body)

        return Handler
