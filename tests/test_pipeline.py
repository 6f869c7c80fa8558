"""Pipeline experiments (conf/experiment/**/pipeline.yaml and the ablations) and urt.pipeline.

Every pipeline experiment composes, and so does each of its enabled steps, with the paper's
hyper-parameters and the wiring (run dirs, starting models, data) the pipeline promises — with the real
model and with the tiny model swapped in. The ablations' wiring (which steps run, what each starts from,
what it trains on) is checked through `Pipeline.compose` without running anything. One pipeline
(paper/qwen2_5_vl_7b/pipeline) runs end to end on the tiny model and fixture shards; a re-run skips every
finished step and evaluation."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_fixtures import vqa_image, vqa_question
from urt.config import compose_config
from urt.data.schema import TASKS, Sample
from urt.data.shards import read_shards, write_shards
from urt.errors import UrtError
from urt.models import FAMILIES
from urt.pipeline import DONE, Pipeline, run_pipeline
from urt.prompts import default_template_set

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = CONF / "experiment"


def _pipeline_experiments() -> list[str]:
    """Experiment names whose file declares a `pipeline:` block (pipelines and ablations)."""
    return sorted(str(p.relative_to(EXPERIMENTS).with_suffix(""))
                  for p in EXPERIMENTS.rglob("*.yaml") if re.search(r"^pipeline:", p.read_text(), re.M))


PIPELINES = _pipeline_experiments()
ABLATIONS = ("no_cold_start", "no_rejection_sampling", "grpo_no_cot", "cold_start_only")
# family pipeline -> (family, base model, stage experiment folder)
FAMILY_PIPELINES = {
    "llava_ov_7b": ("llava_onevision", "{checkpoints}/UnifiedReward-7b-hf", "paper/llava_ov_7b"),
    "qwen2_5_vl_7b": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct", "paper/qwen2_5_vl_7b"),
    "qwen3_vl_2b": ("qwen3_vl", "Qwen/Qwen3-VL-2B-Instruct", "paper/qwen3_vl"),
    "qwen3_vl_4b": ("qwen3_vl", "Qwen/Qwen3-VL-4B-Instruct", "paper/qwen3_vl"),
    "qwen3_vl_8b": ("qwen3_vl", "Qwen/Qwen3-VL-8B-Instruct", "paper/qwen3_vl"),
    "qwen3_vl_32b": ("qwen3_vl", "Qwen/Qwen3-VL-32B-Instruct", "paper/qwen3_vl"),
    "qwen3_5_4b": ("qwen3_5", "Qwen/Qwen3.5-4B", "paper/qwen3_5"),
    "qwen3_5_9b": ("qwen3_5", "Qwen/Qwen3.5-9B", "paper/qwen3_5"),
    "qwen3_5_27b": ("qwen3_5", "Qwen/Qwen3.5-27B", "paper/qwen3_5"),
}
BENCHMARKS = {"vl_rewardbench", "genai_bench_image", "genai_bench_video", "videogen_rewardbench"}
UNIFIED = ["HPD", "OIP", "EvalMuse", "OpenAI-4o_t2i_human_preference", "LLaVA-Critic-pairwise", "VideoDPO",
           "Text2Video-Human_Preferences", "ShareGPTVideo-pairwise"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one thread beats two on 2 cores


def _pipe(name: str, *extra: str) -> Pipeline:
    ov = [f"experiment={name}", *extra]
    return Pipeline(compose_config(ov), ov)


def _family_of(name: str) -> str:
    return FAMILY_PIPELINES[name.split("/")[1]][0]


def _shards(cfg, key: str) -> list[str]:
    """A shard-list setting, resolved."""
    return OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)


# ------------------------------------------------------------------------------------------ the shipped set
def test_every_family_and_ablation_has_its_pipeline():
    families = {f for f, spec in FAMILIES.items() if spec.supported}
    assert {f"paper/{m}/pipeline" for m in FAMILY_PIPELINES} <= set(PIPELINES)
    assert {f"paper/qwen2_5_vl_7b/{a}" for a in ABLATIONS} <= set(PIPELINES)
    assert {FAMILY_PIPELINES[m][0] for m in FAMILY_PIPELINES} >= families
    # the shipped sweep files run only these pipeline experiments
    sweeps = (Path(__file__).resolve().parents[1] / "experiments" / "sweeps").glob("*.txt")
    named = {n for f in sweeps for n in re.findall(r"^experiment=(\S+)", f.read_text(), re.M)}
    assert {f"paper/qwen2_5_vl_7b/{a}" for a in ("pipeline", *ABLATIONS)} <= named <= set(PIPELINES)


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_experiment_and_every_step_compose(name):
    """The experiment composes and resolves; each enabled step composes to its stage experiment with the
    pipeline's wiring, in the pipeline's model family; with `model=tiny_<family>` the same steps compose
    onto the tiny model (what a dry run loads)."""
    family = _family_of(name)
    for extra in ([], [f"model=tiny_{family}"]):
        pipe = _pipe(name, *extra)
        cfg = pipe.cfg
        OmegaConf.to_container(cfg, resolve=True)  # no broken interpolation anywhere
        assert cfg.experiment == name and cfg.model.family == family
        assert pipe.dir.name == cfg.pipeline.name and name.split("/")[1] in cfg.pipeline.name
        base = "tiny" if extra else str(cfg.model.name_or_path)
        for step, st in pipe.steps.items():
            sc = pipe.compose(step)
            OmegaConf.to_container(sc, resolve=True)
            assert sc.model.family == family, (name, step)
            assert sc.experiment == str(st.experiment), (name, step)
            out = str(pipe.step_dir(step))
            if st.kind == "train":
                assert sc.stage.run_dir == out
                assert sc.stage.name == ("grpo" if step == "grpo" else "sft")
            else:
                assert st.kind == "sample" and sc.sample.out_dir == out
            # what the step starts from: its (enabled) init's final HF folder, else the base model
            init = st.get("init")
            while init and init not in pipe.steps:
                init = pipe.p.steps[init].get("init")
            if st.get("init"):
                want = str(pipe.step_dir(init) / "hf" / "final") if init else base
                assert sc.model.name_or_path == want, (name, step)
            else:
                assert sc.model.name_or_path == base, (name, step)
            if st.get("data"):
                key = "sample.shards" if st.kind == "sample" else "data.train_shards"
                assert OmegaConf.select(sc, key) == str(pipe.dir / st.data)


@pytest.mark.parametrize("family_pipeline", sorted(FAMILY_PIPELINES))
def test_family_pipeline_has_the_paper_recipe(family_pipeline):
    family, base, recipe = FAMILY_PIPELINES[family_pipeline]
    name = f"paper/{family_pipeline}/pipeline"
    pipe = _pipe(name)
    llava = family == "llava_onevision"
    assert list(pipe.steps) == ["cold_start", "rs_sample", "rejection_sampling", "grpo"]
    base = base.format(checkpoints=pipe.cfg.paths.checkpoints)
    assert pipe.cfg.model.name_or_path == base == pipe.base_model()
    steps = {s: pipe.compose(s) for s in pipe.steps}
    for s, sc in steps.items():
        assert sc.experiment == f"{recipe}/{s}" and sc.model.family == family
        assert sc.model.freeze_vision is True and sc.model.freeze_projector is True  # the LM trains only
    cold, rs, stage2, grpo = steps["cold_start"], steps["rs_sample"], steps["rejection_sampling"], steps["grpo"]
    assert cold.model.name_or_path == base  # stage 1 starts from the family's (size's) base checkpoint
    # stage 1 / 2 SFT (docs/method.md §Cold start): lr 2.5e-6 cosine warmup 3%, wd 0, batch 128, max length 13000
    for sc in (cold, stage2):
        assert sc.optimizer.lr == 2.5e-6 and sc.optimizer.weight_decay == 0.0
        assert sc.scheduler.warmup_ratio == 0.03 and sc.stage.effective_batch_size == 128
        assert sc.data.max_length == 13000 and sc.model.gradient_checkpointing is True
        assert sc.trainer.max_epochs == 3
    assert cold.data.train_shards.endswith("/ImageGen-CoT-Reward-5K/train")
    assert list(cold.data.tasks) == ["image_generation"] and stage2.data.tasks is None
    # stage 2 sampling: the unified preference data of the four tasks
    assert [Path(p).parent.name for p in _shards(rs, "sample.shards")] == UNIFIED
    assert rs.sample.top_p == (1.0 if llava else 0.95)
    assert rs.sample.max_new_tokens == (2048 if llava else 4096) and rs.sample.temperature == 1.0
    # stage 3 GRPO (docs/method.md §GRPO): G=8, beta 0.04 k3, lr 1e-6, temperature 1, top_p, max new tokens
    g = grpo.stage
    assert (g.num_generations, g.loss.beta, g.loss.kl_estimator, g.temperature) == (8, 0.04, "k3", 1.0)
    assert g.top_p == (1.0 if llava else 0.95) and g.max_new_tokens == (2048 if llava else 4096)
    assert grpo.optimizer.lr == 1e-6 and grpo.data.mode == "prompt" and dict(grpo.reward.weights) == {
        "format": 1.0, "accuracy": 1.0}
    # prompts: the family's template set (qwen3 for the Qwen3-VL / Qwen3.5 releases)
    for sc in steps.values():
        assert sc.data.template_set is None and sc.sample.template_set is None
    assert default_template_set(family) == FAMILIES[family].prompt_set == (
        "qwen3" if family in ("qwen3_vl", "qwen3_5") else "paper")
    # evaluation: the four benchmarks, CoT, both orders, after stages 2 and 3
    ev = pipe.p.eval
    assert list(ev.after) == ["rejection_sampling", "grpo"] and list(ev.modes) == ["cot"] and ev.order == "both"
    assert ev.max_new_tokens == g.max_new_tokens
    targets = dict(pipe._eval_targets())
    assert set(targets) == BENCHMARKS
    assert all(str(kw["benchmark_file"]).startswith(f"{pipe.cfg.paths.data}/benchmarks/") for kw in targets.values())


def test_size_pipelines_pick_the_size_and_the_command_line_still_wins():
    pipe = _pipe("paper/qwen3_vl_2b/pipeline")
    assert list(pipe.p.overrides) == ["model=qwen3_vl_2b"]
    assert pipe.compose("cold_start").model.name_or_path == "Qwen/Qwen3-VL-2B-Instruct"
    assert pipe.compose("grpo").model.name_or_path == str(pipe.dir / "rejection_sampling" / "hf" / "final")
    tiny = _pipe("paper/qwen3_vl_2b/pipeline", "model=tiny_qwen3_vl", "trainer.max_steps=2")
    for step in tiny.steps:
        sc = tiny.compose(step)
        assert sc.model.family == "qwen3_vl" and sc.trainer.max_steps == 2
    assert tiny.compose("cold_start").model.name_or_path == "tiny"


def test_a_sweep_replacing_a_steps_overrides_keeps_its_stage_experiment():
    pipe = _pipe("paper/qwen2_5_vl_7b/pipeline",
                 "pipeline.steps.grpo.overrides=['stage.loss.beta=0.0','stage.num_generations=4','optimizer.lr=5e-7']")
    sc = pipe.compose("grpo")
    assert sc.experiment == "paper/qwen2_5_vl_7b/grpo" and sc.stage.name == "grpo"
    assert (sc.stage.loss.beta, sc.stage.num_generations, sc.optimizer.lr) == (0.0, 4, 5e-7)
    assert sc.stage.top_p == 0.95  # the rest of the paper recipe stays


# ------------------------------------------------------------------------------------------ ablations
def _wiring(name: str, *extra: str) -> tuple[Pipeline, dict]:
    """The pipeline and each enabled step's composed config (nothing runs)."""
    pipe = _pipe(name, *extra)
    return pipe, {s: pipe.compose(s) for s in pipe.steps}


