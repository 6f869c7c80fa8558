"""The demo's own pipeline step kinds, registered on import: conf/demo/default.yaml lists this module in
`pipeline.imports`, so the pipeline core names no demo kind.

* `demo_data` — the embedded easy-vqa data (urt.demo.data.build_demo_data) into the step's directory;
* `demo_vision` — the demo's vision pretraining (urt.demo.vision.pretrain_vision): the step's model with attribute
  heads on its visuals; like a train step it leaves dir/<step>/hf/final for a later step's `init`.

Both take their settings from the step's `options:` (keyword arguments of those functions)."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from urt.errors import UrtError
from urt.pipeline.steps import StepRun, register_step_kind


def _checked(fn: Callable, step: StepRun, options: dict[str, Any], *given: str) -> dict[str, Any]:
    """`options` if `fn` takes each of them by keyword; a key it does not take is an error naming it."""
    params = [n for n, p in inspect.signature(fn).parameters.items()
              if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in given]
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise UrtError(f"pipeline step {step.name!r}: options.{unknown[0]} is not an option of "
                       f"{fn.__module__}.{fn.__name__} (options: {', '.join(params)})")
    return options


def run_data(cfg, step: StepRun) -> dict:
    from urt.demo.data import build_demo_data

    summary = build_demo_data(step.dir, **_checked(build_demo_data, step, step.options, "out_dir"))
    for split, s in summary["splits"].items():
        step.say(f"[{step.name}] {split}: {s['pairs']} pairs {s['tasks']}")
    return summary


def run_vision(cfg, step: StepRun) -> dict:
    from omegaconf import OmegaConf

    from urt.demo.vision import pretrain_vision
    from urt.models import load_model

    opts = dict(step.options)
    shards = opts.pop("shards", None)
    if not shards:
        raise UrtError(f"pipeline step {step.name!r}: a demo_vision step needs options.shards (the train pairs)")
    _checked(pretrain_vision, step, opts, "bundle", "train_shards", "out_dir")
    bundle = load_model(**OmegaConf.to_container(cfg.model, resolve=True))
    report = pretrain_vision(bundle, shards, step.dir, **opts)
    step.say(f"[{step.name}] held-out accuracy {report['heldout_before']} -> {report['heldout_after']} "
             f"({report['seconds']:.0f} s)")
    return report


register_step_kind("demo_data", run_data, with_step=True)
register_step_kind("demo_vision", run_vision, with_step=True, leaves_model=True)
