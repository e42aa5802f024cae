#!/usr/bin/env python3
"""The data model at the seed's scale, on a generated folder in the seed's layout:
train/<class>/*.jpg (IMAGES JPEGs of 256x256 in CLASSES classes) and testa/ (TEST
JPEGs), drawn procedurally here into a temporary directory (never committed).

Measured in one run, side by side where there is a baseline:
- import: `fgflow status` cold (hashes every file through the stat cache), again (one
  `stat` per file), the `import_folder` stage itself, a no-op `run`, and a `run` after
  one image was rewritten;
- the loader: images/s decoded + random-resized-cropped to 224 + flipped, 2 threads,
  fgflow (`stages/examples/loader_speed.rs`) against PyTorch's DataLoader with
  torchvision's transforms (PIL) and 2 workers on the same files, alternating, medians;
- memory: peak RSS of the pipeline (import, a few dozen training steps of a small CNN
  at 224 px, predicting test A with flip TTA, pseudo-labels), over all IMAGES training
  images and over a tenth of them (a `train_list`), and of `fgflow status`.

    cargo build --release && cargo build --release -p fgflow-stages --example loader_speed
    python3 benches/data_scale/bench.py [--images 100000] [--classes 300] [--test 3000] [--reps 3]

PyTorch and torchvision come from PyPI into the throwaway virtualenv that
benches/train_speed uses (target/train_speed/venv; `--python` for another). Writes
RESULTS.md beside this script and prints the same table.
"""

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
FGFLOW = TARGET / "release" / "fgflow"
LOADER = TARGET / "release" / "examples" / "loader_speed"

GENERATE = r'''
import random, sys
from pathlib import Path
from PIL import Image, ImageDraw
root, start, end, classes, test = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
for i in range(start, end):
    is_test = i < test
    c = i % classes
    rng = random.Random(i)
    hue = ((c * 37) % 255, (c * 91) % 255, (c * 53) % 255)
    img = Image.new("RGB", (256, 256), tuple(v // 3 for v in hue))
    d = ImageDraw.Draw(img)
    for k in range(6):
        x, y, r = rng.randrange(256), rng.randrange(256), rng.randrange(10, 70)
        shade = tuple(min(255, v + rng.randrange(60)) for v in hue)
        (d.ellipse if (c + k) % 2 else d.rectangle)([x - r, y - r, x + r, y + r], fill=shade)
    for _ in range(300):
        d.point((rng.randrange(256), rng.randrange(256)), fill=(rng.randrange(256),) * 3)
    path = root / "testa" / f"{i:06d}.jpg" if is_test else root / "train" / f"c{c:03d}" / f"{i:06d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90)
'''

TORCH_LOADER = r'''
import json, sys, time, torch
from PIL import Image
from torchvision import transforms
files = [l.strip() for l in open(sys.argv[1]) if l.strip()]
size, workers, batch = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor()])
class Files(torch.utils.data.Dataset):
    def __len__(self): return len(files)
    def __getitem__(self, i): return tf(Image.open(files[i]).convert("RGB")), 0
dl = torch.utils.data.DataLoader(Files(), batch_size=batch, shuffle=True, num_workers=workers, prefetch_factor=2 if workers else None)
start = time.perf_counter(); seen = 0
for x, _ in dl:
    seen += x.shape[0]
secs = time.perf_counter() - start
print(json.dumps({"images": seen, "seconds": secs, "images_per_sec": seen / secs, "threads": workers}))
'''


def torch_python(args):
    if args.python:
        return args.python
    py = ROOT / "target" / "train_speed" / "venv" / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(py.parent.parent)], check=True)
    if subprocess.run([str(py), "-c", "import torch, torchvision, PIL"], capture_output=True).returncode != 0:
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch", "torchvision", "pillow", "numpy"], check=True)
    return str(py)


def timed(cmd, cwd=None, env=None):
    """Wall seconds, peak RSS (MiB) and stdout of a command, through /usr/bin/time -v."""
    started = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v"] + [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if p.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    return wall, rss, p.stdout


