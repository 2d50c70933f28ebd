"""Benchmarks of the two-stage design: speed against exhaustive and global-only search, rerank bandwidth,
build throughput, codec sizes, quality, and serving under concurrency. ``python -m alignsearch.bench --help``."""
