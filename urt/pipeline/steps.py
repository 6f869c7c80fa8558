"""Pipeline step kinds: what a step of `pipeline.steps` runs (`kind: NAME`) and how the pipeline wires it.

A kind is a function run on the step's composed config — the same function the kind's command runs, so
`urt sample OVERRIDES` and a pipeline's sample step differ only in the overrides they compose — plus
what the pipeline needs to know to wire it::

    register_step_kind("sample", "urt.stages.rejection:run_sample", dir_key="sample.out_dir",
                       data_key="sample.shards")

* `run`: "module:function" (imported when a step runs, so registering imports nothing heavy) or a
  callable; called `run(cfg)`, or `run(cfg, step)` with a `StepRun` (name, dir, options, say) for a kind
  registered `with_step=True` (its settings are the step's `options:`, not a config group);
* `dir_key`: the config key set to the step's directory dir/<step> (train: stage.run_dir);
* `data_key`: the config key a step's `data: STEP[/SUB]` sets to dir/STEP[/SUB] (train: data.train_shards);
* `options`: a function mapping the step's `options:` to Hydra overrides (distill: `+distill=<teacher>`
  and `distill.KEY=VALUE`, checked against conf/distill/<teacher>.yaml); a kind with neither `options`
  nor `with_step` takes no options (its settings are the step's `overrides`);
* `leaves_model`: the step leaves dir/<step>/hf/final, which a later step's `init` starts from;
* `all_ranks`: every process runs it (train: Lightning DDP/FSDP); other kinds run on rank 0 while the
  other ranks wait for its DONE marker.

The core registers `train`, `sample` and `distill` here. Another package registers its kinds in a module
that a pipeline config lists in `pipeline.imports` (the demo: `pipeline.imports: [urt.demo.steps]`); the
pipeline imports those modules before it checks its steps' kinds. A name registered twice is an error
unless the second registration passes `replace=True`.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from urt.errors import UrtError


@dataclass(frozen=True)
class StepRun:
    """What a `with_step` kind's function gets beside the composed config."""

    name: str                       # the step's name in pipeline.steps
    dir: Path                       # dir/<step>, created; the pipeline writes DONE there once `run` returns
    options: dict = field(default_factory=dict)  # the step's `options:`, resolved
    say: Callable[[str], None] = print  # the pipeline's console (rich markup)


@dataclass(frozen=True)
class StepKind:
    name: str
    run: str | Callable[..., Any]
    leaves_model: bool = False
    dir_key: str | None = None
    data_key: str | None = None
    options: str | Callable[[dict], list[str]] | None = None
    with_step: bool = False
    all_ranks: bool = False
    registered_by: str = ""

    def function(self) -> Callable[..., Any]:
        """The kind's function, imported now (a "module:function" reference is looked up at every call, so a
        test's monkeypatch of that module attribute is what runs)."""
        return _resolve(self.run, f"step kind {self.name!r}")

    def takes_options(self) -> bool:
        return self.options is not None or self.with_step

    def option_overrides(self, options: dict) -> list[str]:
        """The Hydra overrides a step's `options:` stand for (none for a `with_step` kind without `options`)."""
        if self.options is None:
            return []
        return list(_resolve(self.options, f"step kind {self.name!r} options")(dict(options)))


_KINDS: dict[str, StepKind] = {}


def _resolve(ref: str | Callable, what: str) -> Callable:
    if callable(ref):
        return ref
    module, _, attr = str(ref).partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise UrtError(f"{what}: cannot load {ref!r} ({type(err).__name__}: {err})") from None


def register_step_kind(name: str, run: str | Callable[..., Any], *, leaves_model: bool = False,
                       dir_key: str | None = None, data_key: str | None = None,
                       options: str | Callable[[dict], list[str]] | None = None, with_step: bool = False,
                       all_ranks: bool = False, replace: bool = False) -> StepKind:
    """Register step kind `name` (see the module docstring); returns it. An existing name is an error unless
    `replace=True` (a package overriding a core kind says so)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise UrtError(f"a step kind's name must be an identifier, got {name!r}")
    if not (callable(run) or (isinstance(run, str) and ":" in run)):
        raise UrtError(f"step kind {name!r}: run must be a callable or 'module:function', got {run!r}")
    old = _KINDS.get(name)
    if old is not None and not replace:
        raise UrtError(f"step kind {name!r} is already registered (by {old.registered_by or 'urt'}); pass "
                       "replace=True to register_step_kind to override it")
    caller = inspect.currentframe().f_back
    kind = StepKind(name, run, leaves_model=leaves_model, dir_key=dir_key, data_key=data_key, options=options,
                    with_step=with_step, all_ranks=all_ranks,
                    registered_by=caller.f_globals.get("__name__", "") if caller else "")
    _KINDS[name] = kind
    return kind


def step_kinds() -> dict[str, StepKind]:
    """The registered kinds by name (a copy)."""
    return dict(_KINDS)


def step_kind(name: str) -> StepKind:
    """Registered kind `name`; an unknown one is an error listing the known kinds and how to register one."""
    if name not in _KINDS:
        raise UrtError(f"unknown step kind {name!r} (known kinds: {', '.join(sorted(_KINDS))}); a kind defined "
                       "outside the core is registered by its module (urt.pipeline.steps.register_step_kind): list "
                       "that module in the pipeline's `imports`, e.g. `pipeline.imports: [urt.demo.steps]` "
                       "(`+pipeline.imports=[MODULE]` on the command line)")
    return _KINDS[name]


def import_step_modules(modules: Iterable[str] | None) -> None:
    """Import the modules of `pipeline.imports` (each registers its kinds on import)."""
    for module in modules or ():
        try:
            importlib.import_module(str(module))
        except ImportError as err:
            raise UrtError(f"pipeline.imports: cannot import {str(module)!r} ({type(err).__name__}: {err})") from None


# ------------------------------------------------------------------------------------------ the core kinds
def distill_overrides(options: dict) -> list[str]:
    """A distill step's `options:` as overrides of the conf/distill group: `teacher` (default rule) picks
    conf/distill/<teacher>.yaml, every other option `distill.KEY=VALUE` of a setting that file declares (what
    `urt distill` composes from `--teacher` and its trailing overrides)."""
    from omegaconf import OmegaConf

    from urt.config import conf_dir, group_options, group_override, to_overrides

    options = dict(options)
    teacher = str(options.pop("teacher", "rule"))
    path = conf_dir() / "distill" / f"{teacher}.yaml"
    if not path.is_file():
        raise UrtError(f"options.teacher={teacher!r} has no {path} (teachers: {', '.join(group_options('distill'))})")
    settings = [str(k) for k in OmegaConf.load(path) if k not in ("defaults", "teacher")]
    unknown = [k for k in options if k not in settings]
    if unknown:
        raise UrtError(f"options.{unknown[0]}: conf/distill/{teacher}.yaml has no setting {unknown[0]!r} "
                       f"(distill.{unknown[0]}; its settings: {', '.join(settings)})")
    return [group_override("distill", teacher), *to_overrides("distill", options)]


register_step_kind("train", "urt.train:train", leaves_model=True, dir_key="stage.run_dir",
                   data_key="data.train_shards", all_ranks=True)
register_step_kind("sample", "urt.stages.rejection:run_sample", dir_key="sample.out_dir", data_key="sample.shards")
register_step_kind("distill", "urt.stages.distill:run_distill", dir_key="distill.out_dir", data_key="distill.shards",
                   options=distill_overrides)
