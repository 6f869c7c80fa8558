"""Issue #31, "nothing lost, nothing silent": each failure a demanding user met through the CLI, reproduced
through the public entry points (`urt.cli.main`, `urt.*`) on tiny models. Server, inspect and convert
cases live beside their subjects (tests/test_serve.py, tests/test_data_inspect.py,
tests/test_data_convert.py)."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint

from data_fixtures import vqa_image
from grpo_fixtures import write_grpo_prompts
from urt.cli import main
from urt.data.schema import Sample
from urt.data.shards import write_shards

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 image-generation pairs with answers, 4 shards of 2 (with index.json)."""
    d = tmp_path_factory.mktemp("rel_shards")
    out = [Sample(f"ig-{j}", "image_generation", 1 + j % 2, [vqa_image(j % 4), vqa_image(j % 4 + 1)],
                  caption=f"picture {j}", source="fixture") for j in range(8)]
    write_shards(out, d, maxcount=2)
    return d


def sft_args(root, shards, name, *extra, steps=1):
    return ["train", "model=tiny_qwen2_5_vl", "data.target=answer", f"stage.run_name={name}", f"paths.root={root}",
            f"data.train_shards={shards}", "data.val_shards=null", "data.num_workers=0", "data.batch_size=2",
            "data.min_pixels=null", "data.max_pixels=12544", "data.shuffle_buffer=0", "trainer=cpu",
            f"trainer.max_steps={steps}", "stage.gen_eval.every_n_epochs=0", "logger=csv", *extra]


def grpo_args(root, shards, name, *extra, steps=1):
    return ["train", "stage=grpo", "trainer=cpu", "logger=csv", "model=tiny_qwen2_5_vl", f"paths.root={root}",
            f"data.train_shards={shards}", "data.val_shards=null", "data.num_workers=0", "data.batch_size=2",
            "data.min_pixels=null", "data.max_pixels=12544", "data.shuffle_buffer=0", f"trainer.max_steps={steps}",
            "stage.num_generations=2", "stage.max_new_tokens=4", "stage.micro_batch_size=4",
            "optimizer.lr=1e-3", "scheduler=constant", f"stage.run_name={name}", "reward=accuracy_only", *extra]


def cli(args, capsys):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------------------------- 1. export
@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_finished_run_whose_export_was_lost_is_exported_on_rerun(tmp_path, shards, capsys, stage):
    """#31.1: hf/ deleted (or a kill mid-export) after the run reached max_steps: the same command restores
    last.ckpt at max_steps, skips the loop and must still export hf/final, from the trained weights."""
    if stage == "sft":
        args = sft_args(tmp_path, shards, "exp")
    else:
        args = grpo_args(tmp_path, write_grpo_prompts(tmp_path / "prompts"), "exp")
    rc, out, _ = cli(args, capsys)
    assert rc == 0
    final = tmp_path / "runs" / "exp" / "hf" / "final"
    assert json.loads((final / "urt.json").read_text())["global_step"] == 1
    trained = (final / "model.safetensors").read_bytes()
    shutil.rmtree(final.parent)
    # a kill mid-export leaves the temporary folder only: never a half-written hf/final
    (final.parent / ".final.tmp").mkdir(parents=True)
    (final.parent / ".final.tmp" / "config.json").write_text("{")
    rc, out, err = cli(args, capsys)
    assert rc == 0 and f"hf folder: {final.resolve()}" in out
    assert (final / "config.json").is_file() and (final / "model.safetensors").read_bytes() == trained
    assert not (final.parent / ".final.tmp").exists()


