#!/usr/bin/env python3
"""fgflow vs DVC vs Snakemake on synthetic chains of trivial `command` stages.

Python 3.11 standard library only. DVC and Snakemake come from PyPI into a throwaway
virtualenv that this script creates (default: target/engine_vs/venv).

Method (same as shared/design/PIPELINE-ANCHORS.md section B):
  * a chain of N stages; stage i runs `cat <prev> > out && echo <param s_i> >> out`
    (stage 0 reads data/input.txt, or in the 1 GiB variant `head -c 4096 data/big.bin | cksum`);
  * scenarios: (1) full first run, (2a) no-op status / dry-run, (2b) no-op re-run,
    (3a) edit the param of stage N/2 to a never-seen value, (3b) output-preserving edit
    of stage N/2's command (`true vK && ` prefix: early-cutoff test), (3c) flip the param
    of stage N/2 between two previously-run values (run-cache test), and in the 1 GiB
    variant (4) full run, no-op status/run, `touch data/big.bin` then status / run;
  * every cell is the median of R timed repetitions of wall time and CPU time
    (user+sys of the whole process tree, from RUSAGE_CHILDREN), with the number of
    stages the tool actually executed (and restored from its cache) parsed from its
    output; a fresh copy of a template directory before every "full" repetition; one
    unrecorded warm-up before the no-op scenarios; os.sync() before every timed command;
  * bytes read from the 1 GiB input by the tool itself (not by the stage commands) are
    counted once per scenario with `strace -f -y` in separate, untimed probe runs.

Usage:
  python3 benches/engine_vs/bench.py            # full: N in 10,100,1000, R=5, < 20 min
  python3 benches/engine_vs/bench.py --quick    # smoke: N in 10,100, R=2
See --help for the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TOOLS = ("fgflow", "dvc", "snakemake")
TOOL_TITLE = {"fgflow": "fgflow", "dvc": "DVC", "snakemake": "Snakemake"}

CHAIN_SCENARIOS = [
    ("full", "(1) full first run"),
    ("status", "(2a) no-op status / dry-run"),
    ("noop", "(2b) no-op re-run"),
    ("edit", "(3a) edit param of stage N/2 (new value)"),
    ("cutoff", "(3b) output-preserving edit of stage N/2's cmd"),
    ("revert", "(3c) revert param of stage N/2 to a previously-run value"),
]
BIG_SCENARIOS = [
    ("full", "(4) full first run (hashes the 1 GiB input)"),
    ("status", "(4a) no-op status / dry-run"),
    ("noop", "(4b) no-op re-run"),
    ("touch_status", "(4c) `touch big.bin`, then status / dry-run"),
    ("touch_run", "(4d) `touch big.bin`, then re-run"),
]
PROBES = [
    ("noop", "no-op run (input untouched for > 2 s)"),
    ("touch_run", "`touch big.bin`, then run"),
    ("again", "run again at once (< 2 s after the touch)"),
    ("later", "run again 3 s later"),
    ("settled", "run again"),
]
COMMAND_EXES = {"sh", "dash", "bash", "head", "cat", "cksum", "echo", "true"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pipelines


class Chain:
    """One tool's chain of N stages, with editable param values and command prefixes."""

    def __init__(self, tool: str, n: int, big: bool):
        self.tool, self.n, self.big = tool, n, big
        self.values = {i: str(i) for i in range(n)}
        self.prefix = {i: "" for i in range(n)}

    # ---- rendering
    def stage0_read(self, out: str) -> str:
        if self.big:
            return f"head -c 4096 data/big.bin | cksum > {out}"
        return f"cat data/input.txt > {out}"

    def files(self) -> dict[str, str]:
        return getattr(self, f"_files_{self.tool}")()

    def _files_fgflow(self) -> dict[str, str]:
        dep = "data/big.bin" if self.big else "data/input.txt"
        lines = ["(", "    stages: {"]
        for i in range(self.n):
            if i == 0:
                cmd = f"{self.prefix[i]}{self.stage0_read('out.txt')} && echo {self.values[i]} >> out.txt"
                lines.append(f'        "s0": (kind: "command", params: {{ "cmd": "{cmd}", "deps": ["{dep}"], "outputs": {{ "out": "out.txt" }} }}),')
            else:
                cmd = f"{self.prefix[i]}cat inputs/prev/out.txt > out.txt && echo {self.values[i]} >> out.txt"
                lines.append(f'        "s{i}": (kind: "command", inputs: {{ "prev": "s{i - 1}.out" }}, params: {{ "cmd": "{cmd}", "outputs": {{ "out": "out.txt" }} }}),')
        lines += ["    },", ")", ""]
        return {"chain.ron": "\n".join(lines)}

    def _params_yaml(self) -> str:
        return "".join(f"s{i}: {self.values[i]}\n" for i in range(self.n))

    def _files_dvc(self) -> dict[str, str]:
        out = ["stages:"]
        for i in range(self.n):
            dep = ("data/big.bin" if self.big else "data/input.txt") if i == 0 else f"out/s{i - 1}.txt"
            read = self.stage0_read(f"out/s{i}.txt") if i == 0 else f"cat out/s{i - 1}.txt > out/s{i}.txt"
            out += [
                f"  s{i}:",
                f"    cmd: {self.prefix[i]}{read} && echo ${{s{i}}} >> out/s{i}.txt",
                f"    deps: [{dep}]",
                f"    params: [s{i}]",
                f"    outs: [out/s{i}.txt]",
            ]
        return {"dvc.yaml": "\n".join(out) + "\n", "params.yaml": self._params_yaml()}

    def _files_snakemake(self) -> dict[str, str]:
        out = [
            "# A chain deeper than ~400 makes Snakemake's DAG construction hit Python's default",
            "# recursion limit (RecursionError), so the limit is raised for every N.",
            "import sys",
            "sys.setrecursionlimit(100000)",
            'configfile: "params.yaml"',
            "",
            "rule all:",
            f'    input: "out/s{self.n - 1}.txt"',
            "",
        ]
        for i in range(self.n):
            inp = ("data/big.bin" if self.big else "data/input.txt") if i == 0 else f"out/s{i - 1}.txt"
            read = self.stage0_read("{output}") if i == 0 else "cat {input} > {output}"
            out += [
                f"rule s{i}:",
                f'    input: "{inp}"',
                f'    output: "out/s{i}.txt"',
                f'    params: p=config["s{i}"]',
                f'    shell: "{self.prefix[i]}{read} && echo {{params.p}} >> {{output}}"',
                "",
            ]
        return {"Snakefile": "\n".join(out), "params.yaml": self._params_yaml()}

    def write(self, d: Path) -> None:
        for name, text in self.files().items():
            p = d / name
            if not p.exists() or p.read_text() != text:
                p.write_text(text)


