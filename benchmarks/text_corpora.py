"""Real (query, document) text corpora for the text-retrieval suite, built offline.

Every corpus is a table with one row per document: ``doc_id``, ``query``, ``doc``
(one query per document, documents deduplicated by text). Built once,
deterministically, and cached as Parquet under ``$TFDSSM_CACHE/bench-text`` (default
``~/.cache/tfdssm/bench-text``); never committed.

* ``stdlib``: the Python standard library's docstrings. Query
  ``"module.qualname: first line"``, document = the rest of the docstring.
* ``manpages``: Debian's ``manpages`` and ``manpages-dev`` (sections 2-7). Query =
  the NAME line, document = the DESCRIPTION section, roff stripped by
  :mod:`benchmarks.roff`.
* ``debian``: Debian package descriptions (bookworm ``main``, English
  translations from apt's lists). Query ``"package: short description"``,
  document = the long description.
"""

from __future__ import annotations

import gzip
import inspect
import json
import logging
import os
import pathlib
import pkgutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from benchmarks import roff

logger = logging.getLogger(__name__)

VERSION = 1  # bump when a builder changes, to rebuild cached corpora
MIN_DOC_CHARS = 40
MIN_DOC_WORDS = 6
MAX_DOC_CHARS = 4000  # long man pages: keep the first 4,000 characters

# Top-level standard library modules not imported: GUI, tests, IDLE, modules
# with side effects on import (opening a browser, printing), or deprecated
# shims that only warn.
STDLIB_SKIP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
    "lib2to3", "ensurepip", "pydoc_data", "__hello__", "__phello__", "xxsubtype",
    "xxlimited", "xxlimited_35", "msilib", "winreg", "winsound", "_winapi",
    "msvcrt", "nt", "nturl2path", "_msi", "_overlapped", "curses", "readline",
    "sre_compile", "sre_constants", "sre_parse", "asynchat", "asyncore", "smtpd",
    "imp", "distutils", "crypt", "nis", "spwd", "ossaudiodev",
    "sqlite3", "dbm", "venv",
})
SUBMODULE_SKIP = ("test", "tests", "idle_test", "__main__")


def cache_dir() -> pathlib.Path:
    """``$TFDSSM_CACHE/bench-text`` (default ``~/.cache/tfdssm/bench-text``)."""
    root = os.environ.get("TFDSSM_CACHE")
    base = pathlib.Path(root).expanduser() if root else (
        pathlib.Path.home() / ".cache" / "tfdssm")
    return base / "bench-text"


def load(name: str, rebuild: bool = False) -> pd.DataFrame:
    """The corpus ``name`` (``stdlib``, ``manpages`` or ``debian``), cached.

    Raises:
        RuntimeError: the corpus's source is not installed (with how to get it).
    """
    builders: dict[str, Callable[[], pd.DataFrame]] = {
        "stdlib": build_stdlib, "manpages": build_manpages, "debian": build_debian}
    python = f"-py{sys.version_info[0]}{sys.version_info[1]}"
    suffix = python if name == "stdlib" else ""
    path = cache_dir() / f"{name}{suffix}-v{VERSION}.parquet"
    if path.exists() and not rebuild:
        return pd.read_parquet(path)
    frame = builders[name]()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)
    logger.info("built corpus %s: %d documents -> %s", name, len(frame), path)
    return frame


def to_frame(records: Iterable[tuple[str, str, str]]) -> pd.DataFrame:
    """Normalises and deduplicates ``(doc_id, query, doc)`` records.

    Whitespace is collapsed, too-short documents are dropped, long ones cut to
    :data:`MAX_DOC_CHARS`; a record whose id, document text or query was seen
    before is dropped (the first wins), so every query has exactly one relevant
    document.
    """
    seen_docs: set[str] = set()
    seen_queries: set[str] = set()
    seen_ids: set[str] = set()
    rows = []
    for doc_id, query, doc in records:
        query = " ".join(query.split())
        doc = " ".join(doc.split())[:MAX_DOC_CHARS]
        if (len(doc) < MIN_DOC_CHARS or len(doc.split()) < MIN_DOC_WORDS
                or not query or doc in seen_docs or query in seen_queries
                or doc_id in seen_ids):
            continue
        seen_ids.add(doc_id)
        seen_docs.add(doc)
        seen_queries.add(query)
        rows.append((doc_id, query, doc))
    return pd.DataFrame(rows, columns=["doc_id", "query", "doc"])


# --- Python standard library docstrings -------------------------------------


