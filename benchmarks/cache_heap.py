"""What a cached fit leaves behind: the demo's cold start in a fresh process vs right after a grounding with
`data.cache_encoded=true`, its cache kept in slabs (urt/data/cache.py) or as the encoder's own tensors (before).

Each case runs in its own process (so that each starts from a fresh heap):

* fresh:  the cold start alone;
* slabs:  the grounding (cached encodings, as the demo runs it), then the cold start in the same process;
* plain:  the same, with the cache keeping the encoder's tensors as they are (tens of thousands of heap
          allocations; what urt did before the slabs).

It prints the seconds of each part, the process's resident memory after the grounding, and the cold start's
time relative to the fresh one. Results: docs/performance.md §Encoded-sample cache.

Run (after `make demo`, whose run directory holds the data and the models the two steps start from):
    python benchmarks/cache_heap.py [--runs runs] [--grounding-steps 200] [--cold-start-steps 80]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("fresh", "slabs", "plain")


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e9


def child(mode: str, runs: str, grounding_steps: int, cold_start_steps: int, scratch: str) -> dict:
    import shutil

    from urt.config import compose_config
    from urt.demo.cli import _quiet, demo_overrides
    from urt.pipeline.core import Pipeline, _release
    from urt.train import train

    _quiet()
    if mode == "plain":
        from urt.data.cache import EncodedCache

        EncodedCache._copy = lambda self, t: t  # keep the encoder's own tensors (the heap allocations)
    ov = demo_overrides([f"paths.runs={runs}"])
    pipe = Pipeline(compose_config(ov), ov)
    quiet = ["stage.resume=never", "trainer.enable_progress_bar=false"]
    out = {"mode": mode}
    if mode != "fresh":
        d = Path(scratch) / f"grounding-{mode}"
        shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        train(pipe.compose("grounding", [f"stage.run_dir={d}", f"trainer.max_steps={grounding_steps}", *quiet]))
        _release()
        out["grounding_s"] = time.perf_counter() - t
    out["rss_gb_before_cold_start"] = _rss_gb()
    d = Path(scratch) / f"cold_start-{mode}"
    shutil.rmtree(d, ignore_errors=True)
    t = time.perf_counter()
    # num_workers=0: the whole cold start in this process (its one worker would be a fork of this heap)
    train(pipe.compose("cold_start", [f"stage.run_dir={d}", f"trainer.max_steps={cold_start_steps}",
                                      "data.num_workers=0", *quiet]))
    out["cold_start_s"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs", help="the demo's paths.runs (holds demo/data, demo/vision, demo/base)")
    ap.add_argument("--grounding-steps", type=int, default=200, help="past one epoch: the whole cache is built")
    ap.add_argument("--cold-start-steps", type=int, default=80)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--scratch", default="/tmp/urt-cache-heap")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    runs = str(Path(a.runs).resolve())
    if a.child:
        print("RESULT " + json.dumps(child(a.child, runs, a.grounding_steps, a.cold_start_steps, a.scratch)))
        return
    demo = Path(runs) / "demo"
    missing = [s for s in ("data", "vision", "base", "cold_start_data") if not (demo / s / "DONE").exists()]
    if missing:
        sys.exit(f"{demo}: steps {', '.join(missing)} not finished: run `make demo` (or `urt demo "
                 f"paths.runs={a.runs}`) first")
    results = []
    for mode in a.modes.split(","):
        print(f"[{mode}] ...", flush=True)
        p = subprocess.run([sys.executable, __file__, "--child", mode, "--runs", runs, "--grounding-steps",
                            str(a.grounding_steps), "--cold-start-steps", str(a.cold_start_steps), "--scratch",
                            a.scratch], capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode or line is None:
            sys.exit(f"[{mode}] failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        print(f"[{mode}] {results[-1]}", flush=True)
    fresh = next((r["cold_start_s"] for r in results if r["mode"] == "fresh"), None)
    print(f"\n{'mode':<6} {'grounding s':>12} {'RSS GB':>7} {'cold start s':>13} {'vs fresh':>9}")
    for r in results:
        g = f"{r['grounding_s']:.1f}" if "grounding_s" in r else "-"
        ratio = f"{r['cold_start_s'] / fresh:.2f}x" if fresh else "-"
        print(f"{r['mode']:<6} {g:>12} {r['rss_gb_before_cold_start']:>7.2f} {r['cold_start_s']:>13.1f} {ratio:>9}")


if __name__ == "__main__":
    main()