def test_ablation_no_cold_start():
    pipe, st = _wiring("paper/qwen2_5_vl_7b/no_cold_start", "model=tiny_qwen2_5_vl")
    assert list(st) == ["rs_sample", "rejection_sampling", "grpo"]
    # rejection sampling and stage-2 SFT start from the base model, not from a cold start
    assert st["rs_sample"].model.name_or_path == "tiny" == st["rejection_sampling"].model.name_or_path
    assert st["rejection_sampling"].data.train_shards == str(pipe.dir / "rs_sample" / "sft")
    assert st["grpo"].model.name_or_path == str(pipe.dir / "rejection_sampling" / "hf" / "final")
    assert st["grpo"].data.train_shards == str(pipe.dir / "rs_sample" / "grpo")
    assert list(pipe.p.eval.after) == ["rejection_sampling", "grpo"]
    real = _pipe("paper/qwen2_5_vl_7b/no_cold_start")
    assert real.compose("rs_sample").model.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert pipe.dir.name == "paper_qwen2_5_vl_7b_no_cold_start"


def test_ablation_no_rejection_sampling():
    pipe, st = _wiring("paper/qwen2_5_vl_7b/no_rejection_sampling", "model=tiny_qwen2_5_vl",
                       "sample.shards=[/u/a,/u/b]")
    assert list(st) == ["cold_start", "grpo"]
    g = st["grpo"]
    assert g.model.name_or_path == str(pipe.dir / "cold_start" / "hf" / "final")
    assert list(g.data.train_shards) == ["/u/a", "/u/b"]  # the unified data (moved by the command line)
    assert g.stage.name == "grpo" and g.stage.num_generations == 8 and g.data.template_set is None
    assert dict(g.reward.weights) == {"format": 1.0, "accuracy": 1.0}
    real = _pipe("paper/qwen2_5_vl_7b/no_rejection_sampling").compose("grpo")
    assert [Path(p).parent.name for p in _shards(real, "data.train_shards")] == UNIFIED
    assert list(pipe.p.eval.after) == ["grpo"]