# --------------------------------------------------------------------------- running


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.root = Path(args.workdir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.venv = Path(args.venv).resolve() if args.venv else self.root / "venv"
        self.fgflow = Path(args.fgflow).resolve()
        self.results: dict = {}  # key "tool|variant|n|scenario" -> cell dict
        self.probes: dict = {}  # key "tool|n|probe" -> dict
        self.counter = 0
        self.versions: dict[str, str] = {}
        self.strace = shutil.which("strace") if not args.no_strace else None
        self.loads: list[float] = []

    # ---- environment
    def env(self, tool: str, work: Path) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("GIT_DIR", "GIT_WORK_TREE", "FGFLOW_CACHE", "VIRTUAL_ENV", "PYTHONPATH"):
            env.pop(k, None)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["DVC_NO_ANALYTICS"] = "1"
        env["DVC_SITE_CACHE_DIR"] = str(work / ".dvc-site-cache")
        env["DVC_GLOBAL_CONFIG_DIR"] = str(work / ".dvc-global")
        env["DVC_SYSTEM_CONFIG_DIR"] = str(work / ".dvc-system")
        env["XDG_CACHE_HOME"] = str(self.root / "xdg-cache")
        env["GIT_CONFIG_NOSYSTEM"] = "1"
        env["HOME"] = str(self.root / "home")
        (self.root / "home").mkdir(exist_ok=True)
        return env

    def setup_venv(self) -> None:
        if "dvc" not in self.a.tools and "snakemake" not in self.a.tools:
            return
        py = self.venv / "bin" / "python"
        ok = py.exists() and all((self.venv / "bin" / t).exists() for t in ("dvc", "snakemake"))
        if not ok:
            log(f"creating virtualenv {self.venv} and installing {' '.join(self.a.pip_spec)} (a few minutes)")
            subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
            subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *self.a.pip_spec], check=True)
        else:
            log(f"reusing virtualenv {self.venv}")

    def collect_versions(self) -> None:
        def out(cmd: list[str]) -> str:
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, env=self.env("x", self.root), timeout=120)
                return (r.stdout.strip() or r.stderr.strip()).splitlines()[-1]
            except Exception as e:  # noqa: BLE001 - report whatever went wrong
                return f"unknown ({e})"

        if "fgflow" in self.a.tools:
            v = out([str(self.fgflow), "--version"])
            try:
                rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
                dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
                v += f" (git {rev}{', with uncommitted changes' if dirty else ''}; {self.fgflow.relative_to(REPO) if self.fgflow.is_relative_to(REPO) else self.fgflow})"
            except Exception:  # noqa: BLE001
                pass
            self.versions["fgflow"] = v
        if "dvc" in self.a.tools or "snakemake" in self.a.tools:
            py = str(self.venv / "bin" / "python")
            self.versions["dvc"] = "dvc " + out([py, "-c", "import importlib.metadata as m; print(m.version('dvc'), '(dvc-data', m.version('dvc-data') + ')')"])
            self.versions["snakemake"] = "snakemake " + out([py, "-c", "import importlib.metadata as m; print(m.version('snakemake'))"])
            self.versions["python (venv)"] = out([py, "--version"])
        self.versions["harness python"] = platform.python_version()
        self.versions["git"] = out(["git", "--version"])
        if self.strace:
            self.versions["strace"] = subprocess.run([self.strace, "-V"], capture_output=True, text=True).stdout.splitlines()[0]

    # ---- one timed command
    def timed(self, cmd: list[str], cwd: Path, env: dict, logname: str) -> tuple[float, float, int, str, int]:
        """Run cmd; (wall s, CPU s of its process tree, rc, stdout+stderr, peak RSS KiB) from wait4."""
        os.sync()
        out_path, err_path = self.logs / f"{logname}.out", self.logs / f"{logname}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        cpu = ru.ru_utime + ru.ru_stime
        stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
        out_path.unlink()
        err_path.unlink()
        text = stdout + ("\n--- stderr ---\n" + stderr if stderr else "")
        (self.logs / f"{logname}.log").write_text(f"$ {' '.join(cmd)}\n# cwd {cwd}\n# rc {p.returncode} wall {wall:.3f} cpu {cpu:.3f} maxrss {ru.ru_maxrss} KiB\n{text}")
        self.loads.append(os.getloadavg()[0])
        return wall, cpu, p.returncode, text, ru.ru_maxrss

    # ---- tool adapters
    def cmd(self, tool: str, action: str) -> list[str]:
        if tool == "fgflow":
            return [str(self.fgflow), action, "chain.ron", "--json"]
        if tool == "dvc":
            return [str(self.venv / "bin" / "dvc"), "repro" if action == "run" else "status"]
        return [str(self.venv / "bin" / "snakemake"), "-c1"] + (["-n"] if action == "status" else [])

    @staticmethod
    def count(tool: str, action: str, text: str) -> tuple[int | None, int]:
        """(stages executed or needing a run, stages restored from a run cache)."""
        if tool == "fgflow":
            try:
                doc = json.loads(text.split("\n--- stderr ---\n")[0])
            except json.JSONDecodeError:
                return None, 0
            if action == "run":
                return doc["summary"]["ran"], 0
            return sum(1 for s in doc["stages"] if s["status"] != "fresh"), 0
        if tool == "dvc":
            if action == "run":
                return len(re.findall(r"^Running stage '", text, re.M)), len(re.findall(r"is cached - skipping run", text))
            return len(re.findall(r"^s\d+:", text, re.M)), 0
        return len(re.findall(r"^\s*(?:local)?rule s\d+:", text, re.M)), 0

    def init_template(self, tool: str, d: Path, chain: Chain) -> None:
        (d / "data").mkdir(parents=True)
        if chain.big:
            big = self.big_file()
            # Back-date the shared input (a "touch" before the fresh full runs, which hash it
            # anyway) so that it is never inside fgflow's 2 s racy-mtime window when the
            # no-op scenarios start, whatever ran before it.
            old = time.time() - 60
            os.utime(big, (old, old))
            os.link(big, d / "data" / "big.bin")
        else:
            (d / "data" / "input.txt").write_text("hello\n")
        chain.write(d)
        if tool == "dvc":
            (d / "out").mkdir()
            env = self.env(tool, d)
            subprocess.run(["git", "init", "-q"], cwd=d, env=env, check=True)
            subprocess.run([str(self.venv / "bin" / "dvc"), "init", "-q"], cwd=d, env=env, check=True)
            subprocess.run([str(self.venv / "bin" / "dvc"), "config", "core.analytics", "false"], cwd=d, env=env, check=True)
            subprocess.run([str(self.venv / "bin" / "dvc"), "config", "core.check_update", "false"], cwd=d, env=env, check=True)

    def big_file(self) -> Path:
        p = self.root / "big.bin"
        if not p.exists() or p.stat().st_size != self.a.big_size:
            log(f"writing a {self.a.big_size / 2**30:.2f} GiB random file {p}")
            tmp = p.with_suffix(".tmp")
            chunk = 64 << 20
            with open(tmp, "wb") as f:
                left = self.a.big_size
                while left > 0:
                    f.write(os.urandom(min(chunk, left)))
                    left -= chunk
            tmp.rename(p)
            os.sync()
        return p

    @staticmethod
    def fresh_copy(template: Path, work: Path) -> None:
        if work.exists():
            shutil.rmtree(work)

        def copy(src: str, dst: str) -> None:
            if src.endswith("big.bin"):
                os.link(src, dst)  # the 1 GiB input is shared by hard link; touch changes it for all
            else:
                shutil.copy2(src, dst)

        shutil.copytree(template, work, copy_function=copy, symlinks=True)

    # ---- one (tool, N, variant)
    def cell(self, tool: str, variant: str, n: int, scen: str, samples: list, note: str = "") -> None:
        walls = [s[0] for s in samples]
        cpus = [s[1] for s in samples]
        ran = [s[2] for s in samples]
        restored = [s[3] for s in samples]
        rss = [s[4] for s in samples]
        self.results[f"{tool}|{variant}|{n}|{scen}"] = {
            "wall": statistics.median(walls) if walls else None,
            "cpu": statistics.median(cpus) if cpus else None,
            "walls": walls,
            "cpus": cpus,
            "ran": ran,
            "restored": restored,
            # ru_maxrss of a child includes the harness's own RSS at fork time, so it is
            # kept in results.json only as an upper bound, not reported.
            "maxrss_kib": rss,
            "note": note,
        }

    def skip(self, tool: str, variant: str, n: int, why: str) -> None:
        scen = CHAIN_SCENARIOS if variant == "chain" else BIG_SCENARIOS
        for s, _ in scen:
            self.results.setdefault(f"{tool}|{variant}|{n}|{s}", {"skipped": why})

    def run_one(self, tool: str, n: int, big: bool) -> None:
        variant = "big" if big else "chain"
        name = f"{tool}-{variant}-{n}"
        base = self.root / "runs" / name
        if base.exists():
            shutil.rmtree(base)
        template, work = base / "template", base / "work"
        chain = Chain(tool, n, big)
        self.init_template(tool, template, chain)
        env = self.env(tool, work)
        reps = self.a.reps
        heavy = self.a.heavy_reps if (tool != "fgflow" and n >= self.a.heavy_n) else reps  # (1), (3a), (3b), (3c)
        t_start = time.perf_counter()
        mid = n // 2

        def go(action: str, label: str, scen: str, i: int) -> tuple[float, float, int | None, int] | None:
            wall, cpu, rc, text, rss = self.timed(self.cmd(tool, action), work, env, f"{name}.{label}.{i}")
            ran, restored = self.count(tool, action, text)
            if rc != 0:
                log(f"  {name} {label} #{i}: FAILED rc={rc} (see {self.logs / f'{name}.{label}.{i}.log'})")
                last = [l for l in text.strip().splitlines() if l.strip()][-1:] or [""]
                self.skip(tool, variant, n, f"**fails** (rc={rc} in {scen}: {last[0][:80]})")
                return None
            return wall, cpu, ran, restored, rss

        def sample(scen: str, action: str, count: int, before=None, warmup: bool = False) -> bool:
            samples = []
            if warmup:
                if before:
                    before(-1)
                if go(action, scen, scen, -1) is None:
                    return False
            for i in range(count):
                if before:
                    before(i)
                s = go(action, scen, scen, i)
                if s is None:
                    return False
                samples.append(s)
            self.cell(tool, variant, n, scen, samples)
            c = self.results[f"{tool}|{variant}|{n}|{scen}"]
            log(f"  {name} {scen}: wall {c['wall']:.3f} s, cpu {c['cpu']:.3f} s, ran {c['ran']}" + (f", restored {c['restored']}" if any(c['restored']) else ""))
            return True

        # (1) full runs, each on a fresh copy (fresh cache)
        def fresh(_i: int) -> None:
            self.fresh_copy(template, work)

        if not sample("full", "run", heavy, before=fresh):
            return
        if not sample("status", "status", reps, warmup=True):
            return
        if not sample("noop", "run", reps, warmup=True):
            return
        if big:
            touch = lambda _i: os.utime(work / "data" / "big.bin")  # noqa: E731
            if not sample("touch_status", "status", reps, before=touch):
                return
            if not sample("touch_run", "run", reps, before=touch):
                return
            self.probe(tool, n, work, env, name)
            log(f"  {name} done in {time.perf_counter() - t_start:.0f} s")
            return

        # (3a) a never-seen value for s_{N/2}
        def new_value(_i: int) -> None:
            self.counter += 1
            chain.values[mid] = str(100000 + self.counter)
            chain.write(work)

        if not sample("edit", "run", heavy, before=new_value):
            return

        # (3b) output-preserving command edit: prefix `true vK && `
        def cutoff(_i: int) -> None:
            self.counter += 1
            chain.prefix[mid] = f"true v{self.counter} && "
            chain.write(work)

        if not sample("cutoff", "run", heavy, before=cutoff):
            return

        # (3c) flip between two values that were both run before (untimed set-up runs)
        for v in ("7001", "7002"):
            chain.values[mid] = v
            chain.write(work)
            if go("run", "revert-setup", "revert", int(v)) is None:
                return

        def revert(i: int) -> None:
            chain.values[mid] = "7001" if i % 2 == 0 else "7002"
            chain.write(work)

        sample("revert", "run", heavy, before=revert)
        log(f"  {name} done in {time.perf_counter() - t_start:.0f} s")

    # ---- strace probes: bytes of big.bin read by the tool itself
    def probe(self, tool: str, n: int, work: Path, env: dict, name: str) -> None:
        if not self.strace:
            return
        big = work / "data" / "big.bin"
        time.sleep(0.2)  # let the input's mtime age past fgflow's 50 ms "racy" window
        self.timed(self.cmd(tool, "run"), work, env, f"{name}.probe-settle")
        for key, _label in PROBES:
            if key == "touch_run":
                os.utime(big)
            if key == "later":
                time.sleep(3)
            trace = self.logs / f"{name}.strace.{key}.txt"
            cmd = [self.strace, "-f", "-y", "-qq", "-e", "trace=execve,read,pread64,mmap", "-o", str(trace), *self.cmd(tool, "run")]
            p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            ran, _ = self.count(tool, "run", p.stdout + p.stderr)
            tool_bytes, cmd_bytes = parse_strace(trace)
            self.probes[f"{tool}|{n}|{key}"] = {"bytes": tool_bytes, "command_bytes": cmd_bytes, "ran": ran, "rc": p.returncode}
            log(f"  {name} probe {key}: tool read {tool_bytes} B of big.bin, stage commands {cmd_bytes} B, ran {ran}")
            trace.unlink(missing_ok=True)  # can be hundreds of MB for DVC

    def run_all(self) -> None:
        for n in self.a.ns:
            for tool in self.a.tools:
                if tool == "dvc" and n > self.a.max_dvc_n:
                    self.skip(tool, "chain", n, f"skipped (N > --max-dvc-n {self.a.max_dvc_n})")
                    continue
                log(f"{tool} chain N={n}")
                self.run_one(tool, n, big=False)
        for n in self.a.big_ns:
            for tool in self.a.tools:
                if tool == "dvc" and n > self.a.max_dvc_n:
                    self.skip(tool, "big", n, f"skipped (N > --max-dvc-n {self.a.max_dvc_n})")
                    continue
                log(f"{tool} 1 GiB variant N={n}")
                self.run_one(tool, n, big=True)


