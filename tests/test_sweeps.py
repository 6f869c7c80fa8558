"""Sweep files, the results collector, `urt sweep`, the Slurm scripts (run locally with stand-in srun,
scontrol and urt) and the Hydra submitit launcher config."""

import csv
import itertools
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from urt.errors import UrtError
from urt.pipeline.cli import main as pipeline_cli_main
from urt.pipeline.sweeps import collect, parse_sweep_file, parse_sweep_text, shell_join, sweep_run

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "experiments" / "sweeps"
ARRAY = REPO / "slurm" / "array.sbatch"
MULTINODE = REPO / "slurm" / "multinode.sbatch"


def sweep_main(argv: list[str]) -> int:
    """`urt sweep ARGV` through the pipeline package's own entry point (`python -m urt.pipeline.cli`)."""
    return pipeline_cli_main(["sweep", *argv])


GRPO_LIST = "pipeline.steps.grpo.overrides=['stage.loss.beta=0.0','optimizer.lr=1e-6']"
FIXTURE_SWEEP = f"""\
# a fixture sweep: comments, blanks, quoting
experiment=paper/qwen2_5_vl_7b/pipeline   # run 0, trailing comment

    # an indented comment
seed=1 'tags=[a,b]'
experiment=paper/qwen2_5_vl_7b/pipeline "{GRPO_LIST}" 'model.name_or_path=/models/with space/m'
experiment=paper/qwen2_5_vl_7b/no_cold_start data.tasks=[image_generation,video_generation] ~logger
"""
RUN2 = ("experiment=paper/qwen2_5_vl_7b/pipeline", GRPO_LIST, "model.name_or_path=/models/with space/m")


# --------------------------------------------------------------------------------------------------
# sweep files


def test_parse_comments_blanks_quotes_and_line_numbers():
    runs = parse_sweep_text(FIXTURE_SWEEP, source="fx.txt")
    assert [r.task_id for r in runs] == [0, 1, 2, 3]
    assert [r.line for r in runs] == [2, 5, 6, 7]
    assert runs[0].overrides == ("experiment=paper/qwen2_5_vl_7b/pipeline",)
    assert runs[1].overrides == ("seed=1", "tags=[a,b]")
    assert runs[2].overrides == RUN2
    assert runs[3].overrides == ("experiment=paper/qwen2_5_vl_7b/no_cold_start",
                                 "data.tasks=[image_generation,video_generation]", "~logger")
    # the list override reaches Hydra as a list of override strings
    parsed = OverridesParser.create().parse_overrides([runs[2].overrides[1]])[0]
    assert parsed.value() == ["stage.loss.beta=0.0", "optimizer.lr=1e-6"]


