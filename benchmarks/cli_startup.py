"""How fast bad input is rejected: ``launch.py`` with an unknown method, an unknown scenario
and a bad ``--set`` value, each as a user runs it (a fresh interpreter, exit code 2 and one
line on stderr expected). The figure includes interpreter and library start-up.

    python benchmarks/cli_startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "unknown method": ["--method", "timematch,nope"],
    "unknown scenario": ["--scenario", "DK-XX"],
    "bad --set key": ["--set", "methods.timematch.epoch=2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'bad input':18s} {'exit':>4s} {'median s':>9s} {'max s':>7s}  message")
    for name, extra in CASES.items():
        times, result = [], None
        for _ in range(args.repeat):
            started = time.perf_counter()
            result = subprocess.run([sys.executable, str(REPO / "launch.py"), *extra, "--dry-run"],
                                    capture_output=True, text=True, timeout=120)
            times.append(time.perf_counter() - started)
        message = result.stderr.strip().splitlines()[0][:70] if result.stderr.strip() else ""
        print(f"{name:18s} {result.returncode:4d} {statistics.median(times):9.2f} {max(times):7.2f}  {message}")


if __name__ == "__main__":
    main()
