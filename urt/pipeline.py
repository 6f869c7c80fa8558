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

Step kinds: `train` (urt train: SFT or GRPO by the step's `stage`), `sample` (urt sample: rejection
sampling), `distill` (urt distill with the rule or an OpenAI-compatible teacher), `demo_data` (the
embedded easy-vqa data, urt.demo.data), `demo_vision` (the demo's vision pretraining, urt.demo.vision: the
step's model with attribute heads on its visuals; like a train step it leaves dir/<step>/hf/final). Each
step composes the root config with, in order: its stage experiment (`experiment: NAME` -> `experiment=NAME`),
the pipeline's `overrides` (pipeline-wide defaults, e.g. the model size of a family's stage experiments; the
command line beats them), the pipeline's own overrides from the command line (those not about
`experiment`/`pipeline`), the step's `overrides`, and the wiring: `stage.run_dir`/`sample.out_dir` =
dir/<step>, `model.name_or_path` = the `init` step's final HF folder, `data.train_shards` (a sample step:
`sample.shards`) = dir/<data>. A step that finished writes dir/<step>/DONE and is skipped on re-run; an
interrupted train step resumes from its last.ckpt. `enabled: false` drops a step (ablations). A step whose
`init` step is disabled starts from that step's own starting point, recursively, and at the end of that chain
from the pipeline's base model (the pipeline config's `model.name_or_path`: the experiment's model, or
`model=…` from the command line); a step without `init` starts from its own config's model.
`extra_overrides` (empty in the shipped configs) are appended after `overrides`: sweeps set them
(`"pipeline.steps.grpo.extra_overrides=['stage.loss.beta=0.0']"`) without repeating the step's own overrides.

Under several processes (srun / torchrun: RANK or SLURM_PROCID set) every rank runs the train steps
together (Lightning DDP/FSDP); sample, distill, data and eval steps run on rank 0 while the other ranks
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

log = logging.getLogger(__name__)

KINDS = ("train", "sample", "distill", "demo_data", "demo_vision")
MODEL_KINDS = ("train", "demo_vision")  # steps that leave a model (dir/<step>/hf/final) for a later `init`
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
        self.steps: dict[str, DictConfig] = {}
        for name, st in steps.items():
            if st is None:
                continue
            kind = st.get("kind")
            if kind not in KINDS:
                raise UrtError(f"pipeline step {name!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
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

    # ------------------------------------------------------------------------------------ paths
    def step_dir(self, name: str) -> Path:
        return self.dir / name

    def done(self, name: str) -> bool:
        return (self.step_dir(name) / DONE).exists()

    def model_of(self, name: str | None) -> str | None:
        """The final HF folder a step leaves (train steps); None for no step / a disabled step."""
        if not name or name not in self.steps:
            return None
        if self.steps[name].kind not in MODEL_KINDS:
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
        exp = st.get("experiment")
        ov = [*([f"experiment={exp}"] if exp else []), *_listify(self.p.get("overrides")), *self.inherited,
              *_listify(st.get("overrides")), *_listify(st.get("extra_overrides"))]
        out = self.step_dir(name)
        kind = st.kind
        if kind == "train":
            ov.append(f"stage.run_dir={out}")
        elif kind == "sample":
            ov.append(f"sample.out_dir={out}")
        init = self._init_of(st)
        if init:
            ov.append(f"model.name_or_path={init}")
        data = self._data_of(st)
        if data:
            ov.append(f"{'sample.shards' if kind == 'sample' else 'data.train_shards'}={data}")
        return compose_config([*ov, *(extra or [])])

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
        for name, st in self.steps.items():
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            if self.done(name):
                self.say(f"[{name}] finished earlier: skipped ({self.step_dir(name)})")
            elif st.kind != "train" and _rank() != 0:
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

    def _wait_for(self, name: str, poll: float = 5.0) -> None:
        self.say(f"[{name}] rank {_rank()}: waiting for rank 0 to finish this step")
        while not self.done(name):
            time.sleep(poll)

    def _run_step(self, name: str, st: DictConfig) -> None:
        cfg = self.compose(name)
        out = self.step_dir(name)
        out.mkdir(parents=True, exist_ok=True)
        if st.kind == "train":
            from urt.train import train

            data = self._data_of(st)
            if data and _shard_total(data) == 0:
                # e.g. rejection sampling kept no correct trace: this stage has nothing to learn from, and
                # its result is the model it starts from (said loudly, recorded in DONE)
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
            train(cfg)
        elif st.kind == "sample":
            from urt.models import load_model
            from urt.stages.rejection import rejection_sample

            s = OmegaConf.to_container(cfg.sample, resolve=True)
            bundle = load_model(**OmegaConf.to_container(cfg.model, resolve=True))
            s.pop("out_dir")
            rejection_sample(bundle, s.pop("shards"), out, progress=bool(s.pop("progress", True)), **s)
        elif st.kind == "distill":
            self._distill(st, out)
        elif st.kind == "demo_vision":
            from urt.demo.vision import pretrain_vision
            from urt.models import load_model

            opts = OmegaConf.to_container(st.get("options") or {}, resolve=True)
            shards = opts.pop("shards", None)
            if not shards:
                raise UrtError(f"pipeline step {name!r}: a demo_vision step needs options.shards (the train pairs)")
            bundle = load_model(**OmegaConf.to_container(cfg.model, resolve=True))
            report = pretrain_vision(bundle, shards, out, **opts)
            self.say(f"[{name}] held-out accuracy {report['heldout_before']} -> {report['heldout_after']} "
                     f"({report['seconds']:.0f} s)")
        elif st.kind == "demo_data":
            from urt.demo.data import build_demo_data

            opts = OmegaConf.to_container(st.get("options") or {}, resolve=True)
            summary = build_demo_data(out, **opts)
            for split, s in summary["splits"].items():
                self.say(f"[{name}] {split}: {s['pairs']} pairs {s['tasks']}")

    def _distill(self, st: DictConfig, out: Path) -> None:
        from urt.data.shards import SkipStats, read_shards
        from urt.stages.distill import OpenAITeacher, RuleTeacher, distill, print_report

        opts = OmegaConf.to_container(st.get("options") or {}, resolve=True)
        src = opts.pop("shards", None)
        if not src:
            raise UrtError("a distill step needs options.shards (the pairs to judge)")
        teacher_name = opts.pop("teacher", "rule")
        if teacher_name == "rule":
            teacher = RuleTeacher(seed=int(opts.pop("seed", 0)), dimensions=opts.pop("dimensions", None),
                                  style=opts.pop("style", "full"))
        elif teacher_name == "openai":
            teacher = OpenAITeacher(**opts.pop("openai", {}))
        else:
            raise UrtError(f"distill teacher must be rule or openai, got {teacher_name!r}")
        stats = SkipStats()
        samples = read_shards(str(src), on_error="skip", stats=stats, frames=int(opts.pop("frames", 8)))
        report = distill(samples, teacher, out, tasks=opts.pop("tasks", None), limit=opts.pop("limit", None),
                         progress=bool(opts.pop("progress", True)), **opts)
        print_report(report)

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