def test_ablation_grpo_no_cot():
    pipe, st = _wiring("paper/qwen2_5_vl_7b/grpo_no_cot", "model=tiny_qwen2_5_vl")
    assert list(st) == ["grpo"]
    g = st["grpo"]
    assert g.model.name_or_path == "tiny"  # from the base model: every earlier stage is disabled
    assert g.data.template_set == "implicit" and dict(g.reward.weights) == {"accuracy_direct": 1.0}
    from urt.prompts.render import available_templates

    assert g.data.tasks is None and set(available_templates()["implicit"]) == set(TASKS)  # every task has a prompt
    assert g.stage.max_new_tokens == 64 and g.stage.loss.beta == 0.04 and g.optimizer.lr == 1e-6
    assert [Path(p).parent.name for p in _shards(_pipe("paper/qwen2_5_vl_7b/grpo_no_cot").compose("grpo"),
                                                 "data.train_shards")] == UNIFIED
    assert list(pipe.p.eval.after) == ["grpo"] and list(pipe.p.eval.modes) == ["implicit"]
    assert _pipe("paper/qwen2_5_vl_7b/grpo_no_cot").compose("grpo").model.name_or_path == \
        "Qwen/Qwen2.5-VL-7B-Instruct"


def test_ablation_cold_start_only():
    pipe, st = _wiring("paper/qwen2_5_vl_7b/cold_start_only", "model=tiny_qwen2_5_vl")
    assert list(st) == ["cold_start"] and st["cold_start"].model.name_or_path == "tiny"
    assert list(pipe.p.eval.after) == ["cold_start"]


