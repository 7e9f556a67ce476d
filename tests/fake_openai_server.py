"""A fake OpenAI-compatible chat-completions server for the tests of the ``llm`` SDG backend.

It listens on 127.0.0.1 (real sockets, ``http.server`` in a thread) and answers
``POST /v1/chat/completions`` like a model that follows the prompts of
:mod:`rerankflow.sdg.prompts`: generation requests (recognised by ``"qa_pairs"`` in the first user
message) get pairs built from the numbered segments, judge requests (``"evaluations"``) get one
evaluation per listed pair. It records every request body and counts them.

Behaviour switches (attributes):

* ``inject`` — a list consumed one entry per request: ``"429"`` (with ``Retry-After``), ``"500"``,
  ``"400"``, ``"401"``, ``"html200"`` (a 200 answer that is an HTML page),
  ``"slow"`` (sleeps ``slow_seconds`` before answering), ``None`` (normal). Error bodies echo the
  request's ``Authorization`` header, as a careless proxy might, to prove the client scrubs it.
* documents whose text contains ``MALFORMED_DOC`` always get non-JSON generation replies;
  ``BADONCE_DOC``: the first generation reply is broken JSON, the corrected request gets a valid one;
  ``OFFTOPIC_DOC``: one extra pair whose question has nothing to do with its cited segment.
* every generation reply also carries one invalid pair (segment id 999), which the client must drop.
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
_PAIR = re.compile(r"^Pair (\d+):", re.M)


def _question_from(text: str, n_words: int = 14) -> str:
    words = re.findall(r"[A-Za-z][A-Za-z0-9_-]*", text)
    return "What does the documentation explain about " + " ".join(words[:n_words]) + "?"


def generation_reply(messages: list[dict]) -> dict:
    user = messages[1]["content"]
    segs = [(int(i), t) for i, t in _SEG.findall(user)]
    counts = {t: int(n) for t, n in _COUNT.findall(user)}
    rt = re.search(r"reasoning_type is one of: ([^.\n]+)\.", user).group(1).split(", ")[0]
    pairs = []
    k = 0
    for qtype in ("multi_hop", "structural", "contextual"):
        for _ in range(counts.get(qtype, 0)):
            sid, text = segs[k % len(segs)]
            if qtype == "multi_hop":
                sid2, text2 = segs[(k + 1) % len(segs)]
                cited, q, hops = [sid, sid2], _question_from(text, 8) + " and " + _question_from(text2, 6), 2
            else:
                cited, q, hops = [sid], _question_from(text), 1
            pairs.append({"question": q, "answer": text[:200], "query_type": qtype, "reasoning_type": rt,
                          "question_complexity": 3, "segment_ids": cited, "hop_count": hops})
            k += 1
    if "OFFTOPIC_DOC" in user:
        pairs.insert(0, {"question": "Which flavour of ice cream do zebras in the savanna prefer on hot afternoons?",
                      "answer": "Mango.", "query_type": "contextual", "reasoning_type": rt,
                      "question_complexity": 3, "segment_ids": [segs[0][0]], "hop_count": 1})
    pairs.append({"question": "An invalid pair citing a missing segment", "answer": "x", "query_type": "contextual",
                  "reasoning_type": rt, "question_complexity": 3, "segment_ids": [999], "hop_count": 1})
    return {"qa_pairs": pairs}


def judge_reply(messages: list[dict]) -> dict:
    n = len(_PAIR.findall(messages[1]["content"]))
    ev = {c: {"score": 8, "justification": f"fake judge: {c} is fine"}
          for c in ("relevance", "accuracy", "context_support", "clarity")}
    return {"evaluations": [dict(ev, overall={"score": 8, "assessment": "fake judge: good pair"}) for _ in range(n)]}


class FakeOpenAIServer:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []       # every request body received (in arrival order)
        self.completed: list[dict] = []      # bodies whose 200 answer was fully written
        self.auth_headers: list[str] = []
        self.times: list[float] = []         # arrival time of each request
        self.inject: list = []
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

    def count(self, kind: str | None = None, contains: str | None = None) -> int:
        with self.lock:
            reqs = list(self.requests)
        out = 0
        for b in reqs:
            first_user = b["messages"][1]["content"]
            k = "generation" if '"qa_pairs"' in first_user else "judge"
            if (kind is None or k == kind) and (contains is None or contains in first_user):
                out += 1
        return out

    def _answer(self, body: dict) -> str:
        msgs = body["messages"]
        first_user = msgs[1]["content"]
        corrected = len(msgs) > 2
        if '"qa_pairs"' in first_user:
            if "MALFORMED_DOC" in first_user:
                return "Sure! Here are the questions you asked for: {qa_pairs: [oops"
            if "BADONCE_DOC" in first_user and not corrected:
                return '```json\n{"qa_pairs": [{"question": "unterminated\n```'
            return "<think>Let me read the segments.</think>\n```json\n" + json.dumps(generation_reply(msgs)) + "\n```"
        if '"evaluations"' in first_user:
            return json.dumps(judge_reply(msgs))
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
                body = json.loads(self.rfile.read(length) or b"{}")
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
