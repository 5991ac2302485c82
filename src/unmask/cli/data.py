"""`unmask corpus`, `unmask tokenizer`, `unmask shards`: documents -> tokenizer -> token shards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

from unmask.cli.apps import app
from unmask.cli.common import console, out


@app.command()
def corpus(
    out_dir: Optional[Path] = typer.Argument(None, help="Output folder (default with --recipe: its data.corpus)."),
    dirs: List[Path] = typer.Option([], "--dir", help="A folder of files (repeatable)."),
    files: List[Path] = typer.Option([], "--file", help="A .jsonl (one document per line) or .txt file."),
    packages: List[str] = typer.Option([], "--package", help="Sources of an installed package: NAME or NAME==VERSION."),
    package_path: List[Path] = typer.Option([], "--package-path", help="Look for packages here (pip --target dir)."),
    include: List[str] = typer.Option([], "--include", help="Glob of files to keep (default: all; *.py for packages)."),
    exclude: List[str] = typer.Option([], "--exclude", help="Glob of files to drop."),
    text_field: str = typer.Option("text", "--text-field", help="Field of .jsonl records holding the text."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of documents held out (0.01)."),
    max_bytes: int = typer.Option(1 << 20, "--max-bytes", help="Skip larger files (usually generated)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A training recipe whose `corpus:` section to build "
                                          "(and whose tokenizer to train)."),
    install: bool = typer.Option(False, "--install", help="pip-install the recipe's pinned packages into its "
                                 "package_path first (no dependencies)."),
) -> None:
    """Build a de-duplicated corpus (train.jsonl, val.jsonl, manifest.json) from files, folders or packages."""
    from unmask.data.corpus import CorpusError, CorpusSpec, build_corpus

    spec = CorpusSpec(dirs=[str(d) for d in dirs], files=[str(f) for f in files], packages=list(packages),
                      package_path=[str(p) for p in package_path], include=list(include), exclude=list(exclude),
                      text_field=text_field, max_bytes=max_bytes)
    vocab_size = None
    if recipe is not None:
        from unmask.train.config import load_config

        cfg = load_config(recipe)
        c = cfg.corpus
        spec.dirs += c.dirs
        spec.files += c.files
        spec.packages += c.packages
        spec.package_path += c.package_path
        spec.include = spec.include or c.include
        spec.exclude += c.exclude
        spec.val_fraction = c.val_fraction
        vocab_size = c.vocab_size
        if out_dir is None:
            if not cfg.data.corpus:
                raise CorpusError(f"{recipe} sets no data.corpus: give OUT_DIR")
            out_dir = Path(cfg.data.corpus)
        if install:
            _install(c.packages, c.package_path)
    if out_dir is None:
        raise CorpusError("give OUT_DIR (or --recipe)")
    if val_fraction is not None:
        spec.val_fraction = val_fraction
    with console.status("reading sources …"):
        manifest = build_corpus(spec, out_dir)
    for row in manifest["sources"]:
        extra = f" {row['version']} ({row.get('license', '?')})" if row["kind"] == "package" else ""
        notes = [f"{row[k]} {label}" for k, label in (("duplicates", "duplicates"),
                                                      ("skipped", "skipped (binary, not UTF-8, empty or too large)"))
                 if row.get(k)]
        console.print(f"  {row['kind']:8s} {row['name']}{extra}: {row['documents']} docs, {row['bytes']:,} bytes"
                      + "".join(", " + n for n in notes))
    out.print(f"{out_dir}: {manifest['documents']['train']} train / {manifest['documents']['val']} val documents, "
              f"{manifest['bytes']['train']:,} / {manifest['bytes']['val']:,} bytes, "
              f"{manifest['duplicates']} duplicates dropped")
    if spec.val_fraction > 0 and not manifest["documents"]["val"]:
        console.print("[yellow]warning: the validation split is empty (too few documents for --val-fraction)")
    if vocab_size:
        _train_tokenizer(Path(out_dir), vocab_size, Path(out_dir) / "tokenizer")


def _install(packages: list[str], package_path: list[str]) -> None:
    from unmask.data.corpus import CorpusError

    pinned = [p for p in packages if "==" in p]
    if not pinned:
        return
    if not package_path:
        raise CorpusError("--install needs corpus.package_path in the recipe (where to put the packages)")
    target = package_path[0]
    console.print(f"installing {len(pinned)} pinned packages into {target} …")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", target, *pinned]
    if subprocess.run(cmd).returncode:
        raise CorpusError(f"pip install into {target} failed")


def _train_tokenizer(corpus_dir: Path, vocab_size: int, out_dir: Path, min_frequency: int = 2) -> None:
    from unmask.data.corpus import iter_corpus_texts
    from unmask.tokenizer import Tokenizer

    with console.status(f"training a {vocab_size}-token byte-level BPE on {corpus_dir} …"):
        tok = Tokenizer.train(iter_corpus_texts(corpus_dir, "train"), vocab_size=vocab_size,
                              min_frequency=min_frequency)
        tok.save(out_dir)
    out.print(f"{out_dir}: tokenizer with {tok.vocab_size} tokens (mask {tok.mask_id}, eos {tok.eos_id}, "
              f"pad {tok.pad_id})")


@app.command()
def tokenizer(
    corpus_dir: Path = typer.Argument(..., help="Corpus folder (its train.jsonl), or a .jsonl / .txt file."),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="Vocabulary size including special tokens."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default CORPUS_DIR/tokenizer)."),
    min_frequency: int = typer.Option(2, "--min-frequency"),
) -> None:
    """Train a byte-level BPE (special tokens: mask, EOS, pad, fill-in-the-middle, chat turns)."""
    from unmask.data.corpus import CorpusError

    if vocab_size < 300:
        raise CorpusError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs 256 bytes + specials")
    if not corpus_dir.exists():
        raise CorpusError(f"no such corpus: {corpus_dir}")
    _train_tokenizer(corpus_dir, vocab_size, out_dir or _default_tokenizer_dir(corpus_dir), min_frequency)


def _default_tokenizer_dir(corpus: Path) -> Path:
    """Where `unmask tokenizer` writes and `unmask shards` looks: CORPUS/tokenizer, or FILE-without-suffix/tokenizer."""
    return corpus / "tokenizer" if corpus.is_dir() else corpus.with_suffix("") / "tokenizer"


@app.command()
def shards(
    corpus_dir: Path = typer.Argument(..., help="Corpus folder (train.jsonl / val.jsonl) or a .jsonl / .txt file."),
    tokenizer_dir: Optional[Path] = typer.Option(None, "--tokenizer", help="Folder with tokenizer.json (default: "
                                                 "where `unmask tokenizer` puts it, CORPUS_DIR/tokenizer)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default CORPUS_DIR/tokens)."),
    text_field: str = typer.Option("text", "--text-field"),
) -> None:
    """Tokenize a corpus into numpy memmap shards (uint16 when the vocabulary fits) with JSON sidecars."""
    from unmask.data.corpus import CorpusError, iter_corpus_texts
    from unmask.data.shards import write_shard
    from unmask.tokenizer import Tokenizer

    if not corpus_dir.exists():
        raise CorpusError(f"no such corpus: {corpus_dir}")
    tok = Tokenizer.from_dir(tokenizer_dir or _default_tokenizer_dir(corpus_dir))
    dest = out_dir or (corpus_dir / "tokens" if corpus_dir.is_dir() else corpus_dir.parent / "tokens")
    splits = ["train", "val"] if corpus_dir.is_dir() else ["train"]
    for split in splits:
        if corpus_dir.is_dir() and not (corpus_dir / f"{split}.jsonl").exists():
            continue
        with console.status(f"tokenizing {split} …"):
            meta = write_shard(iter_corpus_texts(corpus_dir, split, text_field), tok, dest / f"{split}.bin")
        out.print(f"{dest / (split + '.bin')}: {meta['n_tokens']:,} tokens ({meta['dtype']}), "
                  f"{meta['n_bytes']:,} bytes, {meta['n_bytes'] / max(meta['n_tokens'], 1):.2f} bytes/token")


@app.command("chat-data")
def chat_data(
    corpus_dir: Path = typer.Argument(..., help="A corpus folder from `unmask corpus` (train.jsonl, val.jsonl)."),
    out_dir: Path = typer.Argument(..., help="Output folder: train.jsonl, val.jsonl, manifest.json."),
    model: str = typer.Option(..., "--model", "-m", help="The model whose chat template formats the pairs (and "
                              "which answers them with --self-distill)."),
    self_distill: int = typer.Option(0, "--self-distill", help="Also this many pairs answered by the model itself "
                                     "(greedy)."),
    max_pairs: int = typer.Option(4000, "--max-pairs", help="At most this many docstring → code pairs."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest self-distilled answer."),
    batch_size: int = typer.Option(16, "--batch-size", help="Self-distillation prompts decoded together."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """An adaptation corpus: the code documents, plus chat documents built from them (a documented function's
    docstring as the request, its code as the answer), plus the model's own answers to some requests."""
    import json
    import random

    from rich.progress import Progress

    from unmask.chat import end_of_turn_strings
    from unmask.data.corpus import MANIFEST_FILE, TRAIN_FILE, VAL_FILE, iter_corpus_texts
    from unmask.data.pairs import Pair, chat_document, docstring_pairs
    from unmask.io import atomic_write_text
    from unmask.pipeline import load

    pipe = load(model)
    tok = pipe.tokenizer
    code = list(iter_corpus_texts(corpus_dir, "train"))
    pairs = list(docstring_pairs(code))
    random.Random(seed).shuffle(pairs)
    pairs = pairs[:max_pairs]
    distilled: list[Pair] = []
    asked = pairs[:self_distill]
    if asked:
        stops = end_of_turn_strings(pipe)
        prompts = [tok.apply_chat_template([{"role": "user", "content": p.request}]) for p in asked]
        with Progress(console=console) as bar:
            task = bar.add_task("self-distillation", total=len(prompts))
            for lo in range(0, len(prompts), batch_size):
                results = pipe.generate_many(prompts[lo : lo + batch_size], max_new_tokens=max_new_tokens,
                                             temperature=0.0, stop=stops)
                distilled += [Pair(p.request, r.text.strip()) for p, r in zip(asked[lo : lo + batch_size], results)
                              if r.text.strip()]
                bar.advance(task, len(results))
    docs = code + [chat_document(tok, p) for p in pairs + distilled]
    random.Random(seed + 1).shuffle(docs)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / TRAIN_FILE, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    val = list(iter_corpus_texts(corpus_dir, "val"))
    atomic_write_text(out_dir / VAL_FILE, "".join(json.dumps({"text": d}) + "\n" for d in val))
    manifest = {"corpus": str(corpus_dir), "model": model, "code_documents": len(code), "pairs": len(pairs),
                "self_distilled": len(distilled), "val_documents": len(val), "seed": seed}
    source = Path(corpus_dir) / MANIFEST_FILE
    if source.exists():
        manifest["sources"] = json.loads(source.read_text())["sources"]
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    out.print(f"{out_dir}: {len(code)} code documents, {len(pairs)} docstring pairs, {len(distilled)} self-distilled "
              f"answers; {len(val)} validation documents")
