#!/usr/bin/env python3
"""Where one training step's time goes, op family by op family: fgflow (burn flex) next
to PyTorch on this CPU, same models and settings as bench.py (batch 64, 28x28x1, 345
classes, 2 threads).

fgflow: `perf record --call-graph dwarf` of the train_speed example (every thread);
each sample is given to the first op family, in the order of FAMILIES, that any frame
of its call chain matches (so a gemm kernel running inside burn's conv2d counts as
"conv forward", one inside our weight gradient as "conv weight gradient"). A family's
CPU time over the thread count is its share of a step's wall time (the whole run's wall
time over its steps, first epoch included); the wall time no thread was sampled in is
"threads idle or waiting" (one thread working while the other sleeps shows up there).

PyTorch: torch.profiler's self CPU time per aten op over 10 steps after 3 warm-up steps
(an op's time on the calling thread, with its intra-op threads working inside it),
grouped into the same families by op name; per step.

    cargo build --release -p fgflow-stages --example train_speed
    python3 benches/train_speed/op_profile.py [--models cnn,vit] [--images 640] [--epochs 6] [--freq 199]

Needs `perf` (Debian: linux-perf) and the venv bench.py makes. Writes PROFILE.md
beside this script and prints the same tables.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from bench import torch_python  # noqa: E402

# (family, pattern over fgflow's frame symbols, pattern over PyTorch's aten op names)
FAMILIES = [
    # The weight gradient first: both gradients run under ConvSameBackward. The input
    # gradient's tasks run `input_grad_image` (the forward's code under another name):
    # on a pool worker the chain does not reach the caller, so without it they counted
    # as the forward.
    ("conv weight gradient", r"ml::conv::weight_grad_f32|ml::conv::cpu_weight_grad|conv_same_weight_grad|depthwise_cpu::weight_grad", None),
    ("conv input gradient", r"conv_transpose|conv2d_x_backward|conv_same_x_grad|ConvSameBackward|ml::conv::input_grad_image|depthwise_cpu::x_grad", None),
    ("conv backward (both gradients)", None, r"convolution_backward"),
    ("conv forward", r"ops::conv::conv[23]d|depthwise_cpu::forward|conv_same|ml::conv::(same_conv|forward_image)", r"convolution|mkldnn_conv|conv2d"),
    ("matmul (linear, attention)", r"ops::matmul|ml::linear::|ml::attention::|gemm", r"^aten::(addmm|mm|bmm|matmul|linear|baddbmm|_scaled_dot|scaled_dot)"),
    ("pooling", r"ml::pool::|ops::pool::", r"pool"),
    ("batch/layer norm", r"ml::norm::(cpu|layer_cpu)", r"batch_norm|layer_norm"),
    ("softmax, loss, reductions", r"reduce|softmax|sum_dim|mean_dim|argmax|max_dim|cross_entropy", r"softmax|nll_loss|cross_entropy|sum|mean|max(?!_pool)|argmax"),
    ("optimiser (AdamW)", r"ml::optim::", r"_foreach|adamw|lerp|addcdiv|addcmul"),
    ("elementwise", r"binary_op|unary_op|scalar_op|activation|ops::mask|clamp|float_exp|float_sqrt|float_powi|gelu|relu", r"^aten::(add|mul|sub|div|relu|threshold|gelu|neg|exp|sqrt|pow|where|clamp|fill_|zero_|rsub|masked)"),
    ("data (augment, batch to tensor)", r"ml::augment|ml::data::|ml::loader|randaugment", None),
    ("memory (alloc, zero, copy, layout)", r"memset|memmove|memcpy|malloc|_int_free|cfree|page_fault|FlexTensor::empty|filled_typed|into_contiguous|strided_index|ops::cat|permute|reshape|copy",
     r"copy_|contiguous|clone|empty|cat|view|reshape|transpose|permute|flatten|expand|as_strided|::to$|_to_copy|stack|index|select|slice|unsqueeze|::t$|detach|resolve"),
    ("threads idle or waiting", r"rayon|crossbeam|sched_yield|futex|std::thread|__GI___sched", None),
]
OTHER = "other"


def family_of_chain(frames):
    for name, fg, _ in FAMILIES:
        if fg and any(re.search(fg, f) for f in frames):
            return name
    return OTHER


def family_of_op(op):
    for name, _, pt in FAMILIES:
        if pt and re.search(pt, op):
            return name
    return OTHER


def fgflow_profile(exe, model, images, epochs, threads, freq, workdir):
    data = Path(workdir) / f"{model}.perf"
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    started = time.perf_counter()
    rec = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(freq), "--call-graph", "dwarf,16384", "-o", str(data), "--",
                          str(exe), model, "flex", str(images), str(epochs)], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "tid,ip,sym"], capture_output=True, text=True, check=True).stdout
    # A sample is a header line (the thread id, space-padded to 5 columns) followed by
    # its frames, a tab then "<address> <symbol>".
    counts, frames, started = Counter(), [], False
    for l in script.splitlines() + ["end"]:
        m = re.match(r"^\t\s*[0-9a-f]+\s+(.*)$", l)
        if m:
            frames.append(m.group(1))
        elif l.strip():
            if started:
                counts[family_of_chain(frames)] += 1
            started, frames = True, []
    # cpu-clock samples only running threads: a family's CPU time over the thread count
    # is its share of the wall time, and what no thread was sampled doing is idle.
    steps = epochs * -(-images // 64)
    step_ms = wall / steps * 1000
    fams = {f: c / freq / threads / steps * 1000 for f, c in counts.items()}
    fams["threads idle or waiting"] = fams.get("threads idle or waiting", 0.0) + max(0.0, step_ms - sum(fams.values()))
    return fams, step_ms, sum(counts.values())


TORCH_PROFILE = r"""
import json, sys, time, runpy
import numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[2]))
m = runpy.run_path(sys.argv[3])
name = sys.argv[1]
torch.manual_seed(0)
rng = np.random.default_rng(0)
model = {"cnn": m["Cnn"], "vit": m["Vit"], "swinv2": m["Swinv2"]}[name]()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
model.train()
images = (rng.random((640, 28, 28)) < 3 / 16).astype(np.uint8) * 255
labels = torch.arange(640) % 345
def step(b):
    idx = rng.permutation(640)[:64]
    x = torch.from_numpy(m["augment"](images[idx], rng)).float().div_(255).unsqueeze(1)
    loss = F.cross_entropy(model(x), labels[torch.from_numpy(idx)])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    loss.item()