def test_shell_line_round_trips_through_bash_eval():
    run = parse_sweep_text(FIXTURE_SWEEP)[2]
    line = run.shell()
    assert line == ("experiment=paper/qwen2_5_vl_7b/pipeline \"pipeline.steps.grpo.overrides=['stage.loss.beta=0.0',"
                    "'optimizer.lr=1e-6']\" 'model.name_or_path=/models/with space/m'")
    out = subprocess.run(["bash", "-c", 'eval "a=($1)"; printf "%s\\n" "${a[@]}"', "bash", line],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == list(RUN2)
    tricky = ["a=it's $HOME `x` \\ \"q\"", "b=plain", "c=[x,'y z']"]
    out = subprocess.run(["bash", "-c", 'eval "a=($1)"; printf "%s\\n" "${a[@]}"', "bash", shell_join(tricky)],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == tricky


@pytest.mark.parametrize("line,match", [
    ("seed=1 'tags=[a,b]", r"bad\.txt:3: cannot split the line into overrides \(No closing quotation\)"),
    ('experiment=x "unterminated', r"bad\.txt:3: cannot split .*No closing quotation"),
    ("urt pipeline experiment=x", r"bad\.txt:3: 'urt' is not a Hydra override"),
    ("stage.loss.beta=0,0.04", r"bad\.txt:3: 'stage\.loss\.beta=0,0\.04' is a sweep over several values"),
    ("pipeline.steps.grpo.overrides=[stage.loss.beta=0.0,optimizer.lr=1e-6]",
     r"bad\.txt:3: .* is not a valid Hydra override: .*must be quoted inside the brackets"),
    ("model=[unclosed", r"bad\.txt:3: 'model=\[unclosed' is not a valid Hydra override"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.txt"
    path.write_text(f"# header\nseed=0\n{line}\nseed=2\n")
    with pytest.raises(UrtError, match=match):
        parse_sweep_file(path)


def test_empty_missing_and_out_of_range(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only comments\n\n   \n")
    with pytest.raises(UrtError, match=r"empty\.txt: no runs"):
        parse_sweep_file(empty)
    with pytest.raises(UrtError, match=r"sweep file .*nope\.txt does not exist"):
        parse_sweep_file(tmp_path / "nope.txt")
    good = tmp_path / "good.txt"
    good.write_text(FIXTURE_SWEEP)
    assert sweep_run(good, 3).line == 7
    with pytest.raises(UrtError, match=r"task id 4 is out of range: .*good\.txt has 4 run\(s\), ids 0-3"):
        sweep_run(good, 4)


def test_shipped_paper_ablations():
    runs = parse_sweep_file(SWEEPS / "paper_ablations.txt")
    assert [r.overrides for r in runs] == [(f"experiment=paper/qwen2_5_vl_7b/{name}",) for name in (
        "pipeline", "no_cold_start", "no_rejection_sampling", "grpo_no_cot", "cold_start_only")]


def test_shipped_grpo_grid_is_beta_x_g_x_lr():
    runs = parse_sweep_file(SWEEPS / "grpo_beta_g_lr.txt")
    parser = OverridesParser.create()
    grid = []
    for run in runs:
        assert run.overrides[0] == "experiment=paper/qwen2_5_vl_7b/pipeline" and len(run.overrides) == 2
        parsed = parser.parse_overrides([run.overrides[1]])[0]
        assert parsed.key_or_group == "pipeline.steps.grpo.overrides"
        grid.append(tuple(parsed.value()))
    assert grid == [(f"stage.loss.beta={b}", f"stage.num_generations={g}", f"optimizer.lr={lr}")
                    for b, g, lr in itertools.product(("0.0", "0.04"), (4, 8), ("5e-7", "1e-6"))]


def test_cli_show(tmp_path, capsys):
    path = tmp_path / "fx.txt"
    path.write_text(FIXTURE_SWEEP)
    assert sweep_main(["show", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert lines[1] == f"1\t{path}:5\tseed=1 'tags=[a,b]'"
    assert sweep_main(["show", str(path), "--task-id", "2", "--shell"]) == 0
    assert capsys.readouterr().out == shell_join(RUN2) + "\n"
    assert sweep_main(["show", str(path), "--task-id", "9"]) == 2
    assert "task id 9 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep_main(["show", str(path), "--task-id", "-1"])
    assert "task id must be >= 0" in capsys.readouterr().err


def test_registered_in_an_argparse_tree(tmp_path, capsys):
    """`register` is what urt.cli calls: `urt sweep show` through a parser built like urt's."""
    import argparse

    from urt.pipeline import cli as pipeline_cli

    parser = argparse.ArgumentParser(prog="urt")
    pipeline_cli.register(parser.add_subparsers(dest="command", required=True))
    path = tmp_path / "fx.txt"
    path.write_text(FIXTURE_SWEEP)
    args = parser.parse_args(["sweep", "show", str(path), "--task-id", "0", "--shell"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == "experiment=paper/qwen2_5_vl_7b/pipeline\n"


# --------------------------------------------------------------------------------------------------
# collector

TASKS = {"image_generation": 0.7, "image_understanding": 0.6, "video_generation": 0.5, "video_understanding": 0.4}


def _stage(overall, fmt=1.0, a1=0.5, tasks=None):
    return {"overall": overall, "format_rate": fmt, "answer_1_rate": a1, "tasks": dict(TASKS if tasks is None else tasks)}


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    _write(root / "task-0" / "qwen_pipeline" / "results.json", {
        "experiment": "paper/qwen2_5_vl_7b/pipeline", "name": "qwen_pipeline",
        "overrides": ["experiment=paper/qwen2_5_vl_7b/pipeline", "seed=0"],
        "stages": {"base": _stage(0.5), "cold_start": _stage(0.6),
                   # what urt.pipeline.stage_summary adds beside the contract keys is ignored
                   "grpo": {**_stage(0.8), "gold_1_rate": 0.5, "consistency": 0.9, "n": 40, "mode": "cot",
                            "task_format_rate": {"image_generation": 1.0}, "modes": {"cot": {"shards": {}}}}},
    })
    _write(root / "task-10" / "qwen_pipeline" / "results.json", {
        "experiment": "paper/qwen2_5_vl_7b/pipeline", "name": "qwen_pipeline",
        "overrides": ["experiment=paper/qwen2_5_vl_7b/pipeline", "seed=0", GRPO_LIST],
        "stages": {"base": _stage(0.5), "rejection_sampling": _stage(0.65), "grpo": _stage(0.75)},
        "started": "2025-01-01", "wall_s": 12.5,  # extra keys are ignored
    })
    _write(root / "task-2" / "no_cold_start" / "results.json", {
        "experiment": "paper/qwen2_5_vl_7b/no_cold_start", "name": "no_cold_start",
        "overrides": ["experiment=paper/qwen2_5_vl_7b/no_cold_start"],
        "stages": {"base": _stage(0.5),
                   "grpo": _stage(0.625, fmt=0.9, a1=None,
                                  tasks={"image_generation": 0.9, "video_generation": None, "custom_task": 0.3})},
    })
    # a per-benchmark `urt eval` result inside a stage dir: not a pipeline result, ignored
    _write(root / "task-0" / "qwen_pipeline" / "eval" / "grpo" / "vlrb" / "results.json",
           {"schema": "urt.eval/1", "benchmark": "vl_rewardbench", "accuracy": 0.7})
    # unusable files: counted and named, never a crash
    _write(root / "task-3" / "broken" / "results.json", '{"stages": {"base": ')
    _write(root / "task-4" / "unfinished" / "results.json", {"experiment": "x", "name": "y", "overrides": []})
    return root


def test_collect_tables_plot_and_skips(sweep_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="urt.pipeline.sweeps"):
        report = collect(sweep_dir)
    assert report.runs == ["task-0/qwen_pipeline", "task-2/no_cold_start", "task-10/qwen_pipeline"]
    assert report.rows == 3 + 2 + 3
    assert [p.relative_to(sweep_dir).as_posix() for p, _ in report.skipped] == [
        "task-3/broken/results.json", "task-4/unfinished/results.json"]
    assert "not valid JSON" in report.skipped[0][1] and 'no "stages"' in report.skipped[1][1]
    assert [p.relative_to(sweep_dir).as_posix() for p in report.ignored] == [
        "task-0/qwen_pipeline/eval/grpo/vlrb/results.json"]
    assert "task-3/broken/results.json" in caplog.text and "task-4/unfinished/results.json" in caplog.text

    with report.table_csv.open() as f:
        rows = list(csv.DictReader(f))
    with report.table_csv.open() as f:
        header = next(csv.reader(f))
    assert header == ["run", "overrides", "stage", "overall", "format_rate", "answer_1_rate", "image_generation",
                      "image_understanding", "video_generation", "video_understanding", "custom_task"]
    assert [(r["run"], r["stage"], float(r["overall"])) for r in rows] == [
        ("task-0/qwen_pipeline", "base", 0.5), ("task-0/qwen_pipeline", "cold_start", 0.6),
        ("task-0/qwen_pipeline", "grpo", 0.8),
        ("task-2/no_cold_start", "base", 0.5), ("task-2/no_cold_start", "grpo", 0.625),
        ("task-10/qwen_pipeline", "base", 0.5), ("task-10/qwen_pipeline", "rejection_sampling", 0.65),
        ("task-10/qwen_pipeline", "grpo", 0.75)]
    nc = rows[4]
    assert nc["overrides"] == "experiment=paper/qwen2_5_vl_7b/no_cold_start"
    assert (nc["format_rate"], nc["answer_1_rate"]) == ("0.9", "")
    assert (nc["image_generation"], nc["image_understanding"], nc["video_generation"], nc["custom_task"]) == (
        "0.9", "", "", "0.3")
    assert rows[0]["custom_task"] == "" and float(rows[0]["video_understanding"]) == 0.4
    assert rows[7]["overrides"] == f"experiment=paper/qwen2_5_vl_7b/pipeline seed=0 \"{GRPO_LIST}\""

    md = report.table_md.read_text().splitlines()
    table = [line for line in md if line.startswith("| ")]
    assert table[0] == ("| run | overrides | stage | overall | format_rate | answer_1_rate | image_generation | "
                        "image_understanding | video_generation | video_understanding | custom_task |")
    assert len(table) == 1 + 8
    assert table[5] == ("| task-2/no_cold_start | `experiment=paper/qwen2_5_vl_7b/no_cold_start` | grpo | 62.5 | "
                        "90.0 | – | 90.0 | – | – | – | 30.0 |")
    assert any("task-3/broken/results.json" in line for line in md)  # skips are listed in the table file

    png = report.plot_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_collect_out_dir_and_cli(sweep_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert sweep_main(["collect", str(sweep_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "collected 3 run(s) (8 row(s))" in text
    assert "skipped 2 unusable results.json file(s)" in text and "task-3/broken/results.json" in text
    assert "ignored 1 per-benchmark urt eval results.json file(s)" in text
    assert sorted(p.name for p in out.iterdir()) == ["plot.png", "table.csv", "table.md"]
    assert not (sweep_dir / "table.csv").exists()


def test_stage_order_is_the_pipeline_order_across_ablations(tmp_path):
    root = tmp_path / "s"
    _write(root / "a" / "results.json", {"overrides": [], "stages": {"cold_start": _stage(0.1), "grpo": _stage(0.2)}})
    _write(root / "b" / "results.json", {"overrides": [], "stages": {
        "base": _stage(0.0), "rejection_sampling": _stage(0.3), "grpo": _stage(0.4)}})
    _write(root / "c" / "results.json", {"overrides": [], "stages": {"base": _stage(0.0), "cold_start": _stage(0.1)}})
    report = collect(root)
    with report.table_csv.open() as f:
        stages = [(r["run"], r["stage"]) for r in csv.DictReader(f)]
    assert stages == [("a", "cold_start"), ("a", "grpo"), ("b", "base"), ("b", "rejection_sampling"),
                      ("b", "grpo"), ("c", "base"), ("c", "cold_start")]
    from urt.pipeline.sweeps import _read_run, _Run, _stage_order

    runs = [_read_run(root / n / "results.json", root) for n in "abc"]
    assert _stage_order(runs) == ["base", "cold_start", "rejection_sampling", "grpo"]
    one = [_Run(name=n, path=Path(n), overrides=[], stages={s: {}}) for n, s in (("x", "grpo"), ("y", "base"))]
    assert _stage_order(one) == ["base", "grpo"]
    custom = [_Run(name="z", path=Path("z"), overrides=[], stages={"base": {}, "probe": {}, "grpo": {}}),
              _Run(name="w", path=Path("w"), overrides=[], stages={"base": {}, "cold_start": {}, "grpo": {}})]
    assert _stage_order(custom) == ["base", "probe", "cold_start", "grpo"]


def test_collect_errors(tmp_path):
    with pytest.raises(UrtError, match=r"sweep output directory .*missing does not exist"):
        collect(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UrtError, match=r"no usable results\.json below .*empty \(0 found, 0 skipped\)"):
        collect(tmp_path / "empty")
    bad = tmp_path / "bad"
    _write(bad / "t0" / "results.json", "not json")
    _write(bad / "t1" / "results.json", {"stages": {"grpo": {"overall": "high"}}})
    _write(bad / "t2" / "results.json", {"stages": {"grpo": _stage(0.5)}, "overrides": "seed=1"})
    with pytest.raises(UrtError, match=r"no usable results\.json below .*bad \(3 found, 3 skipped: .*t0/results\.json: "
                                       r"not valid JSON.*t1/results\.json: stages\.grpo\.overall is 'high'.*"
                                       r"t2/results\.json: \"overrides\" is 'seed=1'"):
        collect(bad)
    assert not (bad / "table.csv").exists()


# --------------------------------------------------------------------------------------------------
# Slurm scripts (stand-ins for srun, scontrol and urt on PATH)

SRUN = """#!/bin/bash
# stand-in srun: argv one per line, the rendezvous env; with STANDIN_WAIT, run until USR1
printf '%s\\n' "$@" > "$STANDIN_DIR/srun.argv.tmp"
printf 'MASTER_ADDR=%s\\nMASTER_PORT=%s\\n' "${MASTER_ADDR:-}" "${MASTER_PORT:-}" > "$STANDIN_DIR/srun.env"
if [[ -n "${STANDIN_WAIT:-}" ]]; then
    trap 'echo USR1 > "$STANDIN_DIR/srun.signal"; exit 0' USR1
    mv "$STANDIN_DIR/srun.argv.tmp" "$STANDIN_DIR/srun.argv"
    while :; do sleep 0.05; done
fi
mv "$STANDIN_DIR/srun.argv.tmp" "$STANDIN_DIR/srun.argv"
"""
SCONTROL = """#!/bin/bash
# stand-in scontrol: `show hostnames LIST` expands gpu[07-08]; anything else is recorded
if [[ "$1 $2" == "show hostnames" ]]; then
    [[ "$3" == "gpu[07-08]" ]] && printf 'gpu07\\ngpu08\\n' && exit 0
    echo "$3"; exit 0
fi
printf '%s\\n' "$@" >> "$STANDIN_DIR/scontrol.argv"
"""
URT = """#!/bin/bash
# stand-in urt: `urt sweep ...` goes to the real module, nothing else may be called outside srun
if [[ "$1" == "sweep" ]]; then exec "{python}" -m urt.pipeline.cli "$@"; fi
echo "stand-in urt called with: $*" >&2; exit 99
"""


@pytest.fixture
def standins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("urt", URT.replace("{python}", sys.executable))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "URT_", "MASTER_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STANDIN_DIR=str(tmp_path),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _srun_argv(tmp_path) -> list[str]:
    return (tmp_path / "srun.argv").read_text().splitlines()


@pytest.mark.parametrize("script", [ARRAY, MULTINODE])
def test_sbatch_scripts_pass_bash_n(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@180", "#SBATCH --ntasks-per-node=8"):
        assert directive in text


def test_array_runs_line_of_the_task_id(tmp_path, standins):
    sweep = tmp_path / "fixture.txt"
    sweep.write_text(FIXTURE_SWEEP)
    env = dict(standins, SLURM_ARRAY_TASK_ID="2", SLURM_JOB_ID="4242")
    result = subprocess.run(["bash", str(ARRAY), str(sweep), "trainer.max_steps=5"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _srun_argv(tmp_path) == ["urt", "pipeline", *RUN2, "trainer.max_steps=5",
                                    "paths.runs=runs/sweeps/fixture/task-2"]
    assert "array.sbatch: srun urt pipeline experiment=paper/qwen2_5_vl_7b/pipeline" in result.stdout
    assert not (tmp_path / "scontrol.argv").exists()  # no signal, no requeue


def test_array_sweep_dir_command_and_root(tmp_path, standins):
    sweep = tmp_path / "abl.txt"
    sweep.write_text(FIXTURE_SWEEP)
    env = dict(standins, SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="7", URT_COMMAND="train",
               URT_SWEEP_DIR=str(tmp_path / "out"))
    subprocess.run(["bash", str(ARRAY), str(sweep)], cwd=tmp_path, env=env, check=True, capture_output=True,
                   timeout=60)
    assert _srun_argv(tmp_path) == ["urt", "train", "seed=1", "tags=[a,b]", f"paths.runs={tmp_path}/out/abl/task-1"]
    env = dict(standins, SLURM_ARRAY_TASK_ID="0", SLURM_JOB_ID="7", URT_ROOT="/scratch/me")
    subprocess.run(["bash", str(ARRAY), str(sweep)], cwd=tmp_path, env=env, check=True, capture_output=True,
                   timeout=60)
    assert _srun_argv(tmp_path)[-1] == "paths.runs=/scratch/me/runs/sweeps/abl/task-0"


def test_array_bad_task_id_or_no_array_stops_before_srun(tmp_path, standins):
    sweep = tmp_path / "fixture.txt"
    sweep.write_text(FIXTURE_SWEEP)
    result = subprocess.run(["bash", str(ARRAY), str(sweep)], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(standins, SLURM_ARRAY_TASK_ID="4", SLURM_JOB_ID="1"), timeout=60)
    assert result.returncode != 0
    assert "task id 4 is out of range" in result.stderr and "has 4 run(s), ids 0-3" in result.stderr
    result = subprocess.run(["bash", str(ARRAY), str(sweep)], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(standins, SLURM_JOB_ID="1"), timeout=60)
    assert result.returncode == 2 and "SLURM_ARRAY_TASK_ID is not set" in result.stderr
    assert not (tmp_path / "srun.argv").exists()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"script exited ({proc.returncode}) before {path.name}: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {path.name} after {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize("script", [ARRAY, MULTINODE])
def test_usr1_is_forwarded_to_srun_then_the_job_requeued(tmp_path, standins, script):
    sweep = tmp_path / "fixture.txt"
    sweep.write_text(FIXTURE_SWEEP)
    env = dict(standins, SLURM_ARRAY_TASK_ID="0", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
               SLURM_NTASKS_PER_NODE="4", SLURM_JOB_NODELIST="gpu[07-08]", STANDIN_WAIT="1")
    args = [str(sweep)] if script == ARRAY else ["train", "seed=1"]
    proc = subprocess.Popen(["bash", str(script), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "srun.argv", proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "srun.signal").read_text().strip() == "USR1"
    assert (tmp_path / "scontrol.argv").read_text().splitlines() == ["requeue", "4242"]
    assert "USR1 received: forwarding it to srun, then requeueing job 4242" in out


def test_multinode_command_and_rendezvous(tmp_path, standins):
    env = dict(standins, SLURM_JOB_ID="1234567", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="4",
               SLURM_JOB_NODELIST="gpu[07-08]")
    result = subprocess.run(["bash", str(MULTINODE), "pipeline", "experiment=paper/qwen2_5_vl_7b/pipeline",
                             "model.name_or_path=/models/with space/m", GRPO_LIST],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _srun_argv(tmp_path) == ["urt", "pipeline", "experiment=paper/qwen2_5_vl_7b/pipeline",
                                    "model.name_or_path=/models/with space/m", GRPO_LIST,
                                    "trainer.num_nodes=2", "trainer.devices=4"]
    assert (tmp_path / "srun.env").read_text().splitlines() == ["MASTER_ADDR=gpu07", "MASTER_PORT=19567"]
    assert "multinode.sbatch: srun urt pipeline" in result.stdout

    env["MASTER_PORT"] = "29500"
    subprocess.run(["bash", str(MULTINODE), "train", "seed=3"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=60)
    assert (tmp_path / "srun.env").read_text().splitlines() == ["MASTER_ADDR=gpu07", "MASTER_PORT=29500"]
    assert _srun_argv(tmp_path) == ["urt", "train", "seed=3", "trainer.num_nodes=2", "trainer.devices=4"]


def test_multinode_needs_slurm_task_layout(tmp_path, standins):
    env = dict(standins, SLURM_JOB_ID="1", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[07-08]")
    result = subprocess.run(["bash", str(MULTINODE), "train"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "SLURM_NTASKS_PER_NODE is not set" in result.stderr
    result = subprocess.run(["bash", str(MULTINODE)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr
    assert not (tmp_path / "srun.argv").exists()


# --------------------------------------------------------------------------------------------------
# Hydra submitit launcher config and `urt sweep multirun`

SUBMITIT_SLURM_FIELDS = {  # hydra-submitit-launcher's SlurmQueueConf
    "_target_", "submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb",
    "nodes", "name", "stderr_to_stdout", "partition", "qos", "comment", "constraint", "exclude", "gres",
    "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s",
    "max_num_timeout", "additional_parameters", "array_parallelism", "setup",
}


def test_submitit_launcher_config_composes_without_the_plugin(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from urt.config import conf_dir

    monkeypatch.setenv("URT_ROOT", str(tmp_path))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=submitit_slurm", "hydra.sweep.dir=/sweeps/x"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert set(launcher) <= SUBMITIT_SLURM_FIELDS
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.signal_delay_s == 180 and launcher.max_num_timeout > 0
    container = OmegaConf.to_container(launcher, resolve=False)
    assert container["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert launcher.submitit_folder == "/sweeps/x/.submitit/%j"


def test_multirun_with_submitit_needs_the_plugin():
    from urt.pipeline.sweeps import hydra_multirun, submitit_plugin_installed

    if submitit_plugin_installed():
        pytest.skip("hydra-submitit-launcher is installed here")

    with pytest.raises(UrtError, match="pip install hydra-submitit-launcher"):
        hydra_multirun(["hydra/launcher=submitit_slurm", "seed=0,1"], command="config")


@pytest.mark.slow
def test_multirun_runs_one_urt_process_per_job(tmp_path, monkeypatch, capfd):
    """Hydra's basic launcher in-process, each job a real `urt config` process with its own paths.runs."""
    from urt.config import compose_config

    monkeypatch.setenv("URT_ROOT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    sweep = tmp_path / "sw"
    assert sweep_main(["multirun", "--command", "config", "seed=11,12", "model=tiny_qwen3_vl",
                       f"hydra.sweep.dir={sweep}"]) == 0
    out = capfd.readouterr().out
    for job, seed in ((0, 11), (1, 12)):
        assert f"seed: {seed}\n" in out
        assert f"  runs: {sweep}/{job}\n" in out  # the job's paths.runs reached the composed config
        assert (sweep / str(job) / ".hydra" / "overrides.yaml").is_file()
    assert compose_config(["seed=5"]).seed == 5  # Hydra's global state was released
    # a job whose urt process fails makes the multirun fail, naming the job and its command line
    assert sweep_main(["multirun", "--command", "no-such-command", "seed=3", f"hydra.sweep.dir={tmp_path / 'bad'}"]) == 1
    err = capfd.readouterr().err
    assert "job 0: `urt no-such-command seed=3 paths.runs=" in err and "exited with status 2" in err


def test_plot_labels_show_what_tells_runs_apart():
    """Legend entries drop the overrides every run shares and open per-step override lists."""
    from urt.pipeline.sweeps import _label, _label_tokens, _Run

    runs = [_Run(name=f"task-{i}/p", path=Path("x"), stages={},
                 overrides=list(r.overrides))
            for i, r in enumerate(parse_sweep_file(SWEEPS / "grpo_beta_g_lr.txt"))]
    common = set.intersection(*(set(_label_tokens(r.overrides)) for r in runs))
    assert common == {"experiment=paper/qwen2_5_vl_7b/pipeline"}
    assert _label(runs[5], common) == "task-5/p: stage.loss.beta=0.04 stage.num_generations=4 optimizer.lr=1e-6"
