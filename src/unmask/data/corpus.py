"""Build a corpus of documents: train.jsonl + val.jsonl + manifest.json.

Sources are folders of files (glob include/exclude), `.jsonl` files (one document per line, a text field),
`.txt` files (one document each) and the sources of installed Python packages. Documents are de-duplicated by
the SHA-256 of their text (first occurrence wins) and split into train/validation by that same hash, so a
document lands in the same split whatever else is in the corpus and however often the corpus is rebuilt.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from unmask.data.packages import find_package
from unmask.errors import UnmaskError
from unmask.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_EXCLUDE = (".git/*", "*/.git/*", "*/__pycache__/*", "__pycache__/*", "*.pyc", "*/node_modules/*",
                   "node_modules/*", ".venv/*", "*/.venv/*")
TRAIN_FILE, VAL_FILE, MANIFEST_FILE = "train.jsonl", "val.jsonl", "manifest.json"


class CorpusError(UnmaskError, ValueError):
    pass


@dataclass
class Source:
    """One input of the corpus and what it contributed (the manifest's rows)."""

    kind: str  # dir | jsonl | txt | package
    name: str
    version: str | None = None
    license: str | None = None
    documents: int = 0  # kept after de-duplication
    bytes: int = 0  # UTF-8 bytes kept
    duplicates: int = 0
    skipped: int = 0  # binary, empty, too large

    def row(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class CorpusSpec:
    dirs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)
    package_path: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)  # empty: every file (dirs) / *.py (packages)
    exclude: list[str] = field(default_factory=list)
    text_field: str = "text"
    val_fraction: float = 0.01
    min_chars: int = 1
    max_bytes: int = 1 << 20  # larger files are usually generated tables, not prose or code


def doc_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_validation(digest: str, val_fraction: float) -> bool:
    """The split is a pure function of the content hash: stable across rebuilds and corpus changes."""
    return int(digest[:16], 16) / 2**64 < val_fraction


def _matches(rel: str, patterns) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _read_text(path: Path, max_bytes: int) -> str | None:
    """File text, or None for binary / undecodable / oversized files."""
    try:
        if path.stat().st_size > max_bytes:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _files_in(root: Path, include, exclude) -> Iterator[tuple[str, Path]]:
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        if include and not _matches(rel, include):
            continue
        if _matches(rel, (*DEFAULT_EXCLUDE, *exclude)):
            continue
        yield rel, path


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str | None]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise CorpusError(f"{path}:{lineno}: no {text_field!r} field (set --text-field)")
            text = record[text_field]
            yield text if isinstance(text, str) else None


def _sources(spec: CorpusSpec) -> Iterator[tuple[Source, Iterator[str | None]]]:
    """(source, its texts) in a fixed order; None stands for a skipped file."""
    for d in spec.dirs:
        root = Path(d)
        if not root.is_dir():
            raise CorpusError(f"not a directory: {root}")
        texts = (_read_text(p, spec.max_bytes) for _, p in _files_in(root, spec.include, spec.exclude))
        yield Source("dir", str(root)), texts
    for f in spec.files:
        path = Path(f)
        if not path.is_file():
            raise CorpusError(f"no such file: {path}")
        if path.suffix == ".jsonl":
            yield Source("jsonl", str(path)), _jsonl_texts(path, spec.text_field)
        else:
            yield Source("txt", str(path)), iter([_read_text(path, 1 << 62)])
    for p in spec.packages:
        pkg = find_package(p, spec.package_path or None)
        include = spec.include or ["*.py"]
        root = _common_root(pkg.files)
        files = [f for f in pkg.files
                 if _matches(_rel(f, root), include) and not _matches(_rel(f, root), (*DEFAULT_EXCLUDE, *spec.exclude))]
        if not files:
            raise CorpusError(f"package {pkg.name} has no files matching {include}")
        yield (Source("package", pkg.name, pkg.version, pkg.license),
               (_read_text(f, spec.max_bytes) for f in files))


def _common_root(files: list[Path]) -> Path:
    if not files:
        return Path(".")
    parts = [f.parent.parts for f in files]
    common = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        common.append(group[0])
    return Path(*common) if common else Path("/")


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def build_corpus(spec: CorpusSpec, out_dir: str | Path) -> dict:
    """Write out_dir/{train,val}.jsonl and manifest.json; returns the manifest."""
    if not 0.0 <= spec.val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in [0, 1), got {spec.val_fraction}")
    if not (spec.dirs or spec.files or spec.packages):
        raise CorpusError("no sources: give --dir, --file or --package")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    rows = []
    totals = {"train": [0, 0], "val": [0, 0]}  # documents, bytes
    with atomic_path(out / TRAIN_FILE) as tmp_train, atomic_path(out / VAL_FILE) as tmp_val:
        with open(tmp_train, "w", encoding="utf-8") as ftrain, open(tmp_val, "w", encoding="utf-8") as fval:
            for source, texts in _sources(spec):
                for text in texts:
                    if text is None or len(text.strip()) < spec.min_chars:
                        source.skipped += 1
                        continue
                    digest = doc_hash(text)
                    if digest in seen:
                        source.duplicates += 1
                        continue
                    seen.add(digest)
                    split = "val" if is_validation(digest, spec.val_fraction) else "train"
                    nbytes = len(text.encode("utf-8"))
                    record = {"text": text, "source": source.name, "sha256": digest}
                    (fval if split == "val" else ftrain).write(json.dumps(record, ensure_ascii=False) + "\n")
                    source.documents += 1
                    source.bytes += nbytes
                    totals[split][0] += 1
                    totals[split][1] += nbytes
                rows.append(source.row())
                log.info("%s %s: %d documents, %d bytes", source.kind, source.name, source.documents, source.bytes)
            if not seen:  # raised inside: an earlier corpus in out_dir is kept, not replaced by empty files
                raise CorpusError("the sources hold no text documents")
    manifest = {
        "format": "unmask-corpus-v1",
        "val_fraction": spec.val_fraction,
        "split": "sha256(text)[:16] / 2**64 < val_fraction -> val",
        "documents": {k: v[0] for k, v in totals.items()},
        "bytes": {k: v[1] for k, v in totals.items()},
        "duplicates": sum(r.get("duplicates", 0) for r in rows),
        "sources": rows,
        "spec": {k: v for k, v in spec.__dict__.items() if v},
    }
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def iter_corpus_texts(path: str | Path, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Texts of a corpus folder's split, a .jsonl file or a .txt file."""
    path = Path(path)
    if path.is_dir():
        file = path / (TRAIN_FILE if split == "train" else VAL_FILE)
        if not file.exists():
            raise CorpusError(f"{path} is not a corpus folder (no {file.name}; build one with `unmask corpus`)")
        path = file
    if not path.exists():
        raise CorpusError(f"no such corpus file: {path}")
    if path.suffix == ".jsonl":
        yield from (t for t in _jsonl_texts(path, text_field) if t is not None)
    else:
        yield path.read_text(encoding="utf-8", errors="replace")
