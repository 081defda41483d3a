"""What ``import accel_hydra`` costs on top of ``import torch, accelerate``.

Every run is a fresh interpreter that imports torch and accelerate, then times
``import accel_hydra``; the script reports the median over runs. Importing torch
leaves a full garbage collection due, which the next allocations pay, whatever they
are; alternate runs therefore call ``gc.collect()`` first, to show the import's own
work. Last, from ``python -X importtime`` of one more run, the packages that the
accel_hydra import pulled in (those torch and accelerate had not already loaded).

Run from the repository root::

    python benchmarks/import_time.py            # 9 runs
    python benchmarks/import_time.py --runs 21 --top 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

TIMED = """
import gc, json, sys, time
t0 = time.perf_counter()
import torch, accelerate
t1 = time.perf_counter()
if "--collect-first" in sys.argv:
    gc.collect()
before = set(sys.modules)
t2 = time.perf_counter()
import accel_hydra
t3 = time.perf_counter()
heavy = [m for m in ("hydra", "omegaconf", "tensorboardX", "s3fs", "gcsfs", "adlfs",
                     "tqdm", "fsspec", "asyncio", "sympy") if m in set(sys.modules) - before]
print(json.dumps({"base": t1 - t0, "accel_hydra": t3 - t2, "loaded": heavy}))
"""


def timed_run(collect_first: bool) -> dict:
    command = [sys.executable, "-c", TIMED] + (["--collect-first"] if collect_first else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def heaviest_packages(top: int) -> list[tuple[float, str]]:
    """The packages ``import accel_hydra`` loaded, by cumulative import time (s)."""
    code = "import torch, accelerate; import accel_hydra"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    rows = []
    for line in done.stderr.splitlines():
        _, _, fields = line.partition(":")
        parts = fields.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        rows.append((int(parts[1]) / 1e6, parts[2].strip()))
    # A module is printed after its imports, so what accel_hydra brought in is what is
    # printed after the last line of torch's or accelerate's own import.
    start = max(i for i, (_, name) in enumerate(rows) if name in ("torch", "accelerate"))
    best: dict[str, float] = {}
    for seconds, name in rows[start + 1 :]:
        package = name.split(".")[0]
        if package != "accel_hydra":
            best[package] = max(best.get(package, 0.0), seconds)
    return sorted(((t, p) for p, t in best.items()), reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    runs, collected = [], []
    for _ in range(args.runs):  # alternate the two kinds of run
        runs.append(timed_run(collect_first=False))
        collected.append(timed_run(collect_first=True))
    base = statistics.median(r["base"] for r in runs)
    ours = statistics.median(r["accel_hydra"] for r in runs)
    own = statistics.median(r["accel_hydra"] for r in collected)
    print(f"median of {args.runs} fresh interpreters")
    print(f"  import torch, accelerate               {base:6.3f} s")
    print(f"  import accel_hydra on top              {ours:6.3f} s")
    print(f"  the same after gc.collect()            {own:6.3f} s  (accel_hydra's own work)")
    loaded = ", ".join(runs[0]["loaded"]) or "none"
    print(f"  heavy packages it loads itself         {loaded}")
    print("packages it loaded, by cumulative time (one -X importtime run):")
    for seconds, package in heaviest_packages(args.top):
        print(f"  {seconds:6.3f} s  {package}")


if __name__ == "__main__":
    main()