def parse_strace(path: Path) -> tuple[int, int]:
    """Bytes of big.bin read (read/pread64 results + mmap lengths) by the tool's own
    processes and by the stage commands (processes that exec'd sh/head/cat/cksum)."""
    command_pids: set[str] = set()
    pending: dict[str, str] = {}
    tool = cmd = 0
    rx_exec = re.compile(r'^(\d+)\s+execve\("([^"]+)"')
    rx_read = re.compile(r"^(\d+)\s+p?read(?:64)?\(\d+<([^>]*)>.*\)\s+=\s+(\d+)")
    rx_unfin = re.compile(r"^(\d+)\s+p?read(?:64)?\(\d+<([^>]*)>.*<unfinished \.\.\.>")
    rx_resum = re.compile(r"^(\d+)\s+<\.\.\. p?read(?:64)? resumed>.*=\s+(\d+)")
    rx_mmap = re.compile(r"^(\d+)\s+mmap\([^,]*,\s*(\d+),[^,]*,[^,]*,\s*\d+<([^>]*)>")
    try:
        f = open(path, errors="replace")
    except OSError:
        return -1, -1
    with f:
        for line in f:
            if "execve(" in line:
                m = rx_exec.match(line)
                if m and os.path.basename(m.group(2)) in COMMAND_EXES:
                    command_pids.add(m.group(1))
                continue
            got = None
            if (m := rx_read.match(line)) is not None:
                got = (m.group(1), m.group(2), int(m.group(3)))
            elif (m := rx_unfin.match(line)) is not None:
                pending[m.group(1)] = m.group(2)
            elif (m := rx_resum.match(line)) is not None and m.group(1) in pending:
                got = (m.group(1), pending.pop(m.group(1)), int(m.group(2)))
            elif (m := rx_mmap.match(line)) is not None:
                got = (m.group(1), m.group(3), int(m.group(2)))
            if got and got[1].endswith("/big.bin"):
                if got[0] in command_pids:
                    cmd += got[2]
                else:
                    tool += got[2]
    return tool, cmd


