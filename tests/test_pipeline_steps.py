"""Pipeline step kinds (urt/pipeline/steps.py) and the CLI layout: a kind is looked up in a registry (an unknown
or twice-registered one is an error), other packages register theirs through `pipeline.imports`, and each core
kind runs the very function its `urt` command runs, on the config the pipeline composes for the step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import urt.cli
from urt.config import compose_config, override_value
from urt.errors import UrtError
from urt.pipeline import steps
from urt.pipeline.core import DONE, Pipeline, run_pipeline

REPO = Path(__file__).resolve().parents[1]
COLD_START_ONLY = "experiment=paper/qwen2_5_vl_7b/cold_start_only"


@pytest.fixture
def registry(monkeypatch):
    """The registry as it is, restored after the test (a test's kinds do not leak into the next)."""
    monkeypatch.setattr(steps, "_KINDS", dict(steps._KINDS))
    return steps


def _pipe(*overrides: str) -> Pipeline:
    return Pipeline(compose_config(list(overrides)), list(overrides))


def _demo_pipe(tmp_path, *extra: str) -> Pipeline:
    from urt.demo.cli import demo_overrides

    ov = demo_overrides(["demo=smoke", f"paths.runs={tmp_path}", *extra])
    return Pipeline(compose_config(ov), ov)


# ------------------------------------------------------------------------------------------ layout
def test_no_cli_module_at_the_package_root():
    """Commands live with their code: one `cli.py` per package (or the module itself registers, urt.config)."""
    assert sorted(p.name for p in (REPO / "urt").glob("*_cli.py")) == []
    for name in urt.cli.LAYERS:
        assert callable(getattr(__import__(name, fromlist=["register"]), "register")), name


# ------------------------------------------------------------------------------------------ the registry
def test_core_kinds_and_their_wiring():
    kinds = steps.step_kinds()
    assert {"train", "sample", "distill"} <= set(kinds)
    train, sample, distill = kinds["train"], kinds["sample"], kinds["distill"]
    assert (train.dir_key, train.data_key, train.leaves_model, train.all_ranks) == (
        "stage.run_dir", "data.train_shards", True, True)
    assert (sample.dir_key, sample.data_key, sample.leaves_model, sample.all_ranks) == (
        "sample.out_dir", "sample.shards", False, False)
    assert (distill.dir_key, distill.data_key) == ("distill.out_dir", "distill.shards")
    # the core names none of the demo's kinds: they come with urt.demo.steps
    core = (REPO / "urt" / "pipeline").glob("*.py")
    assert not any("demo_data" in p.read_text() or "demo_vision" in p.read_text() for p in core)


def test_unknown_kind_lists_the_known_ones_and_how_to_register():
    with pytest.raises(UrtError, match=r"pipeline step 'cold_start': unknown step kind 'nope' \(known kinds: "
                                       r"[a-z_, ]*distill, [a-z_, ]*sample, train[a-z_, ]*\).*register_step_kind.*"
                                       r"pipeline.imports"):
        _pipe(COLD_START_ONLY, "pipeline.steps.cold_start.kind=nope")


def test_registering_a_name_twice_is_an_error_unless_replaced(registry):
    first = registry.register_step_kind("twice", lambda cfg: None)
    assert registry.step_kind("twice") is first and first.registered_by == __name__
    with pytest.raises(UrtError, match=r"step kind 'twice' is already registered \(by test_pipeline_steps\); "
                                       r"pass replace=True"):
        registry.register_step_kind("twice", lambda cfg: None)
    with pytest.raises(UrtError, match="step kind 'train' is already registered"):
        registry.register_step_kind("train", "urt.train:train")
    second = registry.register_step_kind("twice", "urt.stages.rejection:run_sample", replace=True)
    assert registry.step_kind("twice") is second
    with pytest.raises(UrtError, match="run must be a callable or 'module:function'"):
        registry.register_step_kind("bad", "urt.train.train")


USER_KINDS = '''
from urt.pipeline.steps import register_step_kind


def touch(cfg, step):
    """A user's kind: writes its option and a composed config value into its directory."""
    (step.dir / "touched.txt").write_text(f"{step.options['word']} seed={cfg.seed}")
    step.say(f"[{step.name}] touched")


register_step_kind("touch", touch, with_step=True)
'''


def test_a_user_kind_runs_in_a_pipeline_through_imports(tmp_path, monkeypatch, registry):
    module = "user_steps_for_test_pipeline"
    (tmp_path / f"{module}.py").write_text(USER_KINDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    ov = [COLD_START_ONLY, f"paths.root={tmp_path}", "pipeline.eval.after=[]", "seed=7",
          "~pipeline.steps.cold_start", "+pipeline.steps.mine={kind:touch,options:{word:hello}}"]
    with pytest.raises(UrtError, match=r"pipeline step 'mine': unknown step kind 'touch'.*pipeline.imports"):
        run_pipeline(ov)  # not imported: not registered
    said: list[str] = []
    pipe, results = run_pipeline([*ov, f"+pipeline.imports=[{module}]"], console_log=said.append)
    out = pipe.dir / "mine"
    assert (out / "touched.txt").read_text() == "hello seed=7"
    assert (out / DONE).is_file() and results["stages"] == {}
    assert said[:2] == [f"[mine] touch -> {out}", "[mine] touched"]
    # a user kind leaves no model unless registered so: a later `init` from it is refused
    with pytest.raises(UrtError, match=r"pipeline step 'mine' \(touch\) has no model to start from"):
        pipe.model_of("mine")
    said.clear()
    run_pipeline([*ov, f"+pipeline.imports=[{module}]"], console_log=said.append)
    assert said == [f"[mine] finished earlier: skipped ({out})"]
    with pytest.raises(UrtError, match=r"pipeline.imports: cannot import 'no_such_step_module'"):
        run_pipeline([*ov, "+pipeline.imports=[no_such_step_module]"])


def test_options_and_data_a_kind_does_not_take_are_errors():
    with pytest.raises(UrtError, match=r"pipeline step 'cold_start': kind 'train' takes no `options` \(got lr\); "
                                       r"set its config in the step's `overrides`"):
        _pipe(COLD_START_ONLY, "+pipeline.steps.cold_start.options={lr:1.0}")


# ------------------------------------------------------------------------------------------ distill
def test_distill_step_composes_conf_distill_and_its_options_reach_the_teacher(tmp_path, monkeypatch):
    """The demo's distill step: its options are overrides of conf/distill/rule.yaml (composed as urt distill
    composes it), so the rule teacher gets its `style` and `dimensions`, the run its tasks and paths."""
    import urt.data.shards
    import urt.stages.distill as distill_mod

    pipe = _demo_pipe(tmp_path, "+pipeline.steps.cold_start_data.options.dimensions=2")
    cfg = pipe.compose("cold_start_data")
    rule = OmegaConf.load(REPO / "conf" / "distill" / "rule.yaml")
    assert set(cfg.distill) == set(rule)  # the group's settings, nothing else
    d = cfg.distill
    assert (d.teacher, d.style, d.dimensions, d.frames, d.progress) == ("rule", "chain", 2, 4, False)
    assert list(d.tasks) == ["image_generation"] and d.batch_size == rule.batch_size
    assert d.shards == str(pipe.dir / "data" / "train") and d.out_dir == str(pipe.dir / "cold_start_data")

    seen = {}

    def fake_distill(samples, teacher, out_dir, **kw):
        seen.update(teacher=teacher, out_dir=out_dir, **kw)
        return distill_mod.DistillReport(teacher="rule")

    monkeypatch.setattr(distill_mod, "distill", fake_distill)
    monkeypatch.setattr(urt.data.shards, "read_shards", lambda *a, **kw: seen.update(read=(a, kw)) or iter(()))
    pipe._run_step("cold_start_data", pipe.steps["cold_start_data"])
    t = seen["teacher"]
    assert isinstance(t, distill_mod.RuleTeacher) and (t.style, t.dimensions, t.seed) == ("chain", 2, 0)
    assert seen["out_dir"] == pipe.dir / "cold_start_data" and seen["tasks"] == ["image_generation"]
    assert seen["progress"] is False and seen["batch_size"] == rule.batch_size
    assert seen["read"] == ((str(pipe.dir / "data" / "train"),), {"on_error": "skip", "stats": seen["read"][1]["stats"],
                                                                  "frames": 4})


def test_a_distill_option_the_teacher_lacks_is_an_error_naming_it(tmp_path, capsys):
    with pytest.raises(UrtError, match=r"pipeline step 'cold_start_data': options.concurrency: "
                                       r"conf/distill/rule.yaml has no setting 'concurrency' \(distill.concurrency; "
                                       r"its settings: .*style"):
        _demo_pipe(tmp_path, "+pipeline.steps.cold_start_data.options.concurrency=4").compose("cold_start_data")
    with pytest.raises(UrtError, match=r"options.teacher='gpt' has no .*distill/gpt.yaml \(teachers: openai, rule\)"):
        _demo_pipe(tmp_path, "pipeline.steps.cold_start_data.options.teacher=gpt").compose("cold_start_data")
    # the command: a flag the teacher's settings lack, and a setting appended that the teacher does not take
    base = ["distill", "--shards", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert urt.cli.main([*base, "--concurrency", "4"]) == 2
    assert "--concurrency: the rule teacher has no setting distill.concurrency" in capsys.readouterr().err
    assert urt.cli.main([*base, "+distill.max_tokens=9"]) == 2
    assert "teacher 'rule' does not take distill.max_tokens (its options: template_set, seed, dimensions, style)" \
        in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ one function each
def test_the_command_and_the_pipeline_step_call_the_same_function(tmp_path, monkeypatch):
    """`urt sample` / `urt distill` / `urt train` and a pipeline step of that kind hand their composed config to
    the same function (looked up when the step runs)."""
    import urt.stages.distill
    import urt.stages.rejection
    import urt.train
    from urt.stages.cli import compose_sample_config

    calls: list[tuple[str, object]] = []
    for module, name in ((urt.stages.rejection, "run_sample"), (urt.stages.distill, "run_distill"),
                         (urt.train, "train")):
        monkeypatch.setattr(module, name, lambda cfg, _n=name: calls.append((_n, cfg)) or tmp_path)

    cli_sample = ["model=tiny_qwen2_5_vl", "sample.shards=/in", f"sample.out_dir={tmp_path / 'rs'}", "sample.k=3"]
    assert urt.cli.main(["sample", *cli_sample]) == 0
    assert urt.cli.main(["distill", "--shards", "/in", "--out", str(tmp_path / "d"), "--seed", "3",
                         "distill.style=chain"]) == 0
    assert urt.cli.main(["train", "model=tiny_qwen2_5_vl", f"paths.root={tmp_path}"]) == 0
    (_, sample_cfg), (_, distill_cfg), (_, train_cfg) = calls
    assert [n for n, _ in calls] == ["run_sample", "run_distill", "train"]
    assert sample_cfg == compose_sample_config(cli_sample) and sample_cfg.sample.k == 3
    assert (distill_cfg.distill.seed, distill_cfg.distill.style, distill_cfg.distill.shards) == (3, "chain", "/in")
    assert train_cfg == compose_config(["model=tiny_qwen2_5_vl", f"paths.root={tmp_path}"])

    calls.clear()
    pipe = _pipe("experiment=paper/qwen2_5_vl_7b/pipeline", "model=tiny_qwen2_5_vl", f"paths.root={tmp_path}")
    for step in ("cold_start", "rs_sample"):
        pipe._run_step(step, pipe.steps[step])
    demo = _demo_pipe(tmp_path)
    demo._run_step("cold_start_data", demo.steps["cold_start_data"])
    assert [n for n, _ in calls] == ["train", "run_sample", "run_distill"]
    assert calls[0][1] == pipe.compose("cold_start") and calls[0][1].stage.run_dir == str(pipe.dir / "cold_start")
    assert calls[1][1] == pipe.compose("rs_sample") and calls[1][1].sample.out_dir == str(pipe.dir / "rs_sample")
    assert calls[2][1] == demo.compose("cold_start_data")


# ------------------------------------------------------------------------------------------ overrides
@pytest.mark.parametrize("value", [None, True, 0, -3, 2e-3, 1.0, float("inf"), "abc", "/a/b-1.c", "with space", "it's",
                                   "a\\b", "x\\", "null", "3", "", "a,b=c", [1, "a", None, [2.5]],
                                   {"shape": 0, "color": 200}, {"a": {"b": "c d"}}])
def test_override_value_reads_back_as_the_value(value):
    parsed = OverridesParser.create().parse_override(f"key={override_value(value)}").value()
    assert parsed == value and type(parsed) is type(value)
