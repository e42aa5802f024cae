#!/usr/bin/env bash
# Everything fgflow measures on an NVIDIA GPU, in one run of under 10 minutes, on a
# machine that has the NVIDIA driver, PyTorch (with its CUDA libraries) and timm but
# reaches no package registry, so nothing is built there.
#
# Build the bundle beforehand, on a machine with the Rust toolchain:
#     benches/gpu/bundle.sh                 # -> benches/gpu/bundle/{fgflow,train_speed}.xz
# then, from the repository root on the GPU machine (the tree + the bundle travel):
#     benches/gpu/run.sh [--bundle DIR] [--python PY] [--images N] [--epochs E]
#
# What it does, each step under its own time limit and all under one deadline:
#   1. finds the GPU (nvidia-smi) and the CUDA driver library, else exits 3 saying which;
#   2. `train_speed check cuda` and `check wgpu`: the same seeded CNN and ViT give flex's
#      logits within 1e-3, and a CNN trains to flex's accuracy (the tests of stages/tests/
#      ml.rs, which cannot travel as test binaries);
#   3. trains pipelines/quick.ron with `--backend cuda` into a scratch cache;
#   4. times training steps of the CNN and the ViT (and Swin-V2 tiny once the bundle's
#      train_speed knows it) on CUDA, next to the same models in this machine's PyTorch
#      on CUDA (benches/train_speed/torch_train.py), and prints one table.
# Exit status: 0 all checks passed, 1 a check failed, 2 bad usage or no bundle, 3 no GPU
# or no CUDA driver.
set -u -o pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bundle="$here/bundle"
python=python3
images=6400
epochs=3
deadline=$(( $(date +%s) + ${FGFLOW_GPU_DEADLINE:-570} ))
probe_timeout=${FGFLOW_GPU_PROBE_TIMEOUT:-20}

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "run.sh: $2" >&2; exit "$1"; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --bundle) [ $# -ge 2 ] || die 2 "--bundle needs a directory"; bundle=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || die 2 "--python needs an interpreter"; python=$2; shift 2 ;;
    --images) [ $# -ge 2 ] && [[ "$2" =~ ^[1-9][0-9]{0,6}$ ]] || die 2 "--images needs a whole number from 1 to 9999999"; images=$2; shift 2 ;;
    --epochs) [ $# -ge 2 ] && [[ "$2" =~ ^([2-9]|[1-9][0-9])$ ]] || die 2 "--epochs needs a whole number from 2 to 99 (the first epoch is not timed)"; epochs=$2; shift 2 ;;
    *) die 2 "unknown argument \`$1\` (see --help)" ;;
  esac
done

for exe in fgflow train_speed; do
  [ -x "$bundle/$exe" ] || [ -f "$bundle/$exe.xz" ] || die 2 "$bundle/$exe (or $exe.xz): not found or not executable; build the bundle first with benches/gpu/bundle.sh (on a machine with the Rust toolchain) and bring it along"
done

# Seconds left for a step: its own limit, cut to what the deadline leaves.
limit() {
  local left=$(( deadline - $(date +%s) ))
  [ "$left" -gt "$1" ] && echo "$1" || echo "$(( left > 1 ? left : 1 ))"
}

# 1. The GPU and the driver. nvidia-smi can hang on a wedged driver: bounded too.
command -v nvidia-smi >/dev/null 2>&1 || die 3 "no NVIDIA GPU found: nvidia-smi is not on PATH (is the NVIDIA driver installed?)"
gpu=$(timeout "$probe_timeout" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)
rc=$?
[ $rc -eq 124 ] && die 3 "no usable NVIDIA GPU: nvidia-smi did not answer within ${probe_timeout} s"
[ $rc -ne 0 ] && die 3 "no usable NVIDIA GPU: nvidia-smi failed (exit $rc): $gpu"
[ -n "$gpu" ] || die 3 "no NVIDIA GPU found: nvidia-smi lists none"
echo "GPU: $gpu"

