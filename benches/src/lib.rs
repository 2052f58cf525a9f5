//! Benchmarks live in `benches/` (criterion) and `peer-compare.sh` (fio against peers).