# --------------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    info = {"nproc": str(os.cpu_count())}
    try:
        info["nproc"] = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or info["nproc"]
    except OSError:
        pass
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.*)$", cpu, re.M)
        info["cpu"] = m.group(1).strip() if m else platform.processor()
        flags = re.search(r"^flags\s*:\s*(.*)$", cpu, re.M)
        if flags:
            f = flags.group(1).split()
            info["simd"] = ", ".join(x for x in ("sse4_1", "avx2", "avx512f") if x in f) or "none of sse4.1/avx2/avx512"
    except OSError:
        info["cpu"] = platform.processor()
    try:
        mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        info["ram"] = f"{int(mem.group(1)) / 2**20:.1f} GiB" if mem else "?"
    except OSError:
        info["ram"] = "?"
    info["kernel"] = platform.release()
    info["os"] = platform.platform()
    return info


def fmt_cell(c: dict | None, status_row: bool = False) -> str:
    if c is None:
        return "–"
    if "skipped" in c:
        return c["skipped"]
    ran = [r for r in c["ran"] if r is not None]
    restored = c["restored"]

    def span(xs: list[int]) -> str:
        lo, hi = min(xs), max(xs)
        return str(lo) if lo == hi else f"{lo}–{hi}"

    tag = ("would run " if status_row else "run ") + (span(ran) if ran else "?")
    if any(restored):
        tag += f", restored {span(restored)}"
    n = len(c["walls"])
    return f"{c['wall']:.3f} ({c['cpu']:.3f}) [{tag}]" + (f" n={n}" if n else "")


