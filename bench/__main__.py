"""`python -m bench NAME [--quick]`, or `python -m bench all [--quick]`.

Each benchmark prints a table, then as its last stdout line a JSON object with its figures,
and writes the same object to bench/results/. Progress goes to stderr.
"""

import argparse
import importlib
import json
import subprocess
import sys

from bench import common

BENCHMARKS = {"trial-overhead": "bench.trial_overhead", "compute-limit": "bench.compute_limit",
              "asha-vs-grid": "bench.asha_vs_grid", "gpu-packing": "bench.gpu_packing", "history-read": "bench.history_read"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=[*BENCHMARKS, "all"])
    p.add_argument("--quick", action="store_true", help="the CI-sized variant (each a few minutes at most)")
    p.add_argument("--short", action="store_true",
                   help="gpu-packing: about three minutes on an H200, to share one GPU lease with the study")
    p.add_argument("--tiny", action="store_true",
                   help="seconds-sized variant for the test suite (compute-limit, gpu-packing, history-read)")
    p.add_argument("--data", default=common.DEFAULT_DATA, help="dataset spec (default: the shared CIFAR-10 JPEG archive)")
    p.add_argument("--data-dir", default=common.DEFAULT_DATA_DIR, help="decode cache folder (default: ./data)")
    p.add_argument("--out", default=str(common.RESULTS), help="where the result JSON goes (default: bench/results)")
    p.add_argument("--threads", type=int, help="compute-limit: torch threads, matmul and training alike (default: 1, as a trial)")
    p.add_argument("--prepare", action="store_true", help="gpu-packing: write its data to bench/data/ and stop")
    p.add_argument("--device", default="cuda", help="gpu-packing: cuda (default), or cpu for a dry run of the script")
    p.add_argument("--replay", metavar="RESULT_JSON",
                   help="asha-vs-grid: replay ASHA on the FIFO curves of a saved result instead of running sweeps")
    return p


def run_all(args) -> int:
    """Each benchmark in its own process, so thread settings and Ray instances never leak between them."""
    summary, failed = {}, []
    for name in BENCHMARKS:
        cmd = [sys.executable, "-m", "bench", name, "--data", args.data, "--data-dir", args.data_dir, "--out", args.out]
        cmd += ["--quick"] if args.quick else []
        print(f"\n== {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=common.REPO)
        print(proc.stdout, end="", flush=True)
        lines = proc.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            result = {"error": f"exit {proc.returncode}, no JSON"}
        if proc.returncode != 0:
            failed.append(name)
        summary[name] = {k: v for k, v in result.items()
                         if k not in ("targets", "command", "date", "machine", "versions", "git_commit", "clocks", "run",
                                      "details", "benchmark")}
    print(json.dumps({"benchmarks": summary, "failed": failed}))
    return 1 if failed else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.name == "all":
        return run_all(args)
    module = importlib.import_module(BENCHMARKS[args.name])
    result = module.run(args)
    if result.get("variant") not in ("tiny", "replay") and not result.get("skipped") and not result.get("prepared"):
        path = common.write(result, args.out)
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
