#!/usr/bin/env python3
"""Training speed of fgflow's CNN and ViT on burn (flex, ndarray) next to the same
models in PyTorch on the CPU, same thread count, batch 64, same generated images.

Each repetition runs every (model, implementation) once, in its own process (so peak
memory is per run), in an order that rotates between repetitions so that drift in the
machine's load hits all of them. Reported: the median over repetitions of the median
epoch rate (the first epoch of each run is dropped by the workers), the ratio to
PyTorch, and the median peak RSS.

    cargo build --release -p fgflow-stages --example train_speed [--features ndarray]
    python3 benches/train_speed/bench.py [--reps 5] [--images 640] [--epochs 3] [--threads 2]
    python3 benches/train_speed/bench.py --infer --images 2048   # prediction with flip TTA

PyTorch comes from PyPI into a throwaway virtualenv (default target/train_speed/venv;
`--python` to use another interpreter that has torch). Writes RESULTS.md beside this
script and prints the same table.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def torch_python(args):
    if args.python:
        return args.python
    venv = ROOT / "target" / "train_speed" / "venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch", "numpy", "timm"], check=True)
    return str(py)


def run(cmd, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python", help="interpreter with torch installed")
    ap.add_argument("--ndarray", action="store_true", help="also burn's ndarray backend (slow on the CNN; build the example with --features ndarray)")
    ap.add_argument("--infer", action="store_true",
                    help="time prediction (flip TTA, batch 256, no autodiff / torch.inference_mode()) instead of training; writes RESULTS-infer*.md")
    ap.add_argument("--models", default="cnn,vit,swinv2", help="comma-separated; a subset writes RESULTS-<models>.md instead of RESULTS.md")
    args = ap.parse_args()

    exe = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "examples" / "train_speed"
    if not exe.exists():
        sys.exit(f"{exe} is missing: cargo build --release -p fgflow-stages --example train_speed")
    py = torch_python(args)
    torch_script = str(HERE / "torch_train.py")
    n, e, t = str(args.images), str(args.epochs), args.threads
    mode = ["infer"] if args.infer else []
    torch_mode = ",'cpu','infer'" if args.infer else ""
    impls = {
        "burn-flex": lambda m: [str(exe), m, "flex", n, e, *mode],
        "pytorch": lambda m: [py, "-c", f"import torch,runpy,sys; torch.set_num_threads({t}); "
                              f"sys.argv=['torch_train.py','{m}','{n}','{e}'{torch_mode}]; runpy.run_path('{torch_script}', run_name='__main__')"],
    }
    if args.ndarray:
        impls["burn-ndarray"] = lambda m: [str(exe), m, "ndarray", n, e, *mode]
    models = [m for m in args.models.split(",") if m]
    cells = [(m, i) for m in models for i in impls]
    rates = {c: [] for c in cells}
    rss = {c: [] for c in cells}
    meta = {}
    for rep in range(args.reps):
        order = cells[rep % len(cells):] + cells[:rep % len(cells)]
        for model, impl in order:
            r = run(impls[impl](model), t)
            rates[(model, impl)].append(statistics.median(r["images_per_sec"]))
            rss[(model, impl)].append(r["peak_rss_mib"])
            meta[(model, impl)] = (r["impl"], r["params"])
            print(f"rep {rep + 1}: {model} {r['impl']}: {rates[(model, impl)][-1]:.0f} img/s, peak {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    lines = [
        f"Machine: {cpu}, {os.cpu_count()} cores; {t} threads (RAYON_NUM_THREADS / torch.set_num_threads); "
        + (f"prediction with flip TTA (two forward passes), batch 256, no autodiff / torch.inference_mode(), {args.images} images of "
           f"28x28x1, 345 classes, {args.epochs} passes per run (the first dropped); " if args.infer else
           f"batch 64, {args.images} images of 28x28x1, 345 classes, {args.epochs} epochs per run (the first dropped); ")
        + f"median of {args.reps} alternating repetitions.",
        "",
        "| model | implementation | params | images/s (median) | all repetitions | vs PyTorch | peak RSS (MiB) |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for model in models:
        base = statistics.median(rates[(model, "pytorch")])
        for impl in impls:
            c = (model, impl)
            med = statistics.median(rates[c])
            name, params = meta[c]
            lines.append(f"| {model} | {name} | {params} | {med:.0f} | {', '.join(f'{v:.0f}' for v in rates[c])} | "
                         f"{med / base:.2f}x | {statistics.median(rss[c]):.0f} |")
    table = "\n".join(lines)
    print(table)
    stem = "RESULTS-infer" if args.infer else "RESULTS"
    out = f"{stem}.md" if models == ["cnn", "vit", "swinv2"] else f"{stem}-{'-'.join(models)}.md"
    title = "Prediction speed (flip TTA)" if args.infer else "Training speed"
    flags = " --infer" if args.infer else ""
    (HERE / out).write_text(f"# {title}: burn (fgflow) vs PyTorch on this CPU\n\n"
                            f"Produced by `python3 benches/train_speed/bench.py{flags}`.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