def rss_mib(c: dict | None) -> str:
    if not c or not c.get("maxrss_kib"):
        return "–"
    return f"{statistics.median(c['maxrss_kib']) / 1024:.0f}"


def report(b: Bench, started: float) -> str:
    a = b.a
    m = machine()
    lines = [
        "# fgflow vs DVC vs Snakemake: chains of trivial `command` stages",
        "",
        f"Generated by `{' '.join(['python3 benches/engine_vs/bench.py', *sys.argv[1:]])}`" + f" on {time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"{(time.perf_counter() - started) / 60:.1f} min in all.",
        "",
        f"**Machine:** {m['nproc']} CPUs (`nproc`), {m['cpu']} ({m.get('simd', '')}), {m['ram']} RAM, Linux {m['kernel']}. "
        f"Shared with other builds: 1-min load average during the timed runs {min(b.loads, default=0):.2f}–{max(b.loads, default=0):.2f} "
        f"(median {statistics.median(b.loads) if b.loads else 0:.2f}); compare the CPU figures when wall times disagree.",
        "",
        "**Versions:** " + "; ".join(f"{k}: {v}" for k, v in b.versions.items()) + ".",
        "",
        "**Cells:** median seconds **wall (CPU)** over the repetitions (`n=`), CPU = user+sys of the whole process tree; "
        "[run X] = stages the tool executed (for status / dry-run rows: stages reported as needing a run; "
        "fgflow: `summary.ran` of `fgflow run --json`, non-`fresh` stages of `fgflow status --json`; "
        "DVC: `Running stage` lines, `restored` = `is cached - skipping run`; Snakemake: `rule sK:` job headers). "
        "A range means the repetitions differed. Commands: fgflow `fgflow run chain.ron --json` / `fgflow status chain.ron --json` "
        "(default `--jobs`); DVC `dvc repro` / `dvc status`; Snakemake `snakemake -c1` / `snakemake -c1 -n`.",
        "",
    ]
    if "dvc" in a.tools and any(n > a.max_dvc_n for n in list(a.ns) + list(a.big_ns)):
        lines += [
            f"**DVC above N={a.max_dvc_n} is skipped** (`--max-dvc-n {a.max_dvc_n}`): its cost per stage grows with pipeline size "
            "(PIPELINE-ANCHORS B1: one full run of a 500-stage chain took 502 s, `dvc status` 14.8 s, because `params.yaml` is re-parsed "
            "and `dvc.lock` re-written per stage), so N=1000 would need well over an hour for R repetitions; pass `--max-dvc-n 1000` to include it.",
            "",
        ]
    if a.heavy_reps != a.reps:
        lines += [f"DVC and Snakemake at N≥{a.heavy_n}: scenarios (1), (3a), (3b), (3c) and (4) use {a.heavy_reps} repetitions instead of {a.reps} "
                  "(each takes 5–25 s there) to keep the benchmark under 20 minutes; `--heavy-reps 5` restores them.", ""]
    for n in a.ns:
        lines += [f"## Chain of N={n} stages", "", "| scenario | " + " | ".join(TOOL_TITLE[t] for t in a.tools) + " |", "|---" * (len(a.tools) + 1) + "|"]
        for s, title in CHAIN_SCENARIOS:
            row = [fmt_cell(b.results.get(f"{t}|chain|{n}|{s}"), s == "status") for t in a.tools]
            lines.append(f"| {title} | " + " | ".join(row) + " |")
        lines.append("")
    for n in a.big_ns:
        size = f"{a.big_size / 2**30:.3g} GiB"
        lines += [f"## N={n} stages, stage 0 reads a {size} input (`head -c 4096 data/big.bin | cksum`)", "",
                  "| scenario | " + " | ".join(TOOL_TITLE[t] for t in a.tools) + " |", "|---" * (len(a.tools) + 1) + "|"]
        for s, title in BIG_SCENARIOS:
            row = [fmt_cell(b.results.get(f"{t}|big|{n}|{s}"), s.endswith("status")) for t in a.tools]
            lines.append(f"| {title.replace('1 GiB', size)} | " + " | ".join(row) + " |")
        lines.append("")
        if b.probes:
            lines += [f"Bytes of `big.bin` read by the tool itself (`read`/`pread64` results + `mmap` lengths, `strace -f -y`; stage commands excluded), "
                      f"one untimed run each, in this order [stages executed]:", "",
                      "| probe | " + " | ".join(TOOL_TITLE[t] for t in a.tools) + " |", "|---" * (len(a.tools) + 1) + "|"]
            for p, title in PROBES:
                row = []
                for t in a.tools:
                    pr = b.probes.get(f"{t}|{n}|{p}")
                    row.append("–" if pr is None else f"{pr['bytes']:,} [run {pr['ran']}]" + ("" if pr["rc"] == 0 else f" rc={pr['rc']}"))
                lines.append(f"| {title} | " + " | ".join(row) + " |")
            lines.append("")
    lines += goals(b)
    return "\n".join(lines) + "\n"


