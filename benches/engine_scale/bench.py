#!/usr/bin/env python3
"""fgflow at cluster scale: load + plan (`status`) and a no-op `run` on chains of
10k / 100k / 1M `command` stages, wall time and peak RSS, median of several runs.

    cargo build --release && cargo build            # target/{release,debug}/fgflow
    python3 benches/engine_scale/bench.py           # full table, writes RESULTS.md here
    python3 benches/engine_scale/bench.py --quick   # 10k and 100k, 2 reps

Columns: the new release binary (absolute numbers), the new debug binary and a
baseline debug binary of an earlier commit (`--baseline`, default
/tmp/fgflow-debug-f957f4a), compared debug against debug as a ratio. Python 3 standard
library only: each command runs as a child process whose wall time is measured here
and whose peak RSS is the child's `ru_maxrss` from `os.wait4`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def chain(n: int) -> str:
    """A chain of `n` `command` stages as engine_vs writes it: stage i copies stage
    i-1's output and appends its own parameter; stage 0 reads a source file."""
    lines = ["(", "    stages: {"]
    lines.append('        "s0": (kind: "command", params: { "cmd": "cat data/input.txt > out.txt && echo 0 >> out.txt", '
                 '"deps": ["data/input.txt"], "outputs": { "out": "out.txt" } }),')
    for i in range(1, n):
        lines.append(f'        "s{i}": (kind: "command", inputs: {{ "prev": "s{i - 1}.out" }}, '
                     f'params: {{ "cmd": "cat inputs/prev/out.txt > out.txt && echo {i} >> out.txt", "outputs": {{ "out": "out.txt" }} }}),')
    lines += ["    },", ")", ""]
    return "\n".join(lines)


def fresh_dir(d: Path, n: int) -> Path:
    """An empty directory holding `chain.ron` of `n` stages and stage 0's input."""
    if d.exists():
        shutil.rmtree(d)
    (d / "data").mkdir(parents=True)
    (d / "data" / "input.txt").write_text("seed\n")
    (d / "chain.ron").write_text(chain(n))
    return d


def measure(argv: list[str], cwd: Path, timeout: float) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one command; stdout discarded."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = t0 + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            p.kill()
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = -9
            return float("inf"), ru.ru_maxrss / 1024, -9
        time.sleep(0.002)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if p.returncode != 0:
        print(f"  ! {' '.join(argv)} exited {p.returncode}: {err[-400:]}", file=sys.stderr)
    return wall, ru.ru_maxrss / 1024, p.returncode


def median_of(argv: list[str], cwd: Path, reps: int, timeout: float) -> dict:
    runs = []
    for _ in range(reps):
        w, rss, rc = measure(argv, cwd, timeout)
        runs.append((w, rss, rc))
        if rc != 0:
            break
    ok = all(rc == 0 for _, _, rc in runs)
    return {
        "wall": statistics.median(w for w, _, _ in runs),
        "rss": statistics.median(r for _, r, _ in runs),
        "runs": [round(w, 3) for w, _, _ in runs],
        "ok": ok,
    }


