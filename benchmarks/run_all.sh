#!/bin/sh
# Every benchmark, one after the other; each prints its own table and ratios.
set -e
cd "$(dirname "$0")/.."
python benchmarks/bench_engine.py "$@"
python benchmarks/bench_attacks.py
python benchmarks/bench_membership.py
python benchmarks/bench_defenses.py
python benchmarks/bench_dpsgd.py
python benchmarks/bench_dpsgd.py --poisson
python benchmarks/bench_store.py
python benchmarks/bench_text.py
python benchmarks/bench_shard_data.py
python benchmarks/bench_decentralized.py
