"""The one definition of how text is presented to models.

* Retrieval prefixes (``Prefixes``) are used by prep's hard-negative mining *and* by eval's
  first-stage retrieval, so the two can never disagree (NVIDIA's recipe mines with
  ``query:text`` and evaluates with ``query: text``).
* The reranker input format (``reranker.input_format``, :data:`INPUT_FORMATS`) says how a
  (query, passage) pair is shown to the cross-encoder, by fine-tuning, evaluation, export parity
  checks and the ranking service alike:

  - ``template`` (default): the pair is rendered with ``reranker.prompt_template``
    (:func:`format_pair`, NVIDIA's ``"question:{query} \\n \\n passage:{passage}"``) into ONE text,
    tokenized as a single sequence (``[CLS] text [SEP]``, segment ids all 0);
  - ``pair``: the query and the passage are tokenized as a BERT sentence pair
    (``tokenizer(query, passage)`` -> ``[CLS] query [SEP] passage [SEP]``, segment ids 0 then 1),
    the format off-the-shelf MS MARCO cross-encoders (e.g. ms-marco-MiniLM-L-12-v2) were trained
    in, and sentence-transformers' ``CrossEncoder.predict([(query, passage)])``. The prompt
    template is not used.

  :func:`tokenize_pairs` tokenizes pairs with a ``transformers`` tokenizer and
  :func:`tokenizer_input` gives what a raw ``tokenizers.Tokenizer`` encodes for one pair; both
  truncate at ``max_length`` tokens, special tokens included (``longest_first``: the longer
  side, in practice the passage, loses tokens from its end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

DEFAULT_PROMPT_TEMPLATE = "question:{query} \n \n passage:{passage}"
INPUT_FORMATS = ("template", "pair")
# What a record (a run spec, a checkpoint's rerankflow.json, an export record) written before
# reranker.input_format existed means: every such model was trained and exported in ``template``.
# It is not the configured default (config/schema.yaml, reranker.input_format), which is ``pair``.
UNRECORDED_INPUT_FORMAT = "template"


def check_template(template: str) -> str:
    """Return ``template`` if it has exactly the ``{query}`` and ``{passage}`` fields, else raise."""
    try:
        template.format(query="q", passage="p")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"reranker.prompt_template {template!r} is invalid ({exc!r}); "
            "expected a string using only the fields {query} and {passage}"
        ) from None
    if "{query}" not in template or "{passage}" not in template:
        raise ValueError(f"reranker.prompt_template {template!r} must contain both {{query}} and {{passage}}")
    return template


def check_input_format(fmt: str) -> str:
    """Return ``fmt`` if it is one of :data:`INPUT_FORMATS`, else raise a ValueError naming the key."""
    if fmt not in INPUT_FORMATS:
        raise ValueError(
            f"reranker.input_format must be one of {', '.join(INPUT_FORMATS)} "
            f"(template = the prompt template as one text, pair = a BERT sentence pair), got {fmt!r}"
        )
    return fmt


def format_pair(query: str, passage: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """Render one (query, passage) pair as the single text the cross-encoder reads (``template`` format)."""
    return template.format(query=query, passage=passage)


def tokenizer_input(query: str, passage: str, *, input_format: str,
                    template: str = DEFAULT_PROMPT_TEMPLATE) -> str | tuple[str, str]:
    """What a ``tokenizers.Tokenizer`` encodes for one pair: the formatted text (``template``) or the
    ``(query, passage)`` sequence pair (``pair``), which its post-processor turns into
    ``[CLS] query [SEP] passage [SEP]`` with segment ids 0/1, as :func:`tokenize_pairs` does."""
    if check_input_format(input_format) == "pair":
        return (query, passage)
    return format_pair(query, passage, template)


def tokenize_pairs(tokenizer, queries: Sequence[str], passages: Sequence[str], *, input_format: str,
                   template: str = DEFAULT_PROMPT_TEMPLATE, max_length: int | None, **tokenizer_kwargs):
    """Tokenize aligned ``queries``/``passages`` with a ``transformers`` tokenizer in ``input_format``.

    ``template``: ``tokenizer([format_pair(q, p, template), ...])``; ``pair``:
    ``tokenizer(queries, passages)``. Always ``truncation=True`` at ``max_length`` tokens (None:
    the tokenizer's ``model_max_length``); other keyword arguments (padding, return_tensors, ...)
    are passed through. Returns the tokenizer's ``BatchEncoding``.
    """
    check_input_format(input_format)
    queries, passages = list(queries), list(passages)
    if len(queries) != len(passages):
        raise ValueError(f"{len(queries)} queries but {len(passages)} passages; pairs must be aligned")
    if input_format == "pair":
        return tokenizer(queries, passages, truncation=True, max_length=max_length, **tokenizer_kwargs)
    texts = [format_pair(q, p, template) for q, p in zip(queries, passages)]
    return tokenizer(texts, truncation=True, max_length=max_length, **tokenizer_kwargs)


def pair_overhead(tokenizer, *, input_format: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> int:
    """Tokens a pair has besides its query's and passage's own: the special tokens (and, in
    ``template`` format, the template's words) of an empty pair."""
    enc = tokenize_pairs(tokenizer, [""], [""], input_format=input_format, template=template, max_length=None)
    return len(enc["input_ids"][0])


@dataclass(frozen=True)
class Prefixes:
    """Instruction prefixes of a bi-encoder (e.g. ``"query: "`` / ``"passage: "``)."""

    query_prefix: str
    passage_prefix: str

    def query(self, text: str) -> str:
        return f"{self.query_prefix}{text}"

    def passage(self, text: str) -> str:
        return f"{self.passage_prefix}{text}"

    @classmethod
    def from_config(cls, retrieval_cfg: dict) -> "Prefixes":
        """The prefixes of a validated ``retrieval`` section."""
        return cls(retrieval_cfg["query_prefix"], retrieval_cfg["passage_prefix"])
