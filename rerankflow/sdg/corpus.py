"""Source documents for stage 0: the embedded default corpus, a user's folder, or a Hugging Face dataset.

The embedded default is the Python documentation that ships with the interpreter: the language
reference topics of ``pydoc_data`` and the docstrings of a fixed list of standard-library modules
(module, public classes and functions), one ``.txt`` file per topic/module. It needs no network
and is deterministic for a given Python version.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from rerankflow.errors import InputError
from rerankflow.io import atomic_path, read_text

log = logging.getLogger(__name__)

# Standard-library modules whose documentation forms the embedded default corpus (sorted, fixed).
STDLIB_MODULES = (
    "abc", "argparse", "array", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "ctypes", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox", "math", "mimetypes", "multiprocessing",
    "operator", "os", "os.path", "pathlib", "pickle", "pkgutil", "platform", "pprint", "queue", "random", "re",
    "sched", "secrets", "select", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3",
    "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time",
    "timeit", "tokenize", "traceback", "types", "typing", "unicodedata", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile", "zlib",
)


@dataclass
class Document:
    """One source document: ``source_id`` is stable (file name without extension)."""

    source_id: str
    file_name: str
    text: str


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _module_text(name: str) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
    except Exception:  # a module absent from this interpreter build is skipped
        return None
    parts = [f"Module {name}", inspect.getdoc(mod) or ""]
    for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr, None)
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) not in (name, None) and not name.startswith(str(getattr(obj, "__module__", ""))):
            continue
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 40:
            kind = "class" if inspect.isclass(obj) else "function"
            parts.append(f"{name}.{attr} ({kind}): {doc}")
    text = "\n\n".join(p.strip() for p in parts if p and p.strip())
    return text


def default_corpus_documents() -> list[tuple[str, str]]:
    """``(file_name, text)`` of the embedded default corpus, in a fixed order."""
    from pydoc_data.topics import topics

    docs = []
    for topic in sorted(topics):
        docs.append((f"pydoc_topic_{_safe_name(topic)}.txt", topics[topic].strip() + "\n"))
    for name in STDLIB_MODULES:
        text = _module_text(name)
        if text:
            docs.append((f"stdlib_{_safe_name(name)}.txt", text + "\n"))
    return docs


def write_default_corpus(out_dir) -> Path:
    """Write the embedded default corpus (one ``.txt`` per topic/module) atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        n = 0
        for file_name, text in default_corpus_documents():
            (tmp / file_name).write_text(text, encoding="utf-8")
            n += 1
        (tmp / "SOURCE.txt").write_text(
            f"Python {sys.version.split()[0]} documentation: pydoc_data topics and standard-library docstrings "
            f"({n} documents), written by rerankflow.sdg.corpus.write_default_corpus.\n",
            encoding="utf-8",
        )
    log.info("wrote %d default-corpus documents to %s", n, out_dir)
    return out_dir


def parse_hf_uri(uri: str) -> tuple[str, str | None, str]:
    """``hf://org/dataset[@revision]/subdir`` -> ``(repo_id, revision, subdir)``."""
    m = re.fullmatch(r"hf://([^/@]+/[^/@]+)(?:@([^/]+))?(?:/(.*))?", uri.strip())
    if not m:
        raise InputError(f"{uri!r} is not a valid Hugging Face URI; expected hf://org/dataset[@revision]/subdir", key="corpus.dir")
    return m.group(1), m.group(2), (m.group(3) or "").strip("/")


def fetch_hf_corpus(uri: str, cache_dir=None) -> Path:
    """Download the files under ``subdir`` of a Hugging Face dataset repo; return the local folder."""
    repo_id, revision, subdir = parse_hf_uri(uri)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=repo_id, repo_type="dataset", revision=revision,
            allow_patterns=[f"{subdir}/**"] if subdir else None, cache_dir=cache_dir,
        )
    except Exception as exc:
        raise InputError(
            f"could not fetch {uri} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Without network access (or with HF_HUB_OFFLINE=1) point corpus.dir at a local folder instead",
            key="corpus.dir",
        ) from None
    return Path(local) / subdir if subdir else Path(local)


