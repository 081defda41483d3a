"""What ``import accel_hydra`` costs on top of ``import torch, accelerate``.

Every run is a fresh interpreter that imports torch and accelerate first (untimed
here), then times ``import accel_hydra``; the script reports the median over runs and,
from ``python -X importtime`` of one more run, the heaviest modules that the
accel_hydra import pulled in (those not already loaded by torch and accelerate).

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
import time
t0 = time.perf_counter()
import torch, accelerate
t1 = time.perf_counter()
import accel_hydra
t2 = time.perf_counter()
import json, sys
heavy = [m for m in ("hydra", "omegaconf", "tensorboardX", "s3fs", "gcsfs", "adlfs",
                     "tqdm", "fsspec") if m in sys.modules]
print(json.dumps({"base": t1 - t0, "accel_hydra": t2 - t1, "loaded": heavy}))
"""


def timed_run() -> dict:
    done = subprocess.run([sys.executable, "-c", TIMED], capture_output=True, text=True, check=True)
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
    runs = [timed_run() for _ in range(args.runs)]
    base = statistics.median(r["base"] for r in runs)
    ours = statistics.median(r["accel_hydra"] for r in runs)
    print(f"median of {args.runs} fresh interpreters")
    print(f"  import torch, accelerate     {base:6.3f} s")
    fastest = min(r["accel_hydra"] for r in runs)
    print(f"  import accel_hydra on top    {ours:6.3f} s  (fastest {fastest:.3f} s)")
    print(f"  heavy modules loaded by it:  {', '.join(runs[0]['loaded']) or 'none'}")
    print("packages it loaded, by cumulative time (one -X importtime run):")
    for seconds, package in heaviest_packages(args.top):
        print(f"  {seconds:6.3f} s  {package}")


if __name__ == "__main__":
    main()