# ------------------------------------------------------------------------------------------ errors
def test_missing_benchmark_files_fail_before_any_step(tmp_path):
    with pytest.raises(UrtError, match=r"benchmark file\(s\) not found: vl_rewardbench: .*vl_rewardbench\.json"):
        run_pipeline(["experiment=paper/qwen2_5_vl_7b/pipeline", f"paths.root={tmp_path}", "model=tiny_qwen2_5_vl"])
    assert not (tmp_path / "runs" / "paper_qwen2_5_vl_7b" / "cold_start").exists()
    with pytest.raises(UrtError, match="eval has neither shards nor benchmarks"):
        run_pipeline(["experiment=paper/qwen2_5_vl_7b/cold_start_only", f"paths.root={tmp_path}",
                      "pipeline.eval.benchmarks=[]"])
    assert not (tmp_path / "runs" / "paper_qwen2_5_vl_7b_cold_start_only" / "cold_start").exists()


def test_only_names_an_enabled_step(tmp_path):
    ov = ["experiment=paper/qwen2_5_vl_7b/no_cold_start", f"paths.root={tmp_path}", "pipeline.eval.after=[]"]
    with pytest.raises(UrtError, match=r"--only 'cold_start' is disabled .*enabled steps: rs_sample"):
        run_pipeline(ov, only=["cold_start"])
    with pytest.raises(UrtError, match=r"--only 'nope' is not a step"):
        run_pipeline(ov, only=["nope"])


