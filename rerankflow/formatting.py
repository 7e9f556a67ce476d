"""The one definition of how text is presented to models.

* Retrieval prefixes (``Prefixes``) are used by prep's hard-negative mining *and* by eval's
  first-stage retrieval, so the two can never disagree (NVIDIA's recipe mines with
  ``query:text`` and evaluates with ``query: text``).
* The reranker prompt template (``format_pair``) is used by fine-tuning, evaluation, export
  parity checks and the ranking service.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PROMPT_TEMPLATE = "question:{query} \n \n passage:{passage}"


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


def format_pair(query: str, passage: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """Render one (query, passage) pair as the single text the cross-encoder reads."""
    return template.format(query=query, passage=passage)


@dataclass(frozen=True)
class Prefixes:
    """Instruction prefixes of a bi-encoder (e.g. ``"query: "`` / ``"passage: "``)."""

    query_prefix: str = ""
    passage_prefix: str = ""

    def query(self, text: str) -> str:
        return f"{self.query_prefix}{text}"

    def passage(self, text: str) -> str:
        return f"{self.passage_prefix}{text}"

    @classmethod
    def from_config(cls, retrieval_cfg: dict) -> "Prefixes":
        return cls(retrieval_cfg.get("query_prefix", ""), retrieval_cfg.get("passage_prefix", ""))