def goals(b: Bench) -> list[str]:
    out = ["## fgflow goals (issue 2)", ""]
    r = b.results
    n = max(b.a.ns) if b.a.ns else None
    c = r.get(f"fgflow|chain|{n}|noop")
    if c and "wall" in c and c["wall"] is not None:
        ok = c["wall"] < 0.1
        out.append(f"- no-op run of {n} stages under 100 ms: **{'met' if ok else 'NOT met'}** ({c['wall'] * 1000:.1f} ms wall, {c['cpu'] * 1000:.1f} ms CPU)"
                   + ("" if n == 1000 else " (goal is stated for N=1000; not run here)"))
    e = r.get(f"fgflow|chain|{n}|edit")
    if e and e.get("wall") is not None and e["ran"] and e["ran"][0]:
        k = e["ran"][0]
        out.append(f"- cost per executed stage (3a at N={n}, {k} stages, each `sh -c 'cat … > out.txt && echo … >> out.txt'` included): "
                   f"{e['wall'] / k * 1000:.1f} ms wall, {e['cpu'] / k * 1000:.1f} ms CPU (target ≤ 5 ms overhead)")
    for bn in b.a.big_ns:
        t = r.get(f"fgflow|big|{bn}|touch_run")
        p = b.probes.get(f"fgflow|{bn}|touch_run")
        if t and "wall" in t:
            extra = f", {p['bytes']:,} bytes of the input read by fgflow" if p else ""
            ok = all(x == 0 for x in t["ran"]) and (p is None or p["bytes"] <= b.a.big_size)
            out.append(f"- touched-but-unchanged {b.a.big_size / 2**30:.3g} GiB input at N={bn}: ran {t['ran']}{extra}: **{'met' if ok else 'NOT met'}**")
            extra_passes = [k for k in ("again", "later") if b.probes.get(f"fgflow|{bn}|{k}", {}).get("bytes", 0) > 0]
            if extra_passes:
                out.append(f"  - but later runs re-read it too ({', '.join(extra_passes)}; see the probe table): the stat cache distrusts a record made "
                           "within 2 s of the file's mtime (racy window), so a touch followed by a run within 2 s costs another pass on the next run")
    out.append("")
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: N in {10,100}, 2 repetitions")
    ap.add_argument("--reps", type=int, help="timed repetitions per scenario (default 5, --quick 2)")
    ap.add_argument("--heavy-reps", type=int, help="repetitions of DVC's and Snakemake's full/edit/cutoff/revert scenarios at N>=--heavy-n "
                    "(default 3; --quick: --reps), which take 5-25 s each, so that the default benchmark fits in 20 minutes")
    ap.add_argument("--heavy-n", type=int, default=100)
    ap.add_argument("--ns", help="comma-separated chain lengths (default 10,100,1000; --quick 10,100)")
    ap.add_argument("--big-ns", default="100", help="chain lengths for the 1 GiB-input variant (default 100; empty = skip)")
    ap.add_argument("--big-size", type=int, default=1 << 30, help="size of the big input in bytes (default 1 GiB)")
    ap.add_argument("--max-dvc-n", type=int, default=100, help="skip DVC above this N (default 100: DVC at N=1000 takes many minutes per run)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of fgflow,dvc,snakemake")
    ap.add_argument("--fgflow", default=str(REPO / "target" / "release" / "fgflow"), help="fgflow binary (default target/release/fgflow)")
    ap.add_argument("--workdir", default=str(REPO / "target" / "engine_vs"), help="scratch dir (venv, pipelines, logs)")
    ap.add_argument("--venv", help="virtualenv with dvc and snakemake (default WORKDIR/venv, created if missing)")
    ap.add_argument("--pip-spec", default="dvc snakemake", help="what to pip install into the venv")
    ap.add_argument("--no-strace", action="store_true", help="skip the strace byte-count probes")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"), help="Markdown output (default benches/engine_vs/RESULTS.md)")
    a = ap.parse_args()
    a.reps = a.reps or (2 if a.quick else 5)
    a.heavy_reps = a.heavy_reps or (a.reps if a.quick else min(3, a.reps))
    a.ns = [int(x) for x in (("10,100" if a.quick else "10,100,1000") if a.ns is None else a.ns).split(",") if x]
    a.big_ns = [int(x) for x in a.big_ns.split(",") if x]
    a.tools = [t for t in a.tools.split(",") if t]
    a.pip_spec = a.pip_spec.split()
    for t in a.tools:
        if t not in TOOLS:
            ap.error(f"unknown tool {t}")
    if "fgflow" in a.tools and not Path(a.fgflow).exists():
        ap.error(f"{a.fgflow} not found: build it with `cargo build --release`")

    started = time.perf_counter()
    b = Bench(a)
    b.setup_venv()
    b.collect_versions()
    if a.big_ns:
        b.big_file()
    log("versions: " + "; ".join(f"{k}: {v}" for k, v in b.versions.items()))
    try:
        b.run_all()
    except KeyboardInterrupt:
        log("interrupted: writing what was measured so far")
    md = report(b, started)
    (b.root / "results.json").write_text(json.dumps({"results": b.results, "probes": b.probes, "versions": b.versions, "machine": machine()}, indent=1))
    Path(a.out).write_text(md)
    print(md)
    log(f"wrote {a.out} and {b.root / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
