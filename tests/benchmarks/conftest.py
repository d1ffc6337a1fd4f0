"""Nothing in tests/benchmarks is a pytest test: keep the directory out of collection."""

collect_ignore_glob = ["*"]