def test_each_finished_step_is_freed_before_the_next(tmp_path, monkeypatch):
    """What a step built sits in reference cycles (trainer <-> module <-> data module): the pipeline collects it
    after the step, so the next step does not run beside the last one's model and data (a 5 GB encoding cache
    in the demo; a whole model on a GPU)."""
    import gc
    import weakref

    class Built:  # stands in for a stage's trainer / module / data module
        pass

    alive: dict[str, weakref.ref] = {}

    def run_step(self, name, st):
        self.step_dir(name).mkdir(parents=True)
        a, b = Built(), Built()
        a.other, b.other = b, a  # a cycle: only a full collection frees it
        alive[name] = weakref.ref(a)
        for earlier, ref in alive.items():
            if earlier != name:
                assert ref() is None, f"{earlier} still alive while {name} runs"

    monkeypatch.setattr(Pipeline, "_run_step", run_step)
    ov = ["experiment=paper/qwen2_5_vl_7b/pipeline", f"paths.root={tmp_path}", "pipeline.eval.after=[]"]
    gc.disable()
    try:
        run_pipeline(ov, only=["cold_start", "rs_sample", "rejection_sampling"])
    finally:
        gc.enable()
    assert list(alive) == ["cold_start", "rs_sample", "rejection_sampling"]
    assert all(ref() is None for ref in alive.values())


# ------------------------------------------------------------------------------------------ end to end
def _ig(key: str, i: int, label: int = 1) -> Sample:
    return Sample(key, "image_generation", label, [vqa_image(2 * i + 1), vqa_image(2 * i + 2)],
                  caption="a shape on a plain background", source="fixture")


def _iu(key: str, i: int) -> Sample:
    q, a, img = vqa_question(i)
    return Sample(key, "image_understanding", 2, [img], question=q, answers=("no idea", a), source="fixture")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """paper/qwen2_5_vl_7b/pipeline on the tiny model: the cold start overfits 4 rule-teacher CoTs (all
    "Image 1 is better") so that rejection sampling finds correct traces for the image-generation pairs and
    none for the image-understanding ones (-> sft/ and grpo/ both non-empty); every other step runs 1 step."""
    from urt.stages.distill import RuleTeacher

    root = tmp_path_factory.mktemp("pipeline_e2e")
    teacher = RuleTeacher(dimensions=1)
    cold = [_ig(f"cs-{i}", i) for i in range(4)]
    cold = [Sample(s.key, s.task, s.label, s.visuals, caption=s.caption, cot=teacher.write(s), source="fixture")
            for s in cold]
    write_shards(cold, root / "data" / "ImageGen-CoT-Reward-5K" / "train")  # where the experiment reads
    write_shards([_ig("u-ig-0", 4), _ig("u-ig-1", 5)], root / "unified" / "ig")
    write_shards([_iu("u-iu-0", 0), _iu("u-iu-1", 1)], root / "unified" / "iu")
    write_shards([_ig("t-ig-0", 6), _iu("t-iu-0", 2)], root / "eval")
    overrides = [
        "experiment=paper/qwen2_5_vl_7b/pipeline", f"paths.root={root}", "model=tiny_qwen2_5_vl", "trainer=cpu",
        "trainer.max_steps=1", "stage.effective_batch_size=null", "model.gradient_checkpointing=false",
        "model.dtype=float32", "data.num_workers=0", "data.batch_size=2", "data.max_length=4096",
        "data.max_pixels=4096", "data.shuffle_buffer=4",
        f"sample.shards=[{root / 'unified' / 'ig'},{root / 'unified' / 'iu'}]", "sample.k=2",
        "sample.temperature=0.3", "sample.max_new_tokens=160", "sample.order=keep", "sample.progress=false",
        f"pipeline.eval.shards={root / 'eval'}", "pipeline.eval.benchmarks=[]", "pipeline.eval.max_new_tokens=24",
        "pipeline.eval.progress=false",
        "pipeline.steps.cold_start.overrides=['trainer.max_steps=45','trainer.max_epochs=1000','optimizer.lr=3e-3',"
        "'scheduler=constant',"
        "'data.batch_size=4']",
        "pipeline.steps.grpo.overrides=['stage.num_generations=2','stage.max_new_tokens=8',"
        "'stage.micro_batch_size=4']",
    ]
    said: list[str] = []
    pipe, results = run_pipeline(overrides, console_log=said.append)
    return {"root": root, "pipe": pipe, "results": results, "said": said, "overrides": overrides}


