"""Pipelines: a method's stages run in order from one composed config (`urt pipeline`, urt/pipeline/core.py),
the step kinds they are made of (urt/pipeline/steps.py), and sweeps of pipelines (`urt sweep`,
urt/pipeline/sweeps.py).

    from urt.pipeline import Pipeline, run_pipeline, register_step_kind, parse_sweep_file, collect
"""

from urt.lazy import lazy_exports

# Resolved on first use: `urt --help` registers urt.pipeline.cli, which imports this package.
__getattr__, __all__ = lazy_exports(__name__, {
    "urt.pipeline.core": ("DONE", "RESULTS", "Pipeline", "run_pipeline", "stage_summary"),
    "urt.pipeline.steps": ("StepKind", "StepRun", "register_step_kind", "step_kind", "step_kinds"),
    "urt.pipeline.sweeps": ("CollectReport", "SweepJob", "SweepRun", "collect", "hydra_multirun", "parse_sweep_file",
                            "parse_sweep_text", "shell_join", "shell_quote", "sweep_run"),
})
