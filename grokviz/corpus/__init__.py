"""The offline training corpus (``corpus.jsonl.xz``), its provenance (``PROVENANCE.md``) and build script."""
