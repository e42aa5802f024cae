#!/usr/bin/env bash
# Builds what benches/gpu/run.sh needs on a GPU machine that cannot build: the fgflow
# binary and the train_speed example, both with `--features cuda,wgpu`, release,
# stripped, into benches/gpu/bundle/ (git-ignored; about 2 x 20 MiB, so the tree plus the
# bundle stays well under 64 MiB). Run from anywhere; honours CARGO_TARGET_DIR.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/benches/gpu/bundle"
target=${CARGO_TARGET_DIR:-$root/target}
cd "$root"
cargo build --release --features cuda,wgpu --bin fgflow
cargo build --release -p fgflow-stages --features cuda,wgpu --example train_speed
mkdir -p "$out"
for exe in "$target/release/fgflow" "$target/release/examples/train_speed"; do
  cp "$exe" "$out/"
  strip "$out/$(basename "$exe")"
done
du -sh "$out"/*
