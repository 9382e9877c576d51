"""Sandbox throughput vs a fresh `python3 -c` subprocess per program, on toy and sympy programs.

    python bench/sandbox.py [--workers 2] [--toy 1000] [--sympy 400] [--sympy-solve 100] [--repeats 3]

Both sides run `workers` programs at a time and must produce the same stdout. Prints a markdown table:
the sandbox's programs/s (median and best of the repeats) and its CPU per program (host process plus
workers and the programs they ran), which other load on a shared machine barely moves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from rstar_jax.sandbox import SandboxPool

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def toy_programs(n: int) -> list[str]:
    return [f"a = {i}\nb = a * 3 + 7\nprint(b // 2, b % 5)" for i in range(n)]


def sympy_programs(n: int) -> list[str]:
    """Exact arithmetic as code steps use it: rationals, surds, binomials."""
    return [
        "from sympy import Rational, binomial, sqrt\n"
        f"r = Rational({i + 1}, 7) + Rational(5, {i % 9 + 2}) * sqrt({i % 11 + 2})\n"
        f"print(r, binomial({i % 30 + 5}, 4))"
        for i in range(n)
    ]


def sympy_solve_programs(n: int) -> list[str]:
    """Equation solving: sympy's solve alone costs ~20 ms of CPU per call, so this row measures sympy."""
    return [
        "from sympy import Rational, solve, symbols\n"
        "x = symbols('x')\n"
        f"print(sum(solve(x**2 - {i % 7 + 3}*x + {i % 5 + 1}, x)) * Rational({i + 1}, 7))"
        for i in range(n)
    ]


def cpu_seconds(pool: SandboxPool) -> float:
    """CPU used so far by this process and by the pool's workers, with the programs they reaped."""
    total = time.process_time()
    for pid in pool.worker_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += sum(int(x) for x in fields[11:15]) / _CLOCK_TICKS  # utime stime cutime cstime
    return total


def run_sandbox(pool: SandboxPool, codes: list[str]) -> tuple[float, float, list[str]]:
    """Programs/s, CPU ms per program, stdout of each."""
    cpu_before, start = cpu_seconds(pool), time.perf_counter()
    results = pool.run(codes)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pool) - cpu_before
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"bench: a sandboxed program failed: {bad[0]}")
    return len(codes) / elapsed, cpu * 1000 / len(codes), [r.stdout for r in results]


def run_subprocess(codes: list[str], workers: int) -> tuple[float, list[str]]:
    def one(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        outs = list(ex.map(one, codes))
    return len(codes) / (time.perf_counter() - start), outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--toy", type=int, default=1000, help="toy programs through the sandbox")
    ap.add_argument("--sympy", type=int, default=400, help="sympy arithmetic programs through the sandbox")
    ap.add_argument("--sympy-solve", type=int, default=100, help="sympy solve programs through the sandbox")
    ap.add_argument("--baseline-fraction", type=float, default=0.05, help="share of programs the slow baseline runs")
    ap.add_argument("--repeats", type=int, default=3, help="sandbox runs per workload (the baseline runs once)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    with SandboxPool(workers=args.workers, timeout_s=10.0) as pool:
        print(f"isolation: {pool.isolation_mode}, {args.workers} workers\n")
        print("| workload | programs (sandbox / python3 -c) | sandbox programs/s (median, best) "
              "| sandbox CPU ms/program | python3 -c programs/s | ratio |")
        print("|---|---|---|---|---|---|")
        workloads = (("toy arithmetic", toy_programs, args.toy), ("sympy arithmetic", sympy_programs, args.sympy),
                     ("sympy solve", sympy_solve_programs, args.sympy_solve))
        for name, make, n in workloads:
            codes = make(n)
            pool.run(codes[: args.workers * 4])  # first programs after start-up pay one-off page faults
            rates, cpus = [], []
            for _ in range(args.repeats):
                rate, cpu_ms, outs = run_sandbox(pool, codes)
                rates.append(rate)
                cpus.append(cpu_ms)
            fast = statistics.median(rates)
            n_base = max(args.workers * 2, int(n * args.baseline_fraction))
            slow, base_outs = run_subprocess(codes[:n_base], args.workers)
            if base_outs != outs[:n_base]:
                raise SystemExit(f"bench: sandbox and subprocess disagree on {name} output")
            print(f"| {name} | {n} / {n_base} | {fast:.0f}, {max(rates):.0f} | {statistics.median(cpus):.2f} "
                  f"| {slow:.1f} | {fast / slow:.1f}x |")


if __name__ == "__main__":
    main()
