"""Stages 1–2 end to end from the command line, as a user runs them on a tiny model:
urt distill (rule teacher) → urt train (cold start) → urt sample (rejection sampling) → urt train (stage 2).

The cold start overfits four image-generation pairs so that rejection sampling finds correct traces;
each command reads what the previous one wrote, through the paper experiments' own paths."""

import json

import pytest

from data_fixtures import vqa_image
from urt.cli import main
from urt.data.schema import Sample
from urt.data.shards import read_shards, write_shards
from urt.prompts import answer_string, parse_output

pytestmark = pytest.mark.slow


def test_distill_cold_start_sample_stage2(tmp_path, monkeypatch, capsys, torch_one_thread):
    monkeypatch.setenv("URT_ROOT", str(tmp_path))
    pairs = [
        Sample(f"ig-{j}", "image_generation", 1 + j % 2, [vqa_image(2 * j + 1), vqa_image(2 * j + 2)],
               caption=f"a shape number {j}")
        for j in range(4)
    ]
    write_shards(pairs, tmp_path / "raw")
    cold_data = tmp_path / "data" / "ImageGen-CoT-Reward-5K" / "train"  # where the experiment reads
    train_common = ["trainer=cpu", "stage.effective_batch_size=null", "model.gradient_checkpointing=false"]

    assert main(["distill", "--shards", str(tmp_path / "raw"), "--out", str(cold_data), "--teacher", "rule",
                 "--no-progress"]) == 0
    distilled = list(read_shards(cold_data))
    assert [s.key for s in distilled] == [p.key for p in pairs]
    assert all(parse_output(s.cot, s.task).winner == s.label for s in distilled)

    assert main(["train", "experiment=paper/qwen2_5_vl_7b/cold_start", "model=tiny_qwen2_5_vl", *train_common,
                 "trainer.max_steps=100", "trainer.max_epochs=1000", "data.batch_size=4", "optimizer.lr=3e-3",
                 "scheduler=constant"]) == 0
    cold = tmp_path / "runs" / "cold_start_qwen2_5_vl_7b" / "hf" / "final"
    assert (cold / "config.json").is_file()

    assert main(["sample", "--quiet", "model=tiny_qwen2_5_vl", f"model.name_or_path={cold}",
                 f"sample.shards={tmp_path / 'raw'}", "sample.k=2", "sample.temperature=0.3",
                 "sample.max_new_tokens=300"]) == 0
    rs = tmp_path / "data" / "rejection_sampling" / "qwen2_5_vl"
    summary = json.loads((rs / "summary.json").read_text())
    assert summary["total"]["pairs"] == 4
    sft = list(read_shards(rs / "sft"))
    grpo = list(read_shards(rs / "grpo"))
    # every pair lands on exactly one side; the overfit cold start gets most of them right
    assert sorted(s.key for s in sft + grpo) == sorted(p.key for p in pairs)
    assert len(sft) >= 2
    for s in sft:
        j = parse_output(s.cot, s.task)
        assert j.format_ok and j.answer == answer_string(s.task, s.label)

    capsys.readouterr()
    assert main(["train", "experiment=paper/qwen2_5_vl_7b/rejection_sampling", *train_common,
                 "trainer.max_steps=3", "data.batch_size=2"]) == 0
    out = capsys.readouterr().out
    stage2 = tmp_path / "runs" / "rejection_sampling_qwen2_5_vl_7b"
    assert str(stage2 / "hf" / "final") in out
    # stage 2 started from the cold-start weights (the experiment's model path), not the tiny init
    config = json.loads((stage2 / "hf" / "final" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert (stage2 / "checkpoints" / "last.ckpt").is_file()