def fmt(cell: dict | None) -> tuple[str, str]:
    if cell is None:
        return "—", "—"
    if not cell["ok"]:
        return "failed/timeout", "—"
    return f"{cell['wall']:.2f} s", f"{cell['rss']:.0f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10k and 100k only, 2 reps")
    ap.add_argument("--ns", default="10000,100000,1000000", help="chain lengths for `status`")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--release", type=Path, default=target_dir() / "release" / "fgflow")
    ap.add_argument("--debug", type=Path, default=target_dir() / "debug" / "fgflow")
    ap.add_argument("--baseline", type=Path, default=Path("/tmp/fgflow-debug-f957f4a"), help="earlier commit's debug binary")
    ap.add_argument("--baseline-max-n", type=int, default=100000, help="largest chain the (superlinear) baseline is run on")
    ap.add_argument("--noop-run-n", type=int, default=10000, help="chain length of the no-op `run` row (0: skip)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per command, seconds")
    ap.add_argument("--work", type=Path, default=target_dir() / "engine_scale")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    a = ap.parse_args()
    ns = [10000, 100000] if a.quick else [int(x) for x in a.ns.split(",") if x]
    reps = 2 if a.quick else a.reps

    bins = {"release": a.release, "debug": a.debug, "baseline": a.baseline}
    for name, b in list(bins.items()):
        if not b.exists():
            print(f"note: {name} binary {b} not found: its column is left out", file=sys.stderr)
            del bins[name]
    if "release" not in bins:
        print("build the release binary first: cargo build --release", file=sys.stderr)
        return 2

    a.work.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int, str], dict] = {}
    for n in ns:
        d = fresh_dir(a.work / f"chain{n}", n)
        size = (d / "chain.ron").stat().st_size
        print(f"N={n}: chain.ron {size / 1e6:.1f} MB", file=sys.stderr)
        for name, b in bins.items():
            if name == "baseline" and n > a.baseline_max_n:
                continue
            if name == "debug" and n > 100000:
                continue
            cache = d / f".cache-{name}"
            argv = [str(b), "--cache-dir", str(cache), "status", "chain.ron"]
            # One unrecorded warm-up (page cache), except for the 1M row (one run).
            if n < 1000000:
                measure(argv, d, a.timeout)
            cell = median_of(argv, d, reps if n < 1000000 else 1, a.timeout)
            results[("status", n, name)] = cell
            print(f"  status {name:<8} wall {cell['runs']} s, peak {cell['rss']:.0f} MiB", file=sys.stderr)

    noop = a.noop_run_n
    if noop:
        d = fresh_dir(a.work / f"run{noop}", noop)
        cache = d / ".cache"
        print(f"N={noop}: full first run (release, untimed)...", file=sys.stderr)
        w, _, rc = measure([str(a.release), "--cache-dir", str(cache), "run", "chain.ron", "--json"], d, 3600)
        print(f"  first run {w:.1f} s, rc {rc}", file=sys.stderr)
        if rc == 0:
            for name, b in bins.items():
                argv = [str(b), "--cache-dir", str(cache), "run", "chain.ron", "--json"]
                measure(argv, d, a.timeout)
                cell = median_of(argv, d, reps, a.timeout)
                results[("run", noop, name)] = cell
                print(f"  no-op run {name:<8} wall {cell['runs']} s, peak {cell['rss']:.0f} MiB", file=sys.stderr)

    write(a, ns, noop, reps, bins, results)
    return 0


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores {cpu}{mem}, Python {platform.python_version()}"


def write(a, ns, noop, reps, bins, results) -> None:
    rows = [("status", n) for n in ns] + ([("run", noop)] if noop and any(k[0] == "run" for k in results) else [])
    lines = [
        "# engine_scale: loading, planning and a no-op run on very long chains",
        "",
        f"Generated by `python3 benches/engine_scale/bench.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine()}. Median of {reps} runs after one warm-up (1M: one run, no warm-up); peak RSS is the child's `ru_maxrss`.",
        "",
        "Pipeline: a chain of N `command` stages (engine_vs's shape). `status` rows: never run, so stage 0 is stale and every",
        "other stage pending. `run` row: a no-op run after one full run (every stage reused).",
        "",
        "| verb | N | release wall | release peak RSS | debug wall | debug RSS | baseline debug wall | baseline RSS | baseline / new (debug wall) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for verb, n in rows:
        r, d, b = (results.get((verb, n, k)) for k in ("release", "debug", "baseline"))
        ratio = "—"
        if d and b and d["ok"] and b["ok"] and d["wall"] > 0:
            ratio = f"{b['wall'] / d['wall']:.1f}x"
        elif d and b and d["ok"] and not b["ok"]:
            ratio = f"> {a.timeout / d['wall']:.0f}x (baseline timed out)"
        lines.append(f"| {verb} | {n:,} | {' | '.join(fmt(r))} | {' | '.join(fmt(d))} | {' | '.join(fmt(b))} | {ratio} |")
    lines += [
        "",
        "Binaries: " + ", ".join(f"{k} `{v}`" for k, v in bins.items()) + ".",
        f"The baseline (superlinear) is run up to N = {a.baseline_max_n:,} and the debug binary up to 100,000; '—' marks cells not run.",
        "",
        "Every repetition (seconds):",
        "",
    ]
    for (verb, n, k), c in sorted(results.items(), key=lambda x: (x[0][0] != "status", x[0][1], x[0][2])):
        lines.append(f"- {verb} N={n:,} {k}: {c['runs']}")
    lines.append("")
    a.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