@pytest.mark.slow
def test_e2e_runs_every_stage_from_the_previous_one(e2e):
    d = e2e["pipe"].dir
    assert d == e2e["root"] / "runs" / "paper_qwen2_5_vl_7b"
    steps_said = [m.split("]")[0].lstrip("[") for m in e2e["said"] if re.match(r"\[\w+\] (train|sample) -> ", m)]
    assert steps_said == ["cold_start", "rs_sample", "rejection_sampling", "grpo"]
    for step in ("cold_start", "rs_sample", "rejection_sampling", "grpo"):
        assert (d / step / DONE).is_file(), step
    for step in ("cold_start", "rejection_sampling", "grpo"):
        assert (d / step / "hf" / "final" / "config.json").is_file(), step
        assert (d / step / "checkpoints" / "last.ckpt").is_file(), step
    # rejection sampling judged the unified pairs with the cold-started model and split them
    summary = json.loads((d / "rs_sample" / "summary.json").read_text())
    assert summary["total"]["pairs"] == 4
    sft, grpo = list(read_shards(d / "rs_sample" / "sft")), list(read_shards(d / "rs_sample" / "grpo"))
    assert sorted(s.key for s in sft + grpo) == ["u-ig-0", "u-ig-1", "u-iu-0", "u-iu-1"]
    # the cold start only ever answered "Image 1 is better": some image-generation pairs right, no
    # understanding pair (those need "Answer N is better")
    assert sft and all(s.task == "image_generation" and s.cot for s in sft)
    assert {"u-iu-0", "u-iu-1"} <= {s.key for s in grpo}
    # each train step composed its stage experiment from the previous step's folder and data
    cfgs = {s: OmegaConf.load(d / s / "config.yaml") for s in ("cold_start", "rejection_sampling", "grpo")}
    assert cfgs["cold_start"].experiment == "paper/qwen2_5_vl_7b/cold_start"
    assert cfgs["cold_start"].model.name_or_path == "tiny" and cfgs["cold_start"].trainer.max_steps == 45
    assert cfgs["rejection_sampling"].model.name_or_path == str(d / "cold_start" / "hf" / "final")
    assert cfgs["rejection_sampling"].data.train_shards == str(d / "rs_sample" / "sft")
    assert cfgs["grpo"].experiment == "paper/qwen2_5_vl_7b/grpo" and cfgs["grpo"].stage.name == "grpo"
    assert cfgs["grpo"].model.name_or_path == str(d / "rejection_sampling" / "hf" / "final")
    assert cfgs["grpo"].data.train_shards == str(d / "rs_sample" / "grpo")
    assert (d / "grpo" / "rollouts" / "step-000001.parquet").is_file()
    assert not (d / "rejection_sampling" / "EMPTY_DATA").exists()  # stage 2 really trained


