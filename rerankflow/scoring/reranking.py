"""Second-stage scoring: a cross-encoder checkpoint in torch, or a served ``/v1/ranking`` endpoint.

Both return **raw logits** (no sigmoid), one per (query, passage) pair, so scores of the
checkpoint and of the endpoint serving it are directly comparable.

* :class:`CrossEncoderScorer` loads any Hugging Face checkpoint that
  ``AutoModelForSequenceClassification`` reads. Pairs are tokenized once in the model's input
  format (:func:`rerankflow.formatting.tokenize_pairs`: the shared prompt template as one text, or
  a BERT sentence pair) with truncation at ``max_length`` (the end of the passage is cut, like the
  endpoint's ``truncate: END``), then batched **sorted by token length** so each batch pads only to
  its own longest member. bf16 autocast is used on CUDA when asked.
* :class:`EndpointRanker` sends a query's candidates to an NVIDIA-NIM-shaped ``POST /v1/ranking``
  (``{"model", "query": {"text"}, "passages": [{"text"}], "truncate"}`` ->
  ``{"rankings": [{"index", "logit"}]}``) in batches of ``batch_size`` passages, with up to
  ``concurrency`` requests in flight, retrying 429/5xx/timeouts with backoff.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np

from rerankflow.beir import passage_text
from rerankflow.formatting import INPUT_FORMATS  # noqa: F401  (importable from here too; defined in formatting)
from rerankflow.formatting import DEFAULT_PROMPT_TEMPLATE, check_input_format, check_template, tokenize_pairs
from rerankflow.models import pick_device

log = logging.getLogger(__name__)


def _tqdm(iterable=None, **kw):
    from tqdm.auto import tqdm

    kw.setdefault("mininterval", 2.0)
    return tqdm(iterable, **kw)


class CrossEncoderScorer:
    """Score (query, passage) pairs with a sequence-classification checkpoint.

    ``score(pairs)`` returns a float32 array of raw logits aligned with ``pairs``. With one output
    label the logit is that label's; with two (a binary classifier) it is the positive-class logit
    minus the negative-class logit, which ranks identically to the positive-class probability.

    ``input_format`` (:data:`rerankflow.formatting.INPUT_FORMATS`): ``"template"`` (default) renders
    each pair with the prompt template into one text; ``"pair"`` encodes ``(query, passage)`` as a
    BERT sentence pair (``[CLS] q [SEP] p [SEP]``, segment ids 0/1), the format off-the-shelf MS
    MARCO cross-encoders were trained with. Score a fine-tuned checkpoint in the
    ``reranker.input_format`` it was trained with (its ``rerankflow.json`` records it), and a base
    model the way it is normally used.
    """

    def __init__(self, model_path, max_length: int = 512, template: str = DEFAULT_PROMPT_TEMPLATE,
                 device: str = "auto", bf16: bool = False, batch_size: int = 32, threads: int | None = None,
                 input_format: str = "template"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if threads:
            torch.set_num_threads(int(threads))
        self.model_path = str(model_path)
        self.template = check_template(template)
        self.input_format = check_input_format(input_format)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_path)
        self.model.to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.num_labels = int(self.model.config.num_labels)
        if self.num_labels not in (1, 2):
            raise ValueError(f"{self.model_path}: a reranker needs 1 (or 2) output labels, this checkpoint has {self.num_labels}")
        self.bf16 = bool(bf16) and self.device.startswith("cuda")
        if bf16 and not self.bf16:
            log.info("bf16 requested but device is %s: scoring in fp32", self.device)

    def _logits(self, batch_ids: list[list[int]], batch_types: list[list[int]] | None = None) -> np.ndarray:
        import torch

        width = max(len(x) for x in batch_ids)
        input_ids = torch.full((len(batch_ids), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch_ids), width), dtype=torch.long)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        types = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for row, ids in enumerate(batch_ids):  # pad on the tokenizer's side
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention[row, span] = 1
            if batch_types is not None:
                types[row, span] = torch.tensor(batch_types[row], dtype=torch.long)
        enc = {"input_ids": input_ids, "attention_mask": attention}
        if "token_type_ids" in self.tokenizer.model_input_names:
            # template: one text segment, all zeros (what the tokenizer gives a single text);
            # pair: the tokenizer's segment ids
            enc["token_type_ids"] = types
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            if self.bf16:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = self.model(**enc).logits
            else:
                logits = self.model(**enc).logits
        logits = logits.float()
        if self.num_labels == 1:
            out = logits[:, 0]
        else:
            out = logits[:, 1] - logits[:, 0]
        return out.cpu().numpy().astype(np.float32)

    def encode(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]] | None]:
        """Token ids (truncated at ``max_length``, unpadded) and segment ids (``pair`` format only)."""
        pair = self.input_format == "pair"
        enc = tokenize_pairs(self.tokenizer, [q for q, _p in pairs], [p for _q, p in pairs],
                             input_format=self.input_format, template=self.template, max_length=self.max_length,
                             padding=False, return_attention_mask=False, return_token_type_ids=pair)
        return enc["input_ids"], (enc.get("token_type_ids") if pair else None)

    def tokenize(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Token ids of each pair as the model reads it (see :meth:`encode`)."""
        return self.encode(pairs)[0]

    def score(self, pairs: Sequence[tuple[str, str]], sort_by_length: bool = True, progress: bool = True,
              desc: str = "rerank") -> np.ndarray:
        """Raw logits for ``pairs`` (aligned with the input order)."""
        n = len(pairs)
        scores = np.zeros(n, dtype=np.float32)
        if n == 0:
            return scores
        ids, types = self.encode(pairs)
        order = np.argsort([-len(x) for x in ids], kind="stable") if sort_by_length else np.arange(n)
        bs = self.batch_size
        starts = range(0, n, bs)
        it = _tqdm(starts, desc=desc, unit="batch", total=len(starts), disable=not progress)
        for start in it:
            idx = order[start:start + bs]
            scores[idx] = self._logits([ids[i] for i in idx], [types[i] for i in idx] if types is not None else None)
        return scores