def load_documents(corpus_dir, file_extensions: Sequence[str], min_text_length: int,
                   max_documents: int) -> list[Document]:
    """Read every file with one of ``file_extensions`` under ``corpus_dir`` (recursively, sorted).

    ``corpus_dir`` may also be a BEIR ``corpus.jsonl`` file (one document per row, see
    :func:`load_jsonl_documents`), so a labelled benchmark's corpus can feed SDG.

    Files shorter than ``min_text_length`` characters are skipped; ``max_documents`` > 0 keeps the
    first N in path order. A missing or empty folder, or a non-UTF-8 file, raises InputError.
    """
    if str(corpus_dir).startswith("hf://"):
        corpus_dir = fetch_hf_corpus(str(corpus_dir))
    if Path(corpus_dir).is_file() and str(corpus_dir).endswith(".jsonl"):
        return load_jsonl_documents(corpus_dir, min_text_length, max_documents)
    root = Path(corpus_dir)
    if not root.is_dir():
        raise InputError("corpus folder does not exist; expected a folder of .txt/.md/.text files", path=root, key="corpus.dir")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in file_extensions}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts and p.name != "SOURCE.txt")
    if not files:
        raise InputError(f"corpus folder holds no files ending in {sorted(exts)}", path=root, key="corpus.dir")
    docs: list[Document] = []
    skipped = 0
    for f in files:
        text = read_text(f)
        if len(text.strip()) < min_text_length:
            skipped += 1
            continue
        rel = f.relative_to(root)
        docs.append(Document(source_id=_safe_name(str(rel.with_suffix(""))), file_name=str(rel), text=text))
        if max_documents and len(docs) >= max_documents:
            break
    if not docs:
        raise InputError(
            f"no document in the corpus folder reaches corpus.min_text_length={min_text_length} characters "
            f"({skipped} shorter files skipped)", path=root, key="corpus.min_text_length")
    if skipped:
        log.warning("skipped %d documents shorter than %d characters", skipped, min_text_length)
    return docs


def documents_from_config(corpus_dir, corpus_cfg: Mapping) -> list[Document]:
    """:func:`load_documents` with the settings of a validated ``corpus`` section."""
    return load_documents(corpus_dir, corpus_cfg["file_extensions"], int(corpus_cfg["min_text_length"]),
                          int(corpus_cfg["max_documents"]))


def load_jsonl_documents(path, min_text_length: int, max_documents: int) -> list[Document]:
    """Documents from a BEIR-style ``corpus.jsonl``: one row ``{"_id", "title"?, "text"}`` per document.

    The document text is ``title`` and ``text`` separated by a blank line; ``source_id`` is the row's
    ``_id``, so SDG questions stay traceable to the corpus entry they came from.
    """
    from rerankflow.io import iter_jsonl_numbered

    docs: list[Document] = []
    skipped = 0
    for lineno, row in iter_jsonl_numbered(path):
        if "_id" not in row or not isinstance(row.get("text"), str):
            raise InputError("corpus row needs '_id' and a string 'text'", path=path, line=lineno)
        title = (row.get("title") or "").strip()
        text = f"{title}\n\n{row['text'].strip()}" if title else row["text"].strip()
        if len(text) < min_text_length:
            skipped += 1
            continue
        docs.append(Document(source_id=_safe_name(str(row["_id"])), file_name=f"{Path(path).name}#{row['_id']}", text=text))
        if max_documents and len(docs) >= max_documents:
            break
    if not docs:
        raise InputError(f"no corpus row reaches corpus.min_text_length={min_text_length} characters "
                         f"({skipped} shorter rows skipped)", path=path, key="corpus.min_text_length")
    return docs
