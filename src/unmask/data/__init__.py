"""Data: corpora of documents (corpus.py, packages.py), token shards (shards.py), training batches (batches.py)."""