# ---------------------------------------------------------------------------------------------- 2./3. data
def test_unreadable_shards_stop_the_run_naming_each_reason(tmp_path, capsys):
    """#31.2: .tar files that are empty or not tars, under the default data.on_error=skip: an error with the
    counts, not an untrained export and exit 0."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.tar").write_bytes(b"")
    (bad / "b.tar").write_text("not a tar\n")
    rc, _, err = cli(sft_args(tmp_path, bad, "bad", "data.on_error=skip"), capsys)
    assert rc == 2
    assert "urt: error: no training sample could be read" in err and "truncated_tar: 2" in err
    assert str(bad / "a.tar") in err
    assert not (tmp_path / "runs" / "bad" / "hf" / "final").exists()


def test_index_listing_no_shard_stops_the_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    write_shards([], empty)
    assert json.loads((empty / "index.json").read_text())["shards"] == []
    rc, _, err = cli(sft_args(tmp_path, empty, "empty"), capsys)
    assert rc == 2 and "no shard to train on" in err and str(empty) in err


def test_truncated_shard_counted_in_the_run_summary(tmp_path, shards, capsys, caplog):
    """#31.3: a shard cut in half loses samples: the run's summary (log and run_dir/data_summary.json) counts
    them per reason, across epochs, also when max_steps stops the run in a later epoch."""
    trunc = tmp_path / "trunc"
    shutil.copytree(shards, trunc)
    first = trunc / "shard-000000.tar"  # the first shard read: its loss is reported before any sample
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 3])
    rc, _, err = cli(sft_args(tmp_path, trunc, "trunc", "data.shuffle=false", steps=4), capsys)
    assert rc == 0
    summary = json.loads((tmp_path / "runs" / "trunc" / "data_summary.json").read_text())["train"]
    assert summary["ok"] >= 6 and summary["skipped"].get("missing_samples", 0) >= 1, summary
    assert summary["skipped"].get("truncated_tar", 0) >= 1, summary
    assert any("data: train" in r.message and "missing_samples" in r.getMessage() for r in caplog.records)


def test_reader_loss_before_the_first_sample_is_counted(tmp_path, shards):
    from urt.data.datamodule import RewardDataModule
    from urt.models import load_model

    d = tmp_path / "d"
    shutil.copytree(shards, d)
    (d / "shard-000000.tar").write_bytes(b"")  # fails before any sample is read
    dm = RewardDataModule(train_shards=str(d), batch_size=2, target="answer", shuffle=False, max_pixels=12544,
                          bundle=load_model("tiny", "qwen2_5_vl"))
    with pytest.warns(UserWarning, match="truncated_tar"):
        n = sum(len(b["keys"]) for b in dm.train_dataloader())
    assert n == 6 and dm.skip_stats.skipped["truncated_tar"] == 1
    assert dm.skip_stats.skipped["missing_samples"] == 2


# ---------------------------------------------------------------------------------------------- 5. resume
def test_corrupt_last_ckpt_falls_back_to_the_newest_intact_one(tmp_path, shards, capsys):
    """#31.5: last.ckpt cut short: resume from the intact step-*.ckpt beside it, with a warning naming the
    corrupt file (kept aside) and stage.resume=PATH; an explicit corrupt path is a `urt: error:`."""
    keep = ["stage.checkpoint.every_n_steps=1", "stage.checkpoint.keep=-1"]
    assert cli(sft_args(tmp_path, shards, "ck", *keep, steps=2), capsys)[0] == 0
    ckpts = tmp_path / "runs" / "ck" / "checkpoints"
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"last\.ckpt is not a complete torch checkpoint") as rec:
        rc, out, err = cli(sft_args(tmp_path, shards, "ck", *keep, steps=3), capsys)
    assert rc == 0
    msg = str(rec[0].message)
    assert "step-000002.ckpt" in msg and "stage.resume=PATH" in msg and "last.ckpt.corrupt" in msg
    assert (ckpts / "last.ckpt.corrupt").stat().st_size == 1000
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 3
    # given explicitly, a corrupt checkpoint is named, with what else is there
    rc, _, err = cli(sft_args(tmp_path, shards, "ck", *keep, f"stage.resume={ckpts / 'last.ckpt.corrupt'}",
                              steps=4), capsys)
    assert rc == 2 and "last.ckpt.corrupt is not a complete torch checkpoint" in err and "Traceback" not in err


def test_no_intact_checkpoint_is_an_error_naming_the_file(tmp_path, shards, capsys):
    ckpts = tmp_path / "runs" / "none" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"PK\x03\x04cut")
    rc, _, err = cli(sft_args(tmp_path, shards, "none"), capsys)
    assert rc == 2 and str(ckpts / "last.ckpt") in err and "stage.resume=PATH" in err


# ---------------------------------------------------------------------------------------------- 8. csv
class _KillAfterCheckpoint(Checkpoint):
    """Stands for a kill landing right after the periodic checkpoint of step 2 is written (Lightning runs
    Checkpoint callbacks last, in the order given: after the run's own ModelCheckpoint)."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 2:
            raise KeyboardInterrupt


def test_csv_row_of_a_checkpointed_step_survives_a_kill(tmp_path, shards):
    from urt.config import compose_config
    from urt.train import train

    args = sft_args(tmp_path, shards, "csv", "stage.checkpoint.every_n_steps=1", "trainer.log_every_n_steps=1",
                    steps=2)[1:]
    with pytest.raises(BaseException):
        train(compose_config(args), callbacks=[_KillAfterCheckpoint()])
    ckpt = tmp_path / "runs" / "csv" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    train(compose_config(args[:-1] + ["trainer.max_steps=3"]))
    rows = list(csv.DictReader((tmp_path / "runs" / "csv" / "csv" / "metrics.csv").open()))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert sorted(steps) == [0, 1, 2], steps  # none missing (and here none repeated: the kill came after the row)


# ---------------------------------------------------------------------------------------------- 9. config
@pytest.mark.parametrize("override,expect", [
    ("data.batch_size=0", "batch_size must be >= 1"),
    ("trainer.max_steps=abc", "trainer.max_steps='abc'"),
    ("+stage.betaa=0.1", "stage.betaa is not a setting of SFTModule"),
    ("data.order=sideways", "order must be one of"),
    ("trainer.precision=17", "trainer config"),
    ("stage.checkpoint.keep=2", "stage.checkpoint="),
])
def test_config_errors_are_named_before_the_model_loads(tmp_path, shards, capsys, monkeypatch, override, expect):
    """#31.9: a `urt: error:` line naming the key, before any model is loaded (load_model would fail)."""
    import urt.models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(urt.models, "load_model", no_model)
    args = sft_args(tmp_path, shards, "cfg")
    args = [a for a in args if not a.startswith(override.split("=")[0].lstrip("+") + "=")] + [override]
    rc, _, err = cli(args, capsys)
    assert rc == 2 and err.startswith("urt: error:") and expect in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU case")
def test_gpu_trainer_without_a_gpu_is_an_error(tmp_path, shards, capsys):
    rc, _, err = cli(sft_args(tmp_path, shards, "gpu") + ["trainer=gpu"], capsys)
    assert rc == 2 and "no usable CUDA GPU" in err and "trainer=cpu" in err


def test_unwritable_run_folder_is_an_error_before_training(tmp_path, shards, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the runs folder should be")
    rc, _, err = cli(sft_args(tmp_path, shards, "ro") + [f"paths.root={blocker}"], capsys)
    assert rc == 2 and "cannot create the run folder" in err and str(blocker) in err


@pytest.mark.skipif(sys.platform == "win32" or __import__("os").geteuid() == 0, reason="root writes anywhere")
def test_read_only_run_folder_is_an_error_before_training(tmp_path, shards, capsys):
    run = tmp_path / "runs" / "ro"
    run.mkdir(parents=True)
    run.chmod(0o555)
    try:
        rc, _, err = cli(sft_args(tmp_path, shards, "ro"), capsys)
    finally:
        run.chmod(0o755)
    assert rc == 2 and f"cannot write in {run}" in err


# ---------------------------------------------------------------------------------------------- 10. export
def test_export_carries_the_training_pixel_budget_and_frames(tmp_path, shards, capsys):
    """#31.10: the processor in hf/final resizes as training did (data.min_pixels above the processor's
    own minimum: a small image is brought up to the trained size), and urt.json records the frames."""
    from transformers import AutoProcessor

    from urt.models.preprocessing import exported_frames

    rc, _, _ = cli(sft_args(tmp_path, shards, "pre", "data.min_pixels=12544", "data.max_pixels=12544",
                            "data.video_max_pixels=7056", "data.frames=4"), capsys)
    assert rc == 0
    final = tmp_path / "runs" / "pre" / "hf" / "final"
    proc = AutoProcessor.from_pretrained(final)
    assert proc.image_processor.size["shortest_edge"] == 12544 and proc.image_processor.size["longest_edge"] == 12544
    assert proc.video_processor.size["longest_edge"] == 7056
    small = vqa_image(0).resize((64, 64))
    grid = proc.image_processor(images=[small], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert grid[1] * grid[2] * 14 * 14 == 12544  # 64 px -> 112 px, as the training images were
    assert exported_frames(str(final)) == 4
    from urt.judge import Judge

    judge = Judge(str(final))
    assert judge.frames == 4
    enc = judge.encoder(Sample("s", "image_generation", 1, [small, small], caption="c"))
    assert [g[1] * g[2] * 14 * 14 for g in enc.visual["image_grid_thw"].tolist()] == [12544, 12544]


def test_demo_pixel_budget_is_the_size_its_shards_hold():
    """#31.10: the demo trains on shards already resized to image_size / video_size; its data budget is
    exactly those sizes, so the exported judge brings a raw 64-px easy-vqa image to the 112 px it learnt."""
    from urt.config import compose_config

    cfg = compose_config(["+demo=default"])
    opts = cfg.pipeline.steps.data.options
    assert cfg.data.min_pixels == cfg.data.max_pixels == opts.image_size ** 2
    assert cfg.data.video_min_pixels == cfg.data.video_max_pixels == opts.video_size ** 2
