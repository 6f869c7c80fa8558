"""benchmarks/grpo_vs_trl.py (the GRPO throughput comparison with TRL): the module imports without TRL, its
argument parser builds, and running it without TRL stops with the install command. The benchmark itself is
never run here (it is a measurement, not a test). benchmarks/rollout_generation.py runs at a toy size (its
urt sides must agree; the timings are not checked)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "grpo_vs_trl.py"


def _load():
    spec = importlib.util.spec_from_file_location("grpo_vs_trl", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parser_builds():
    mod = _load()
    parser = mod.build_parser()
    args = parser.parse_args([])
    assert args.prompts >= 1 and args.generations >= 2 and args.max_new_tokens >= 1
    assert args.steps >= 1 and args.repeats >= 1 and args.warmup >= 0
    assert args.sides == "urt-shared,urt-padded,urt-packed,trl" and args.collate == "auto" and not args.natural_length
    args = parser.parse_args(["--prompts", "3", "-G", "6", "--max-new-tokens", "32", "--steps", "4", "--repeats", "5",
                              "--warmup", "0", "--threads", "1", "--natural-length", "--sides", "urt,urt-padded,trl",
                              "--profile", "urt,trl"])
    assert (args.prompts, args.generations, args.max_new_tokens, args.steps, args.repeats, args.warmup) == \
        (3, 6, 32, 4, 5, 0)
    assert args.natural_length and args.threads == 1 and args.profile == "urt,trl"
    assert mod.TRL_PIN.count(".") == 2
    args = parser.parse_args(["--family", "qwen3_5", "--sides", "urt,urt-repeated"])
    assert args.family == "qwen3_5" and parser.parse_args([]).family == "qwen2_5_vl"
    with pytest.raises(SystemExit, match="urt sides only"):  # the TRL side is set up for Qwen2.5-VL only
        mod.main(["--family", "qwen3_5", "--sides", "urt,trl"])


# A subprocess in which `import trl` fails as if TRL were not installed (whether or not it is).
_NO_TRL = textwrap.dedent("""
    import importlib.abc, importlib.util, runpy, sys

    class BlockTRL(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "trl" or name.startswith("trl."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    for key in [k for k in sys.modules if k == "trl" or k.startswith("trl.")]:
        del sys.modules[key]
    sys.meta_path.insert(0, BlockTRL())
    script = sys.argv[1]
""")

_RUN_MAIN = _NO_TRL + textwrap.dedent("""
    sys.argv = [script, "--steps", "1", "--repeats", "1"]
    runpy.run_path(script, run_name="__main__")
""")

_IMPORT_ONLY = _NO_TRL + textwrap.dedent("""
    spec = importlib.util.spec_from_file_location("grpo_vs_trl", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.build_parser().parse_args([])
    assert "trl" not in sys.modules
    print("ok")
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, str(SCRIPT)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_missing_trl_names_the_install_command():
    mod = _load()
    proc = _run(_RUN_MAIN)
    assert proc.returncode != 0
    assert f"pip install trl=={mod.TRL_PIN}" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr  # a message, not a crash


def test_module_import_does_not_need_trl():
    proc = _run(_IMPORT_ONLY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_rollout_generation_benchmark_runs(capsys):
    """benchmarks/rollout_generation.py at a toy size: the four sides run, `repeated` and `shared` agree,
    `shared` and `preallocated` give the same completions (the script asserts both) and each prints its time
    and speed-up."""
    spec = importlib.util.spec_from_file_location("rollout_generation", ROOT / "benchmarks" / "rollout_generation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--prompts", "2", "-G", "3", "--max-new-tokens", "3", "--image-size", "56", "--repeats", "1",
              "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("qwen2_5_vl: 2 prompts x 3 samples, 3 new tokens")
    assert [ln.split()[0] for ln in lines[1:5]] == ["hf", "repeated", "shared", "preallocated"]
    assert all(ln.rstrip().split()[-1].startswith("x") for ln in lines[1:5])
    assert lines[5].strip() == "repeated and shared: 6 of 6 completions identical; shared and preallocated: all"
