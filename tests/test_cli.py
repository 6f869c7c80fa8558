"""The `urt` command line: registering every subcommand stays light (no torch / transformers /
torchmetrics import), so `urt --help` and argument errors answer at once; the packages' lazy exports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = """
import json, sys
from urt.cli import build_parser
parser = build_parser()
sub = next(a for a in parser._actions if a.dest == "command")
heavy = [m for m in ("torch", "transformers", "torchmetrics", "torchvision", "lightning") if m in sys.modules]
print(json.dumps({"heavy": heavy, "commands": sorted(sub.choices)}))
"""


def test_registering_every_subcommand_imports_no_heavy_library():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert {"models", "eval", "serve", "train", "demo", "data", "sample"} <= set(out["commands"])


def test_lazy_package_exports():
    import urt.eval
    import urt.eval.benchmarks
    import urt.models
    import urt.models.loading
    from urt.eval import score
    from urt.models import load_model

    assert score is urt.eval.benchmarks.score
    assert load_model is urt.models.loading.load_model
    assert "load_model" in urt.models.__all__ and "run_eval" in urt.eval.__all__
    with pytest.raises(AttributeError, match="'urt.models' has no attribute 'load_modle'"):
        urt.models.load_modle  # noqa: B018