@pytest.mark.slow
def test_e2e_results_json(e2e):
    d = e2e["pipe"].dir
    res = json.loads((d / "results.json").read_text())
    assert res == e2e["results"]
    assert res["experiment"] == "paper/qwen2_5_vl_7b/pipeline" and res["name"] == "paper_qwen2_5_vl_7b"
    assert res["overrides"] == e2e["overrides"]
    assert list(res["stages"]) == ["rejection_sampling", "grpo"]
    for stage, s in res["stages"].items():
        assert s["mode"] == "cot" and s["n"] == 4  # 2 held-out pairs in both orders
        assert s["overall"] is None or 0.0 <= s["overall"] <= 1.0
        assert 0.0 <= s["format_rate"] <= 1.0 and set(s["tasks"]) >= {"image_generation", "image_understanding"}
        assert (d / "eval" / stage / "shards-cot" / "results.json").is_file()
    assert (d / "pipeline.yaml").is_file()


@pytest.mark.slow
def test_e2e_rerun_skips_finished_steps_and_evaluations(e2e):
    d = e2e["pipe"].dir
    watched = [d / "cold_start" / "hf" / "final" / "model.safetensors",
               d / "rejection_sampling" / "hf" / "final" / "model.safetensors",
               d / "grpo" / "hf" / "final" / "model.safetensors",
               d / "grpo" / "checkpoints" / "last.ckpt", d / "rs_sample" / "rollouts.jsonl",
               *(d / "eval").rglob("*.jsonl")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    assert len(before) > 5
    said: list[str] = []
    t0 = time.perf_counter()
    _, results = run_pipeline(e2e["overrides"], console_log=said.append)
    assert time.perf_counter() - t0 < 30  # composition only: nothing trains, samples or evaluates
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    skipped = [m for m in said if "finished earlier: skipped" in m]
    assert [m.split("]")[0].lstrip("[") for m in skipped] == ["cold_start", "rs_sample", "rejection_sampling", "grpo"]
    assert not any(" eval " in m for m in said)
    assert results["stages"] == e2e["results"]["stages"]


@pytest.mark.slow
@pytest.mark.parametrize("family_pipeline", ["llava_ov_7b", "qwen3_vl_2b", "qwen3_5_4b"])
def test_e2e_other_families_run_their_first_steps(e2e, family_pipeline):
    """The other families' stage experiments train and sample on their tiny models (one step each,
    `--only cold_start rs_sample`: nothing is evaluated, so no benchmark file is needed)."""
    family = FAMILY_PIPELINES[family_pipeline][0]
    root = e2e["root"]
    overrides = [f"experiment=paper/{family_pipeline}/pipeline", f"paths.root={root}", f"model=tiny_{family}",
                 "trainer=cpu", "trainer.max_steps=1", "stage.effective_batch_size=null",
                 "model.gradient_checkpointing=false", "model.dtype=float32", "data.num_workers=0",
                 "data.batch_size=2", "data.max_length=4096", "data.max_pixels=4096",
                 f"sample.shards={root / 'eval'}", "sample.k=2", "sample.max_new_tokens=8", "sample.progress=false"]
    pipe, results = run_pipeline(overrides, only=["cold_start", "rs_sample"])
    assert pipe.dir == root / "runs" / f"paper_{family_pipeline}" and results["stages"] == {}
    cfg = OmegaConf.load(pipe.dir / "cold_start" / "config.yaml")
    assert cfg.experiment == FAMILY_PIPELINES[family_pipeline][2] + "/cold_start" and cfg.model.family == family
    assert json.loads((pipe.dir / "cold_start" / "hf" / "final" / "config.json").read_text())["model_type"] == \
        FAMILIES[family].model_types[0]
    summary = json.loads((pipe.dir / "rs_sample" / "summary.json").read_text())
    assert summary["total"]["pairs"] == 2 and summary["settings"]["family"] == family
    assert summary["settings"]["template_set"] == FAMILIES[family].prompt_set
    assert not (pipe.dir / "rejection_sampling").exists() and not (pipe.dir / "grpo").exists()
