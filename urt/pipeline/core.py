"""`urt pipeline experiment=…`: the method's stages in order, each from the previous stage's checkpoint.

A pipeline experiment (conf/experiment/**/pipeline.yaml, the ablations, the demo) sets `pipeline:`::

    pipeline:
      name: paper_qwen2_5_vl_7b
      dir: ${paths.runs}/${.name}          # every step writes under dir/<step>
      overrides: []                        # every step's, before the command line's (e.g. [model=qwen3_vl_2b])
      steps:                               # run in this order
        cold_start: {kind: train, experiment: paper/qwen2_5_vl_7b/cold_start}
        rs_sample:  {kind: sample, init: cold_start, experiment: paper/qwen2_5_vl_7b/rs_sample}
        rejection_sampling: {kind: train, init: cold_start, data: rs_sample/sft, experiment: ...}
        grpo: {kind: train, init: rejection_sampling, data: rs_sample/grpo, experiment: ..., overrides: [...]}
      eval: {shards: ..., benchmarks: [{benchmark: vl_rewardbench, file: ..., root: ...}],
             after: [rejection_sampling, grpo], modes: [cot], order: both}

Step kinds (urt/pipeline/steps.py): `train` (what `urt train` runs: SFT or GRPO by the step's `stage`),
`sample` (`urt sample`: rejection sampling), `distill` (`urt distill`: the step's `options` are settings of
conf/distill/<options.teacher>.yaml), and kinds other packages register in a module the pipeline lists in
`imports` (the demo's data and vision steps: `pipeline.imports: [urt.demo.steps]`). Each step
composes the root config with, in order: its stage experiment (`experiment: NAME` -> `experiment=NAME`),
the pipeline's `overrides` (pipeline-wide defaults, e.g. the model size of a family's stage experiments; the
command line beats them), the pipeline's own overrides from the command line (those not about
`experiment`/`pipeline`), its kind's overrides for its `options`, the step's `overrides`, and the wiring:
the kind's output key (train `stage.run_dir`, sample `sample.out_dir`, distill `distill.out_dir`) =
dir/<step>, `model.name_or_path` = the `init` step's final HF folder, the kind's data key (train
`data.train_shards`, sample `sample.shards`, distill `distill.shards`) = dir/<data>; then it runs its kind's
function on that config, the function the kind's command runs too. A step that finished writes
dir/<step>/DONE and is skipped on re-run; an interrupted train step resumes from its last.ckpt.
`enabled: false` drops a step (ablations). A step whose `init` step is disabled starts from that step's own
starting point, recursively, and at the end of that chain from the pipeline's base model (the pipeline
config's `model.name_or_path`: the experiment's model, or `model=…` from the command line); a step without
`init` starts from its own config's model.
`extra_overrides` (empty in the shipped configs) are appended after `overrides`: sweeps set them
(`"pipeline.steps.grpo.extra_overrides=['stage.loss.beta=0.0']"`) without repeating the step's own overrides.

Under several processes (srun / torchrun: RANK or SLURM_PROCID set) every rank runs the train steps
together (Lightning DDP/FSDP); the steps of other kinds and evaluations run on rank 0 while the other ranks
wait for its DONE marker.

After each step listed in `eval.after` the step's model is evaluated (urt.eval.run_eval) on
`eval.shards` (and/or each of `eval.benchmarks`: {benchmark, file, root}), in each of `eval.modes`;
dir/results.json collects one summary per evaluated stage (overall accuracy, format rate, per-task
accuracy, share of "1 is better"). Benchmark files are checked before the first step runs.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from urt.errors import UrtError
from urt.pipeline.steps import StepRun, import_step_modules, step_kind

log = logging.getLogger(__name__)

DONE = "DONE"
RESULTS = "results.json"


def _own_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides every step inherits: all but `experiment=…` and `pipeline.…`."""
    out = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "experiment" or key == "pipeline" or key.startswith("pipeline."):
            continue
        out.append(o)
    return out


