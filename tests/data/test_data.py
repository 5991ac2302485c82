"""Corpus building (dedup, deterministic split, package sources), token shards, batch sampling."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from train_helpers import one_thread  # noqa: F401  (autouse: one torch thread)

from unmask.data.batches import IndexSampler, SFTData, WindowData
from unmask.data.corpus import CorpusError, CorpusSpec, build_corpus, doc_hash, is_validation
from unmask.data.packages import PackageError, find_package
from unmask.data.shards import ShardError, TokenShard, shard_dtype, token_byte_lengths, write_shard


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_dedups_and_splits_by_content_hash(tmp_path):
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    docs = {f"pkg/m{i}.py": f"def f{i}():\n    return {i}\n" for i in range(40)}
    docs["pkg/copy.py"] = docs["pkg/m3.py"]  # exact duplicate
    docs["pkg/notes.md"] = "# not code\n"
    for rel, text in docs.items():
        (src / rel).write_text(text)
    (src / "pkg" / "__pycache__" / "m1.cpython-311.pyc").write_bytes(b"\x00\x01binary")
    (src / "pkg" / "blob.py").write_bytes(b"\xff\xfe\x00 not utf-8")
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text(json.dumps({"text": docs["pkg/m5.py"]}) + "\n" + json.dumps({"text": "new doc"}) + "\n")

    spec = CorpusSpec(dirs=[str(src)], files=[str(jsonl)], include=["*.py"], val_fraction=0.25)
    manifest = build_corpus(spec, tmp_path / "out")
    train, val = read_jsonl(tmp_path / "out" / "train.jsonl"), read_jsonl(tmp_path / "out" / "val.jsonl")
    texts = [r["text"] for r in train + val]
    assert len(texts) == len(set(texts)) == 41  # 40 files + "new doc"; copy.py and the jsonl repeat dropped
    assert manifest["duplicates"] == 2 and manifest["documents"] == {"train": len(train), "val": len(val)}
    assert 0 < len(val) < len(train)
    for r in val:
        assert is_validation(doc_hash(r["text"]), 0.25)
    for r in train:
        assert not is_validation(r["sha256"], 0.25)

    # the split depends on a document's content only: another corpus holding some of the same documents
    # puts each of them in the same split
    spec2 = CorpusSpec(files=[str(jsonl)], dirs=[str(src)], include=["m1*.py"], val_fraction=0.25)
    build_corpus(spec2, tmp_path / "out2")
    val2 = {r["text"] for r in read_jsonl(tmp_path / "out2" / "val.jsonl")}
    train2 = {r["text"] for r in read_jsonl(tmp_path / "out2" / "train.jsonl")}
    assert val2 <= {r["text"] for r in val} and train2 <= {r["text"] for r in train}
    # rebuilding gives byte-identical files
    build_corpus(spec, tmp_path / "out3")
    assert (tmp_path / "out3" / "train.jsonl").read_bytes() == (tmp_path / "out" / "train.jsonl").read_bytes()


def test_package_sources_record_version_license_and_bytes(tmp_path):
    pkg = find_package("json")
    assert pkg.license == "PSF-2.0" and any(f.name == "decoder.py" for f in pkg.files)
    manifest = build_corpus(CorpusSpec(packages=["json", "pytest"]), tmp_path)
    rows = {r["name"]: r for r in manifest["sources"]}
    import pytest as pt

    assert rows["pytest"]["version"] == pt.__version__ and rows["pytest"]["license"] != "UNKNOWN"
    assert rows["json"]["bytes"] == sum(len(f.read_bytes()) for f in pkg.files)
    with pytest.raises(PackageError, match="pins"):
        find_package("pytest==0.0.1")
    with pytest.raises(PackageError, match="not installed"):
        find_package("no_such_package_xyz")


def test_corpus_errors_are_clear(tmp_path):
    with pytest.raises(CorpusError, match="no sources"):
        build_corpus(CorpusSpec(), tmp_path)
    with pytest.raises(CorpusError, match="not a directory"):
        build_corpus(CorpusSpec(dirs=[str(tmp_path / "missing")]), tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:1: no 'text' field"):
        build_corpus(CorpusSpec(files=[str(bad)]), tmp_path / "o")


def test_a_corpus_without_documents_keeps_the_previous_one(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("def f():\n    return 1\n")
    (tmp_path / "empty.jsonl").write_text("")
    out = tmp_path / "corpus"
    build_corpus(CorpusSpec(dirs=[str(tmp_path / "src")], val_fraction=0.0), out)
    before = (out / "train.jsonl").read_text()
    with pytest.raises(CorpusError, match="no text documents"):
        build_corpus(CorpusSpec(files=[str(tmp_path / "empty.jsonl")]), out)
    assert (out / "train.jsonl").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.jsonl", "val.jsonl"]


def test_shards_round_trip_with_exact_byte_counts(tmp_path, tokenizer, corpus_texts):
    texts = corpus_texts[:3] + ["héllo wörld ✓ 漢字\n"]
    meta = write_shard(texts, tokenizer, tmp_path / "s.bin")
    shard = TokenShard.open(tmp_path / "s.bin")
    assert shard.tokens.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert shard.n_bytes == sum(len(t.encode()) for t in texts)
    ids = np.asarray(shard.tokens)
    assert ids[0] == tokenizer.eos_id and (ids == tokenizer.eos_id).sum() == len(texts) + 1
    assert tokenizer.decode(ids[1 : 1 + len(tokenizer.encode(texts[0]))]) == texts[0]
    # bytes per token sum to the source bytes exactly (special tokens count none)
    assert int(token_byte_lengths(tokenizer)[ids].sum()) == shard.n_bytes


def test_shard_dtype_widens_for_large_vocabularies(tmp_path, tokenizer):
    assert shard_dtype(65536) == np.uint16 and shard_dtype(65537) == np.uint32
    big = types.SimpleNamespace(vocab_size=100_000, eos_id=99_999, hf=tokenizer.hf,
                                encode_batch=lambda b: [[70_000, 5] for _ in b])
    write_shard(["a", "b"], big, tmp_path / "big.bin")
    shard = TokenShard.open(tmp_path / "big.bin")
    assert shard.tokens.dtype == np.uint32 and list(shard.tokens) == [99_999, 70_000, 5, 99_999, 70_000, 5, 99_999]
    with pytest.raises(ShardError, match="outside the model vocabulary"):
        shard.check_vocab(512)


def test_corrupt_shard_is_one_clear_error(tmp_path, tokenizer):
    write_shard(["some text here"], tokenizer, tmp_path / "s.bin")
    data = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "s.bin").write_bytes(data[:-1])
    with pytest.raises(ShardError, match="corrupt token shard"):
        TokenShard.open(tmp_path / "s.bin")
    (tmp_path / "s.json").write_text("{")
    with pytest.raises(ShardError, match="corrupt shard sidecar"):
        TokenShard.open(tmp_path / "s.bin")


def test_sampler_state_resumes_exactly_and_covers_each_epoch():
    a = IndexSampler(10, seed=3)
    e, first = a.take(7)
    e2, second = a.take(7)  # crosses into epoch 1
    assert sorted(np.concatenate([first, second[:3]]).tolist()) == list(range(10))
    assert e2.tolist() == [0, 0, 0, 1, 1, 1, 1]
    b = IndexSampler(10, seed=3)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.take(5)[1], b.take(5)[1])


def test_window_data_shifts_cut_points_across_epochs(tmp_path, tokenizer, corpus_texts):
    write_shard(corpus_texts[:2], tokenizer, tmp_path / "s.bin")
    data = WindowData(TokenShard.open(tmp_path / "s.bin"), seq_len=16, extra=1, seed=0)
    x0 = data.get(np.array([0]), np.array([2]))["input_ids"]
    assert x0.shape == (1, 17)
    assert x0[0].tolist() == np.asarray(data.shard.tokens[32:49]).tolist()
    offsets = {data.offset(e) for e in range(1, 8)}
    assert len(offsets) > 1 and all(0 <= o < 16 for o in offsets)


def test_sft_rows_pad_answers_with_eos(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "Q: 1+1?\nA:", "answer": " 2"}) + "\n"
                    + json.dumps({"prompt": "x" * 400, "answer": "too long prompt"}) + "\n")
    data = SFTData(path, tokenizer, seq_len=24)
    assert data.n == 1 and data.skipped == 1
    p = len(tokenizer.encode("Q: 1+1?\nA:"))
    a = tokenizer.encode(" 2")
    row = data.ids[0].tolist()
    assert int(data.prompt_len[0]) == p and row[p : p + len(a)] == a
    assert set(row[p + len(a) :]) == {tokenizer.eos_id}


def test_corpus_command_reports_skipped_files(tmp_path, capsys):
    from unmask.cli.main import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def f():\n    return 1\n")
    (src / "b.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8
    assert main(["corpus", str(tmp_path / "out"), "--dir", str(src), "--val-fraction", "0"]) == 0
    report = " ".join(capsys.readouterr().err.split())
    assert "1 docs" in report and "1 skipped (binary, not UTF-8, empty or too large)" in report
