"""benchmarks/sharded_gpu.py (issue #27's device checks: world-1 sharded parity, GRPO peak memory against the
plan, GRPO throughput) runs end to end on CPU at tiny sizes: the sharded strategy at world size 1 samples
the same rollouts and logs the same step metrics as the single-device path, and every section writes its
numbers. The GPU figures themselves are a measurement, not a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sharded_gpu_script_runs_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sharded_gpu.py"), "--cpu", "--out",
                           str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out" / "sharded_gpu.json").read_text())
    p = got["parity"]
    assert p["ok"] and p["same_completions"] and p["steps"] == 2 and p["max_abs_metric_diff"] == 0.0
    assert p["metrics"][0]["train/reward_std"] > 0  # the even-ids reward spreads every group: real advantages
    m = got["memory"]
    assert m["plan_host_gib"] > 0 and m["plan_peak_gib"] > m["plan_without_reserve_gib"] > 0  # offloaded, planned
    t = got["throughput"]
    assert t["generated_tokens_per_s"] > 0 and t["tokens_per_s"] > t["generated_tokens_per_s"] and t["new_tokens"] == 16