def _listify(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return shlex.split(v)
    return [str(x) for x in v]


def _release() -> None:
    """Free what a finished step or evaluation built before the next one loads its own. Its trainer, module and
    data module hold each other (reference cycles), so without a full collection they live on until Python's
    generational GC gets to them: the demo's grounding kept its 5 GB of cached encodings through the later steps,
    and on a GPU the previous stage's model would keep its memory while the next one loads."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Pipeline:
    """One composed pipeline config (`cfg.pipeline`) and the command-line overrides it was composed with."""

    def __init__(self, cfg: DictConfig, overrides: list[str] | None = None, *,
                 console_log: Callable[[str], None] | None = None):
        if cfg.get("pipeline") is None:
            raise UrtError("no pipeline in the config: pick a pipeline experiment, e.g. "
                           "`urt pipeline experiment=paper/qwen2_5_vl_7b/pipeline` (see conf/experiment/)")
        self.cfg = cfg
        self.p = cfg.pipeline
        self.overrides = list(overrides or [])
        self.inherited = _own_overrides(self.overrides)
        self.dir = Path(str(self.p.dir)).expanduser().resolve()
        self.say = console_log or log.info
        steps = self.p.get("steps") or {}
        # other packages' kinds register on import: before any step's kind is looked up
        import_step_modules(_listify(self.p.get("imports")))
        self.steps: dict[str, DictConfig] = {}
        for name, st in steps.items():
            if st is None:
                continue
            if not st.get("kind"):
                raise UrtError(f"pipeline step {name!r} has no kind (kind: train, sample, distill, ...)")
            try:
                step_kind(str(st.kind))
            except UrtError as err:
                raise UrtError(f"pipeline step {name!r}: {err}") from None
            if st.get("enabled", True):
                self.steps[str(name)] = st
        if not self.steps:
            raise UrtError(f"pipeline {self.p.get('name')!r} has no enabled step")
        for name, st in self.steps.items():
            for ref in ("init", "data"):
                v = st.get(ref)
                if v and str(v).split("/")[0] not in steps:
                    raise UrtError(f"pipeline step {name!r}: {ref}={v!r} names no step "
                                   f"(steps: {', '.join(map(str, steps))})")
            kind = step_kind(st.kind)
            if st.get("data") and not kind.data_key:
                raise UrtError(f"pipeline step {name!r}: kind {kind.name!r} reads no `data` (data={st.data!r}); "
                               "give its input in its options")
            if st.get("options") and not kind.takes_options():
                raise UrtError(f"pipeline step {name!r}: kind {kind.name!r} takes no `options` (got "
                               f"{', '.join(map(str, st.options))}); set its config in the step's `overrides`")

    # ------------------------------------------------------------------------------------ paths
    def step_dir(self, name: str) -> Path:
        return self.dir / name

    def done(self, name: str) -> bool:
        return (self.step_dir(name) / DONE).exists()

    def model_of(self, name: str | None) -> str | None:
        """The final HF folder a step leaves (kinds registered leaves_model: train, ...); None for no step / a
        disabled step."""
        if not name or name not in self.steps:
            return None
        if not step_kind(self.steps[name].kind).leaves_model:
            raise UrtError(f"pipeline step {name!r} ({self.steps[name].kind}) has no model to start from")
        return str(self.step_dir(name) / "hf" / "final")

    def base_model(self) -> str:
        """The pipeline's base model: the pipeline config's model.name_or_path (the experiment's model, or
        `model=…` / `model.name_or_path=…` from the command line)."""
        return str(self.cfg.model.name_or_path)

    def _init_of(self, st: DictConfig) -> str | None:
        """The model a step starts from: its `init` step's result, or (init disabled: an ablation) the
        init step's own starting point, recursively, ending at the pipeline's base model; None (no
        `init`) = the step config's own model.name_or_path."""
        name = st.get("init")
        if not name:
            return None
        all_steps = self.p.steps
        while name and name not in self.steps:
            name = (all_steps.get(name) or {}).get("init")
        # not None at the chain's end: the stage experiments point model.name_or_path at the previous
        # stage's standalone run (runs/cold_start_.../hf/final), which is not the base model
        return self.model_of(name) if name else self.base_model()

    def _data_of(self, st: DictConfig) -> str | None:
        v = st.get("data")
        if not v:
            return None
        head = str(v).split("/")[0]
        if head not in self.steps:
            raise UrtError(f"pipeline step uses data={v!r} from the disabled step {head!r}: give it "
                           f"`data.train_shards=...` in its overrides instead (ablation configs do)")
        return str(self.dir / str(v))

    def compose(self, name: str, extra: list[str] | None = None) -> DictConfig:
        from urt.config import compose_config

        st = self.steps[name]
        kind = step_kind(st.kind)
        try:
            options = kind.option_overrides(self._options(st))
        except UrtError as err:
            raise UrtError(f"pipeline step {name!r}: {err}") from None
        exp = st.get("experiment")
        ov = [*([f"experiment={exp}"] if exp else []), *_listify(self.p.get("overrides")), *self.inherited,
              *options, *_listify(st.get("overrides")), *_listify(st.get("extra_overrides"))]
        if kind.dir_key:
            ov.append(f"{kind.dir_key}={self.step_dir(name)}")
        init = self._init_of(st)
        if init:
            ov.append(f"model.name_or_path={init}")
        data = self._data_of(st)
        if data:
            ov.append(f"{kind.data_key}={data}")
        return compose_config([*ov, *(extra or [])])

    @staticmethod
    def _options(st: DictConfig) -> dict:
        options = st.get("options")
        return OmegaConf.to_container(options, resolve=True) if options else {}

    # ------------------------------------------------------------------------------------ running
    def run(self, only: list[str] | None = None) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "pipeline.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        results = self._load_results()
        evals = self.p.get("eval") or {}
        after = [str(a) for a in (evals.get("after") or [])]
        for a in after:
            if a not in (self.p.steps or {}):
                raise UrtError(f"pipeline eval.after names {a!r}, which is not a step")
        for o in only or []:
            if o not in self.steps:
                what = "is disabled" if o in (self.p.steps or {}) else "is not a step"
                raise UrtError(f"--only {o!r} {what} in pipeline {self.p.get('name')!r} "
                               f"(enabled steps: {', '.join(self.steps)})")
        if any(a in self.steps and (not only or a in only) for a in after):
            self._check_eval_targets()
        self._check_memory(only)
        for name, st in self.steps.items():
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            if self.done(name):
                self.say(f"[{name}] finished earlier: skipped ({self.step_dir(name)})")
            elif not step_kind(st.kind).all_ranks and _rank() != 0:
                self._wait_for(name)
            else:
                self.say(f"[{name}] {st.kind} -> {self.step_dir(name)}")
                self._run_step(name, st)
                _release()
                (self.step_dir(name) / DONE).write_text(json.dumps({"seconds": time.perf_counter() - t0}))
            if name in after and (name not in results["stages"] or not self._eval_done(name)):
                if _rank() != 0:
                    continue  # rank 0 evaluates; its results.json is the pipeline's
                results["stages"][name] = self.evaluate(name)
                _release()
                self._write_results(results)
        if _rank() == 0:
            self._write_results(results)
        return results

    def _check_memory(self, only: list[str] | None) -> None:
        """The memory plan of every training step still to run, before the first runs (urt.plan): a GRPO
        step that cannot fit stops the pipeline now, not after the SFT steps. Planned with the base model
        (the steps' own starting points do not exist yet; the same architecture)."""
        from urt.plan import preflight_stages

        todo = [n for n, st in self.steps.items()
                if st.kind == "train" and not self.done(n) and (not only or n in only)]
        preflight_stages([(n, self.compose(n), self.base_model()) for n in todo])

    def _wait_for(self, name: str, poll: float = 5.0) -> None:
        self.say(f"[{name}] rank {_rank()}: waiting for rank 0 to finish this step")
        while not self.done(name):
            time.sleep(poll)

    def _run_step(self, name: str, st: DictConfig) -> None:
        kind = step_kind(st.kind)
        cfg = self.compose(name)
        out = self.step_dir(name)
        out.mkdir(parents=True, exist_ok=True)
        data = self._data_of(st)
        if kind.leaves_model and data and _shard_total(data) == 0:
            # e.g. rejection sampling kept no correct trace: this stage has nothing to learn from, and its
            # result is the model it starts from (said loudly, recorded in EMPTY_DATA)
            init = self._init_of(st) or str(cfg.model.name_or_path)
            self.say(f"[{name}] [bold yellow]{data} holds no samples: nothing to train; the stage's model is "
                     f"its starting point {init}[/]")
            src = Path(init)
            if not src.is_dir():
                raise UrtError(f"pipeline step {name!r}: no training data in {data} and the starting model "
                               f"{init} is not a local folder to carry over")
            shutil.copytree(src, out / "hf" / "final", dirs_exist_ok=True)
            (out / "EMPTY_DATA").write_text(f"{data} held no samples; hf/final is a copy of {init}\n")
            return
        run = kind.function()
        if kind.with_step:
            run(cfg, StepRun(name, out, self._options(st), self.say))
        else:
            run(cfg)  # what the kind's command runs on its composed config (`urt train` / `urt sample` / ...)

    # ------------------------------------------------------------------------------------ evaluation
    def _eval_dir(self, name: str, mode: str, what: str) -> Path:
        return self.dir / "eval" / name / f"{what}-{mode}"

    def _eval_targets(self) -> list[tuple[str, dict]]:
        ev = self.p.get("eval") or {}
        targets = []
        if ev.get("shards"):
            targets.append(("shards", {"shards": str(ev.shards)}))
        for b in ev.get("benchmarks") or []:
            b = OmegaConf.to_container(b, resolve=True)
            targets.append((b["benchmark"], {"benchmark": b["benchmark"], "benchmark_file": b["file"],
                                            "root": b.get("root")}))
        return targets

    def _check_eval_targets(self) -> None:
        """Before any step runs: eval has a target and every benchmark file exists (rather than failing
        hours later, when the first evaluated stage has trained)."""
        targets = self._eval_targets()
        if not targets:
            raise UrtError("pipeline eval.after is set but eval has neither shards nor benchmarks: set "
                           "pipeline.eval.shards / pipeline.eval.benchmarks, or pipeline.eval.after=[]")
        missing = [f"{kw['benchmark']}: {kw['benchmark_file']}" for _, kw in targets
                   if "benchmark_file" in kw and not Path(str(kw["benchmark_file"])).expanduser().exists()]
        if missing:
            raise UrtError("pipeline eval: benchmark file(s) not found: " + "; ".join(missing) + " (convert "
                           "or download them to these paths, point pipeline.eval.benchmarks elsewhere, or skip "
                           "the evaluation with pipeline.eval.after=[])")

    def _eval_done(self, name: str) -> bool:
        ev = self.p.get("eval") or {}
        return all((self._eval_dir(name, m, w) / "results.json").exists()
                   for m in (ev.get("modes") or ["cot"]) for w, _ in self._eval_targets())

    def evaluate(self, name: str, bundle=None) -> dict:
        """Evaluate step `name`'s model on every eval target and mode; returns its stage summary."""
        from urt.eval.runner import run_eval

        ev = self.p.eval
        targets = self._eval_targets()
        if not targets:
            raise UrtError("pipeline eval needs eval.shards or eval.benchmarks")
        from urt.models.preprocessing import exported_frames

        model = self.model_of(name)
        family = str(self.cfg.model.family)
        if bundle is None:
            from urt.models import load_model

            mc = OmegaConf.to_container(self.compose(name).model, resolve=True)
            mc["name_or_path"] = model
            bundle = load_model(**mc)
        out: dict[str, Any] = {}
        for mode in ev.get("modes") or ["cot"]:
            for what, kw in targets:
                self.say(f"[{name}] eval {what} ({mode})")
                res = run_eval(self._eval_dir(name, mode, what), bundle=bundle, family=family, mode=mode,
                               order=str(ev.get("order", "both")), seed=int(ev.get("seed", 0)),
                               max_new_tokens=int(ev.get("max_new_tokens", 1024)),
                               batch_size=int(ev.get("batch_size", 8)), limit=ev.get("limit"),
                               frames=int(ev["frames"]) if ev.get("frames") else exported_frames(model),
                               progress=bool(ev.get("progress", True)), **kw)
                out.setdefault(mode, {})[what] = stage_summary(res)
        first_mode = next(iter(out))
        first = out[first_mode][next(iter(out[first_mode]))]
        return {**first, "mode": first_mode, "modes": out}

    def _load_results(self) -> dict:
        path = self.dir / RESULTS
        base = {"experiment": self.cfg.get("experiment"), "name": str(self.p.name), "overrides": self.overrides,
                "stages": {}}
        if path.exists():
            try:
                old = json.loads(path.read_text())
                base["stages"] = {k: v for k, v in old.get("stages", {}).items() if k in self.steps}
            except json.JSONDecodeError:
                log.warning("%s is not valid JSON: evaluations are redone", path)
        return base

    def _write_results(self, results: dict) -> None:
        order = list(self.steps)
        results["stages"] = dict(sorted(results["stages"].items(), key=lambda kv: order.index(kv[0])))
        tmp = self.dir / (RESULTS + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(self.dir / RESULTS)


def _rank() -> int:
    import os

    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _shard_total(path: str) -> int | None:
    """Samples in a shard directory by its index.json (None: unknown, e.g. no index)."""
    idx = Path(path) / "index.json"
    if not idx.is_file():
        return None if any(Path(path).glob("*.tar")) else 0
    try:
        return int(json.loads(idx.read_text()).get("total"))
    except (ValueError, TypeError, json.JSONDecodeError):
        return None


def stage_summary(res: dict) -> dict:
    """The pipeline's per-stage block from an eval results dict."""
    from urt.data.schema import TASKS

    by = res.get("by_task") or {}
    pos = res.get("position") or {}
    return {"overall": res.get("accuracy"), "format_rate": res.get("format_valid_rate"),
            "answer_1_rate": pos.get("pred_1_rate"), "gold_1_rate": pos.get("gold_1_rate"),
            "consistency": (pos.get("consistency") or {}).get("rate"),
            "n": (res.get("counts") or {}).get("judgements"),
            "tasks": {t: (by[t]["accuracy"] if t in by else None) for t in TASKS},
            "task_format_rate": {t: (by[t].get("format_valid_rate") if t in by else None) for t in TASKS}}


def run_pipeline(overrides: list[str], *, only: list[str] | None = None,
                 console_log: Callable[[str], None] | None = None) -> tuple[Pipeline, dict]:
    from urt.config import compose_config

    cfg = compose_config(list(overrides))
    pipe = Pipeline(cfg, overrides, console_log=console_log)
    return pipe, pipe.run(only=only)