def stdlib_records(modules: Iterable[str]) -> Iterator[tuple[str, str, str]]:
    """``(doc_id, query, doc)`` for the docstrings of the given modules.

    Walks each module (and its public submodules), its public functions and
    classes defined there (or in a C module it re-exports), and the classes'
    public methods and properties. The query's text is the docstring's first
    line (continued up to 3 lines while the sentence runs on).
    Imports the modules: call it in a subprocess for untrusted module lists.
    """
    import importlib  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    for top in modules:
        for module_name in _walk_modules(top):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    module = importlib.import_module(module_name)
                except BaseException:  # noqa: BLE001 (optional C modules, platforms)
                    continue
            yield from _module_records(module)


def _walk_modules(top: str) -> Iterator[str]:
    import importlib  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    yield top
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(top)
        except BaseException:  # noqa: BLE001
            return
    path = getattr(module, "__path__", None)
    if not path:
        return
    names = []
    for info in pkgutil.iter_modules(path, prefix=f"{top}."):
        last = info.name.rsplit(".", 1)[1]
        if last.startswith("_") or last in SUBMODULE_SKIP:
            continue
        names.append(info.name)
    for name in sorted(names):
        yield from _walk_modules(name)


def _module_records(module: object) -> Iterator[tuple[str, str, str]]:
    name = module.__name__
    yield from _doc_record(name, "", module)
    for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if attr.startswith("_") or not _defined_in(obj, name):
            continue
        if inspect.isclass(obj):
            yield from _doc_record(name, attr, obj)
            for member in sorted(vars(obj)):
                if member.startswith("_"):
                    continue
                value = vars(obj)[member]
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if (inspect.isfunction(value) or inspect.ismethoddescriptor(value)
                        or isinstance(value, property)
                        or inspect.isbuiltin(value)):
                    yield from _doc_record(name, f"{attr}.{member}", value)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield from _doc_record(name, attr, obj)


def _defined_in(obj: object, module: str) -> bool:
    """Defined in ``module``, or in a C accelerator it re-exports (``_io``,
    ``posix``, ``_collections`` ...)."""
    origin = getattr(obj, "__module__", None)
    return isinstance(origin, str) and (
        origin == module or origin.startswith("_") or origin == "posix")


def _doc_record(module: str, qualname: str, obj: object
                ) -> Iterator[tuple[str, str, str]]:
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return
    lines = inspect.cleandoc(doc).strip().splitlines()
    # The summary: the first line, continued while it runs on (no blank line,
    # no full stop yet; at most 3 lines).
    cut = 1
    while (cut < min(3, len(lines)) and lines[cut].strip()
           and not lines[cut - 1].rstrip().endswith((".", ":", "!", "?"))):
        cut += 1
    first = " ".join(line.strip() for line in lines[:cut])
    rest = "\n".join(lines[cut:]).strip()
    full = f"{module}.{qualname}" if qualname else module
    yield full, f"{full}: {first}", rest


def stdlib_module_names() -> list[str]:
    """The public top-level standard library modules this suite walks."""
    return sorted(m for m in sys.stdlib_module_names
                  if not m.startswith("_") and m not in STDLIB_SKIP)


def build_stdlib(modules: Iterable[str] | None = None) -> pd.DataFrame:
    """Builds the stdlib-docstring corpus in a subprocess (imports stay there).

    Args:
        modules: Top-level modules to walk (default: :func:`stdlib_module_names`).
    """
    modules = list(modules) if modules is not None else stdlib_module_names()
    root = pathlib.Path(__file__).resolve().parent.parent
    code = ("import json, sys\nfrom benchmarks.text_corpora import stdlib_records\n"
            "out = list(stdlib_records(json.loads(sys.argv[1])))\n"
            "open(sys.argv[2], 'w').write(json.dumps(out))\n")
    target = cache_dir() / f".stdlib-{os.getpid()}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": "0"}
    try:
        subprocess.run([sys.executable, "-c", code, json.dumps(modules), str(target)],
                       check=True, env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, timeout=600)
        records = json.loads(target.read_text())
    finally:
        target.unlink(missing_ok=True)
    return to_frame(tuple(r) for r in records)


# --- Debian man pages --------------------------------------------------------

MAN_PACKAGES = ("manpages", "manpages-dev")