def pipeline(root, train_list=None):
    lst = f', "train_list": "{train_list}"' if train_list else ""
    return f'''(
  stages: {{
    "data": (kind: "import_folder", params: {{ "root": "{root}", "val_per_class": 0{lst} }}),
    "net": (kind: "train", inputs: {{ "train": "data.train" }}, params: {{
      "backbone": "cnn", "cnn_widths": [8, 16, 32], "cnn_blocks": 1, "image_size": 224, "aug_crop_scale": 0.08,
      "epochs": 1, "max_steps": 30, "batch_size": 32, "warmup_epochs": 0.0, "keep_checkpoints": 1,
    }}),
    "pa": (kind: "predict", inputs: {{ "model": "net.model", "images": "data.testa" }}, params: {{ "flip_tta": true, "batch_size": 32 }}),
    "pl": (kind: "pseudo_label", inputs: {{ "predictions": "pa.predictions", "images": "data.testa", "train": "data.train" }}, params: {{ "threshold": 0.0 }}),
  }},
)
'''


def stage_seconds(out):
    """`ran STAGE KEY 12.3s` lines of `fgflow run` -> {stage: seconds}."""
    times = {}
    for m in re.finditer(r"ran\s+(\S+)\s+\S+\s+([\d.]+)(ms|s)\b", out):
        times[m.group(1)] = float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=300)
    ap.add_argument("--test", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--loader-images", type=int, default=4000)
    ap.add_argument("--python", help="interpreter with torch, torchvision and PIL")
    ap.add_argument("--keep", help="generate into (or reuse) this directory instead of a temporary one")
    args = ap.parse_args()
    for binary in (FGFLOW, LOADER):
        if not binary.exists():
            sys.exit(f"{binary} missing: cargo build --release && cargo build --release -p fgflow-stages --example loader_speed")
    py = torch_python(args)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fgflow-data-scale-"))
    data = work / "data"
    rows = []
    try:
        total = args.images + args.test
        if not (data / "train").is_dir():
            script = work / "generate.py"
            work.mkdir(parents=True, exist_ok=True)
            script.write_text(GENERATE)
            started = time.perf_counter()
            half = total // 2
            procs = [subprocess.Popen([py, str(script), str(data), str(a), str(b), str(args.classes), str(args.test)]) for a, b in ((0, half), (half, total))]
            if any(p.wait() != 0 for p in procs):
                sys.exit("generating the folder failed")
            print(f"generated {total} JPEGs in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        size_mb = sum(f.stat().st_size for f in data.rglob("*.jpg")) / 2**20
        files = sorted(str(p) for p in (data / "train").rglob("*.jpg"))
        # A tenth of the training images, as an annotation list in the same root.
        tenth = files[:: 10]
        (data / "tenth.txt").write_text("".join(f"{Path(f).relative_to(data)} {int(Path(f).parent.name[1:])}\n" for f in tenth))
        (data / "classes.txt").write_text("".join(f"c{c:03d}\n" for c in range(args.classes)))

        env = dict(os.environ, RAYON_NUM_THREADS="2")
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        full = work / "full.ron"
        full.write_text(pipeline(data))
        fg = [FGFLOW, "--cache-dir", cache]
        # `status` reads the stat cache but never writes the cache (a reading verb);
        # `run` saves it, so the second `status` is the one after a run.
        cold_status, cold_status_rss, _ = timed(fg + ["status", full], env=env)
        run_wall, run_rss, out = timed(fg + ["run", full], env=env)
        stages = stage_seconds(out)
        warm_status, warm_status_rss, _ = timed(fg + ["status", full], env=env)
        noop_wall, _, _ = timed(fg + ["run", full], env=env)
        # One file written again with its own bytes (a new mtime, the same content), then
        # one image changed (a pixel of a colour drawn from the clock, so never a
        # content seen before).
        victim = Path(files[len(files) // 2])
        victim.write_bytes(victim.read_bytes())
        same_wall, _, out = timed(fg + ["run", full], env=env)
        same = stage_seconds(out)
        subprocess.run([py, "-c", "import sys, time; from PIL import Image; im = Image.open(sys.argv[1]).convert('RGB'); "
                        "im.putpixel((0, 0), (int(time.time() * 1000) % 256, 7, 7)); im.save(sys.argv[1], quality=90)", str(victim)], check=True)
        touched_wall, _, out = timed(fg + ["run", full], env=env)
        touched = stage_seconds(out)
        part = work / "tenth.ron"
        part.write_text(pipeline(data, "tenth.txt").replace('"val_per_class": 0', '"classes": "classes.txt", "val_per_class": 0'))
        part_wall, part_rss, out = timed(fg + ["run", part], env=env)
        part_stages = stage_seconds(out)

        # The loader, both sides on the same files, alternating.
        export = work / "set"
        shutil.rmtree(export, ignore_errors=True)
        timed(fg + ["export", "-p", full, "data.train", export], env=env)
        sample = random.Random(0).sample(files, min(args.loader_images, len(files)))
        lst = work / "sample.txt"
        lst.write_text("\n".join(sample) + "\n")
        tscript = work / "torch_loader.py"
        tscript.write_text(TORCH_LOADER)
        ours, theirs = [], []
        for rep in range(args.reps):
            for side in ((0, 1) if rep % 2 == 0 else (1, 0)):
                if side == 0:
                    _, _, o = timed([LOADER, export, 224, 2, args.loader_images, 64], env=env)
                    ours.append(json.loads(o.strip().splitlines()[-1])["images_per_sec"])
                else:
                    _, _, o = timed([py, tscript, lst, 224, 2, 64], env=dict(os.environ, OMP_NUM_THREADS="1"))
                    theirs.append(json.loads(o.strip().splitlines()[-1])["images_per_sec"])
        lo, lt = statistics.median(ours), statistics.median(theirs)

        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
        try:
            model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
            machine = f"{model}, {os.cpu_count()} cores"
        except (OSError, StopIteration):
            pass
        rows = [
            ("data", f"{args.images} training JPEGs of 256x256 in {args.classes} classes + {args.test} in testa/, {size_mb:.0f} MiB"),
            ("`fgflow status` before any run (hashes every file)", f"{cold_status:.1f} s, peak RSS {cold_status_rss:.0f} MiB"),
            ("`fgflow status` after the run (a `stat` per file)", f"{warm_status:.2f} s, peak RSS {warm_status_rss:.0f} MiB"),
            ("`import_folder` (checks and stores every file once)", f"{stages.get('data', float('nan')):.1f} s"),
            ("train: 30 steps of 32 at 224 px (CNN 8-16-32)", f"{stages.get('net', float('nan')):.1f} s"),
            (f"predict: {args.test} test images at 224 px, flip TTA, batch 32", f"{stages.get('pa', float('nan')):.1f} s"),
            ("pseudo_label: the merged set", f"{stages.get('pl', float('nan')):.2f} s"),
            ("the whole first `run`", f"{run_wall:.1f} s, peak RSS **{run_rss:.0f} MiB**"),
            ("the same pipeline over a tenth of the images (`train_list`)", f"{part_wall:.1f} s (import {part_stages.get('data', float('nan')):.1f} s), peak RSS **{part_rss:.0f} MiB**"),
            ("no-op `run`", f"{noop_wall:.2f} s"),
            ("`run` after one file was written again with the same bytes", f"{same_wall:.2f} s (re-ran: {', '.join(sorted(same)) or 'nothing'})"),
            ("`run` after one image was changed", f"{touched_wall:.1f} s (re-ran: {', '.join(sorted(touched)) or 'nothing'}; import {touched.get('data', float('nan')):.1f} s)"),
            (f"loader, 224 px random resized crop + flip, 2 threads ({args.loader_images} images, median of {args.reps})",
             f"fgflow **{lo:.0f}** images/s, PyTorch DataLoader (PIL, 2 workers) {lt:.0f} images/s: **{lo / lt:.2f}x**"),
        ]
        text = [f"# The data model at scale (benches/data_scale/bench.py)", "",
                f"Machine: {machine}. {time.strftime('%Y-%m-%d')}. torch {subprocess.run([py, '-c', 'import torch, torchvision; print(torch.__version__, torchvision.__version__)'], capture_output=True, text=True).stdout.strip()}.", "",
                "| measurement | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
        text += ["", f"fgflow loader runs (images/s): {', '.join(f'{v:.0f}' for v in ours)}; PyTorch: {', '.join(f'{v:.0f}' for v in theirs)}."]
        (HERE / "RESULTS.md").write_text("\n".join(text) + "\n")
        print("\n".join(text))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