for b in range(3):
    step(b)
steps = 10
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for b in range(steps):
        step(b)
    wall = (time.perf_counter() - start) / steps * 1000
ops = {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}
print(json.dumps({"step_ms": wall, "ops": ops}))
"""


def torch_profile(py, model, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([py, "-c", TORCH_PROFILE, model, str(threads), str(HERE / "torch_train.py")], env=env, capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    fams = Counter()
    for op, ms in r["ops"].items():
        # Profiler bookkeeping and Python-level wrappers, not work.
        if op.startswith("[") or op.startswith("Optimizer.") or op.startswith("autograd::engine") and "Backward" not in op:
            continue
        # Autograd nodes' self time is the glue between the aten ops they call.
        fams[family_of_op(op) if not op.startswith("autograd::") else "autograd glue"] += ms
    # The rest of the step (Python, data on the host) is the part no op accounts for.
    fams["Python, data, outside ops"] += max(0.0, r["step_ms"] - sum(fams.values()))
    return dict(fams), r["step_ms"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="cnn,vit")
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--freq", type=int, default=199, help="perf samples per second and thread (unwinding each costs time: keep it low)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python", help="interpreter with torch installed")
    args = ap.parse_args()
    exe = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "examples" / "train_speed"
    if not exe.exists():
        sys.exit(f"{exe} is missing: cargo build --release -p fgflow-stages --example train_speed")
    py = torch_python(args)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    out = [f"Machine: {cpu}, {os.cpu_count()} cores, {args.threads} threads; batch 64, 28x28x1, 345 classes. "
           f"fgflow: perf samples at {args.freq} Hz over {args.epochs} epochs of {args.images} images, CPU time / threads per step (first epoch included); "
           "PyTorch: torch.profiler self CPU time per op, 10 steps after 3 warm-up steps.", ""]
    with tempfile.TemporaryDirectory() as work:
        for model in args.models.split(","):
            fg, fg_step, samples = fgflow_profile(exe, model, args.images, args.epochs, args.threads, args.freq, work)
            th, th_step = torch_profile(py, model, args.threads)
            out += [f"### {model}: one training step, fgflow {fg_step:.0f} ms, PyTorch {th_step:.0f} ms ({samples} fgflow samples)", "",
                    "| op family | fgflow ms | PyTorch ms | fgflow / PyTorch |", "|---|---:|---:|---:|"]
            names = [f for f, _, _ in FAMILIES] + ["autograd glue", "Python, data, outside ops", OTHER]
            for f in names:
                a, b = fg.get(f, 0.0), th.get(f, 0.0)
                if a < 0.05 and b < 0.05:
                    continue
                ratio = f"{a / b:.1f}x" if b >= 0.05 and a >= 0.05 else "-"
                out.append(f"| {f} | {a:.1f} | {b:.1f} | {ratio} |")
            out += [f"| **step** | **{fg_step:.1f}** | **{th_step:.1f}** | **{fg_step / th_step:.1f}x** |", ""]
            print("\n".join(out[-len(names) - 6:]), file=sys.stderr)
    text = "\n".join(out)
    print(text)
    (HERE / "PROFILE.md").write_text("# One training step, op family by op family: fgflow vs PyTorch on this CPU\n\n"
                                     "Produced by `python3 benches/train_speed/op_profile.py`.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