def candidate_pairs(run: Mapping[str, Mapping[str, float]], queries: Mapping[str, str],
                    corpus: Mapping[str, dict]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Flatten a first-stage run into ``(keys [(qid, doc_id)], pairs [(query, passage text)])``."""
    keys, pairs = [], []
    for qid, docs in run.items():
        for did in docs:
            keys.append((qid, did))
            pairs.append((queries[qid], passage_text(corpus[did])))
    return keys, pairs


# --------------------------------------------------------------------------------------------
# Served endpoint


class EndpointError(RuntimeError):
    """The ranking endpoint could not be reached or answered something unusable."""


def ranking_url(endpoint: str) -> str:
    """Accept a base URL (``http://host:8000``, ``.../v1``) or the full ``.../v1/ranking`` URL."""
    url = endpoint.rstrip("/")
    if url.endswith("/ranking") or url.endswith("/reranking"):
        return url
    if url.endswith("/v1"):
        return url + "/ranking"
    return url + "/v1/ranking"


class EndpointRanker:
    """Client of a served ``POST /v1/ranking`` (NVIDIA NIM request/response shape).

    ``api_key_env`` names an environment variable whose value is sent as a bearer token; the
    key itself is never logged or written anywhere.
    """

    RETRY_STATUS = {408, 429, 500, 502, 503, 504}

    def __init__(self, endpoint: str, model: str, batch_size: int = 64, concurrency: int = 4, timeout: float = 60.0,
                 truncate: str = "END", retries: int = 3, api_key_env: str | None = None):
        import httpx

        self.url = ranking_url(endpoint)
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.concurrency = max(1, int(concurrency))
        self.truncate = truncate
        self.retries = int(retries)
        headers = {"accept": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise EndpointError(f"eval.endpoint_api_key_env names {api_key_env!r}, which is not set in the environment")
            headers["authorization"] = f"Bearer {key}"
        self._client = httpx.Client(timeout=timeout, headers=headers,
                                    limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency))

    def close(self):
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def rank(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """Logits of ``passages`` for ``query`` in one request, aligned with ``passages``."""
        import httpx

        body = {"model": self.model, "query": {"text": query}, "passages": [{"text": p} for p in passages],
                "truncate": self.truncate}
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                resp = self._client.post(self.url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if attempt == self.retries:
                    raise EndpointError(f"POST {self.url} failed after {attempt + 1} attempts: {exc!r}") from None
                time.sleep(delay)
                delay *= 2
                continue
            if resp.status_code in self.RETRY_STATUS and attempt < self.retries:
                time.sleep(delay)
                delay *= 2
                continue
            if resp.status_code != 200:
                raise EndpointError(f"POST {self.url} answered HTTP {resp.status_code}: {resp.text[:300]}")
            return self._parse(resp, len(passages))
        raise EndpointError(f"POST {self.url}: no answer")  # pragma: no cover

    def _parse(self, resp, n: int) -> np.ndarray:
        try:
            rankings = resp.json()["rankings"]
            scores = np.full(n, np.nan, dtype=np.float64)
            for r in rankings:
                scores[int(r["index"])] = float(r["logit"])
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise EndpointError(f"POST {self.url}: response is not {{'rankings': [{{'index', 'logit'}}]}} for {n} passages ({exc!r}): {resp.text[:300]}") from None
        if np.isnan(scores).any():
            missing = [int(i) for i in np.flatnonzero(np.isnan(scores))[:5]]
            raise EndpointError(f"POST {self.url}: response lacks rankings for passage indexes {missing} (of {n})")
        return scores.astype(np.float32)

    def rerank_run(self, run, queries, corpus, desc: str = "endpoint") -> dict:
        """Score every candidate of ``run`` through the endpoint; returns ``{qid: {doc_id: logit}}``."""
        jobs = []
        for qid, docs in run.items():
            dids = list(docs)
            for start in range(0, len(dids), self.batch_size):
                chunk = dids[start:start + self.batch_size]
                jobs.append((qid, chunk))
        out: dict[str, dict[str, float]] = {qid: {} for qid in run}

        def work(job):
            qid, chunk = job
            return qid, chunk, self.rank(queries[qid], [passage_text(corpus[d]) for d in chunk])

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for qid, chunk, scores in _tqdm(pool.map(work, jobs), total=len(jobs), desc=desc, unit="req"):
                for did, s in zip(chunk, scores):
                    out[qid][did] = float(s)
        return out