def manpage_files(packages: Iterable[str] = MAN_PACKAGES) -> list[pathlib.Path]:
    """The English man-page files the given Debian packages installed.

    Raises:
        RuntimeError: a package is not installed (says how to install it).
    """
    files = []
    for package in packages:
        listing = pathlib.Path(f"/var/lib/dpkg/info/{package}.list")
        if not listing.exists():
            raise RuntimeError(
                f"the Debian package {package!r} is not installed; the manpages "
                "corpus needs: apt-get install manpages manpages-dev")
        for line in listing.read_text().splitlines():
            parts = pathlib.PurePosixPath(line).parts
            if (len(parts) == 6 and parts[:4] == ("/", "usr", "share", "man")
                    and parts[4].startswith("man") and line.endswith(".gz")):
                files.append(pathlib.Path(line))
    return sorted(set(files))


def manpage_record(path: pathlib.Path, source: str) -> tuple[str, str, str] | None:
    """``(doc_id, NAME line, DESCRIPTION)`` of one page, or ``None`` (an alias
    page, ``.so``, or no NAME / DESCRIPTION)."""
    first = next((ln for ln in source.splitlines() if not ln.startswith('.\\"')), "")
    if first.startswith(".so "):
        return None
    parts = roff.sections(source)
    name, description = parts.get("NAME", ""), parts.get("DESCRIPTION", "")
    if not name or not description:
        return None
    page = path.name[:-3] if path.name.endswith(".gz") else path.name
    return f"{path.parent.name}/{page}", name, description


def build_manpages() -> pd.DataFrame:
    """Builds the man-page corpus from the installed ``manpages(-dev)`` files."""
    records = []
    for path in manpage_files():
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
            record = manpage_record(path, handle.read())
        if record:
            records.append(record)
    return to_frame(records)


# --- Debian package descriptions ----------------------------------------------

TRANSLATIONS = ("/var/lib/apt/lists/"
                "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en")


def parse_translations(text: str) -> Iterator[tuple[str, str, str]]:
    """``(package, "package: short", long)`` from an apt ``Translation-en`` file."""
    for stanza in text.split("\n\n"):
        package, short, body = "", "", []
        in_description = False
        for line in stanza.splitlines():
            if line.startswith("Package:"):
                package = line.split(":", 1)[1].strip()
            elif line.startswith("Description-en:"):
                short = line.split(":", 1)[1].strip()
                in_description = True
            elif in_description and line.startswith(" "):
                body.append("" if line.strip() == "." else line.strip())
            else:
                in_description = False
        if package and short:
            yield package, f"{package}: {short}", "\n".join(body)


def build_debian() -> pd.DataFrame:
    """Builds the package-description corpus from apt's English translations.

    Raises:
        RuntimeError: apt has no ``Translation-en`` list (says how to get one).
    """
    candidates = [p for p in (TRANSLATIONS, TRANSLATIONS + ".lz4", TRANSLATIONS + ".gz",
                              TRANSLATIONS + ".xz") if os.path.exists(p)]
    if not candidates:
        raise RuntimeError(
            "no apt Translation-en list; the debian corpus needs: "
            "apt-get update -o Acquire::Languages=en")
    text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", candidates[0]],
                          check=True, capture_output=True, text=True).stdout
    return to_frame(sorted(parse_translations(text)))


# --- Splits --------------------------------------------------------------------


def split(frame: pd.DataFrame, seed: int = 0, validation: float = 0.05,
          test: float = 0.10, max_pairs: int | None = None
          ) -> dict[str, pd.DataFrame]:
    """Splits a corpus's pairs into train / validation / test with a fixed seed.

    Args:
        frame: A corpus (``doc_id``, ``query``, ``doc``).
        seed: Permutation seed.
        validation: Share of the (sampled) pairs held out for validation.
        test: Share held out for the test.
        max_pairs: Use at most this many pairs (a seeded sample); every document
            stays in the retrieval corpus.

    Returns:
        ``{"train", "validation", "test"}`` frames of pairs, and ``"corpus"``: every
        document of ``frame`` (retrieval is always over all of them).
    """
    order = np.random.default_rng(seed).permutation(len(frame))
    if max_pairs is not None:
        order = order[:max_pairs]
    num_test = int(round(len(order) * test))
    num_val = int(round(len(order) * validation))
    pick = lambda idx: frame.iloc[np.sort(idx)].reset_index(drop=True)  # noqa: E731
    return {
        "test": pick(order[:num_test]),
        "validation": pick(order[num_test:num_test + num_val]),
        "train": pick(order[num_test + num_val:]),
        "corpus": frame.reset_index(drop=True),
    }


def describe(frame: pd.DataFrame) -> dict[str, float]:
    """Sizes and average lengths (words) of a corpus."""
    return {"documents": len(frame), "pairs": len(frame),
            "query_words": float(frame["query"].str.split().str.len().mean()),
            "doc_words": float(frame["doc"].str.split().str.len().mean())}
