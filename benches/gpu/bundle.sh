#!/usr/bin/env bash
# Builds what benches/gpu/run.sh needs on a GPU machine that cannot build: the fgflow
# binary and the train_speed example with `--features cuda,wgpu`, release, stripped and
# xz-compressed into benches/gpu/bundle/ (git-ignored). Measured: the stripped fgflow is
# 58 MB (burn's kernels for four backends), 10 MB compressed, so the two binaries plus
# the tree stay under the 64 MiB that may travel. Both are built by one cargo call so
# that they share one feature resolution (two calls rebuild burn twice). Honours
# CARGO_TARGET_DIR.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/benches/gpu/bundle"
target=${CARGO_TARGET_DIR:-$root/target}
cd "$root"
cargo build --release -p fgflow -p fgflow-stages --features fgflow-stages/cuda,fgflow-stages/wgpu --bin fgflow --example train_speed
mkdir -p "$out"
for exe in "$target/release/fgflow" "$target/release/examples/train_speed"; do
  name=$(basename "$exe")
  cp "$exe" "$out/$name"
  strip "$out/$name"
  xz -T2 -6 -f "$out/$name"
done
ls -l "$out"