have_lib() { ldconfig -p 2>/dev/null | grep -q "$1" || compgen -G "/usr/lib*/**/$1*" >/dev/null || compgen -G "/usr/local/cuda*/lib64/$1*" >/dev/null; }
have_lib libcuda.so || die 3 "no CUDA driver library (libcuda.so) found by ldconfig or under /usr/lib and /usr/local/cuda"
# burn's CUDA backend compiles its kernels with NVRTC at run time; PyTorch's wheels
# bring one (nvidia-*-cu* packages): use it when the system has none.
if ! have_lib libnvrtc.so; then
  nv=$("$python" -c 'import nvidia, os; print(os.pathsep.join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in sorted(os.listdir(p)) if os.path.isdir(os.path.join(p, d, "lib"))))' 2>/dev/null)
  [ -n "$nv" ] && export LD_LIBRARY_PATH="$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/fgflow-gpu.XXXXXX") || die 1 "cannot create a scratch directory"
trap 'rm -rf "$work"' EXIT
# The bundle travels compressed (bundle.sh): unpack it into the scratch directory.
bin="$work/bin"
mkdir -p "$bin"
for exe in fgflow train_speed; do
  if [ -x "$bundle/$exe" ]; then
    ln -s "$(cd "$bundle" && pwd)/$exe" "$bin/$exe"
  else
    "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$bundle/$exe.xz" "$bin/$exe" \
      || die 2 "$bundle/$exe.xz: cannot be unpacked with $python's lzma"
    chmod +x "$bin/$exe"
  fi
done
bundle=$bin

failed=0
step() { # name limit command...
  local name=$1 secs; secs=$(limit "$2"); shift 2
  echo "== $name (at most ${secs} s)"
  timeout "$secs" "$@" 2>&1 | tee "$work/$name.log" | tail -n 40
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "$name: TIMED OUT after ${secs} s"
  [ "$rc" -ne 0 ] && { echo "$name: FAILED (exit $rc)"; failed=1; }
  return "$rc"
}

# 2. Backend checks.
step check-cuda 150 "$bundle/train_speed" check cuda "$root/data/quickdraw"
step check-wgpu 150 "$bundle/train_speed" check wgpu "$root/data/quickdraw"

# 3. The quick pipeline on CUDA.
step quick-cuda 180 "$bundle/fgflow" run "$root/pipelines/quick.ron" --backend cuda --cache-dir "$work/cache"

# 4. Training speed, fgflow on CUDA next to PyTorch on CUDA.
models="cnn vit"
"$bundle/train_speed" swinv2 check-name >/dev/null 2>&1; [ $? -ne 2 ] && models="$models swinv2"
rows=()
for m in $models; do
  step "speed-$m-fgflow" 60 "$bundle/train_speed" "$m" cuda "$images" "$epochs" && a=$(tail -n 1 "$work/speed-$m-fgflow.log") || a="{}"
  step "speed-$m-torch" 60 "$python" "$root/benches/train_speed/torch_train.py" "$m" "$images" "$epochs" cuda && b=$(tail -n 1 "$work/speed-$m-torch.log") || b="{}"
  rows+=("$m" "$a" "$b")
done
"$python" - "${rows[@]}" <<'EOF'
import json, statistics, sys
a = sys.argv[1:]
print("\n| model | fgflow cuda images/s | PyTorch cuda images/s | ratio | fgflow peak RSS MiB | PyTorch peak RSS MiB |")
print("|---|---|---|---|---|---|")
for i in range(0, len(a), 3):
    rows = []
    for text in a[i + 1:i + 3]:
        try:
            rows.append(json.loads(text))
        except ValueError:
            rows.append({})
    rate = [statistics.median(r["images_per_sec"]) if r.get("images_per_sec") else None for r in rows]
    ratio = f"{rate[0] / rate[1]:.2f}x" if None not in rate and rate[1] else "n/a"
    cell = lambda v: "failed" if v is None else f"{v:.0f}"
    print(f"| {a[i]} | {cell(rate[0])} | {cell(rate[1])} | {ratio} | {rows[0].get('peak_rss_mib', 'n/a')} | {rows[1].get('peak_rss_mib', 'n/a')} |")
EOF
[ $failed -eq 0 ] && echo "run.sh: all checks passed" || echo "run.sh: some steps FAILED (see above)"
exit $failed
