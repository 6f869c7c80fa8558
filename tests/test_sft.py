"""SFT stage: the shipped experiments run (tiny models swapped in), the loss is assistant-only and
decreases, a stopped-and-resumed run reproduces the uninterrupted one step for step, and the HF folder
loads in plain transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from data_fixtures import vqa_image, vqa_question
from urt.data.schema import Sample
from urt.data.shards import write_shards

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix(""))
                     for p in (CONF / "experiment").rglob("*.yaml"))
TINY = {"llava_ov_7b": "tiny_llava_onevision", "qwen2_5_vl_7b": "tiny_qwen2_5_vl", "qwen3_vl": "tiny_qwen3_vl",
        "qwen3_5": "tiny_qwen3_5"}


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one thread beats two on 2 cores


def exp(name: str) -> str:
    return f"experiment={name}"  # the root defaults list has an experiment slot


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 image-generation pairs with CoTs + 2 image-understanding ones, in 2 shards (with index.json)."""
    d = tmp_path_factory.mktemp("sft_shards")
    out = []
    for j in range(6):
        lab = 1 + j % 2
        out.append(Sample(f"ig-{j}", "image_generation", lab, [vqa_image(2 * j + 1), vqa_image(2 * j + 2)],
                          caption=f"picture {j}", source="fixture",
                          cot=f"<think>Image 1: {j}/10</think>\n<answer>Image {lab} is better</answer>"))
    for j in range(2):
        q, a, img = vqa_question(j)
        out.append(Sample(f"iu-{j}", "image_understanding", 1, [img], question=q, answers=(a, "no"),
                          cot="<think>ok</think>\n<answer>Answer 1 is better</answer>", source="fixture"))
    write_shards(out, d, maxcount=4)
    return str(d)


def _cfg(overrides, tmp_path, shards, steps=2):
    from urt.config import compose_config

    base = ["trainer=cpu", "logger=csv", f"paths.root={tmp_path}", f"data.train_shards={shards}",
            f"data.val_shards={shards}", "data.num_workers=0", "data.batch_size=2", "data.max_length=4096",
            "data.min_pixels=null", "data.max_pixels=12544", "data.shuffle_buffer=4", "data.on_error=raise",
            "stage.effective_batch_size=null", f"trainer.max_steps={steps}", "trainer.limit_val_batches=1",
            "stage.checkpoint.every_n_steps=null", "stage.gen_eval.every_n_epochs=0",
            "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null"]
    return compose_config(base + list(overrides))


class LossRecorder(Callback):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


# Folders holding a family's stage experiments (the size folders, e.g. paper/qwen3_vl_8b, hold pipelines only)
FAMILIES = sorted(p.parent.name for p in (CONF / "experiment" / "paper").glob("*/cold_start.yaml"))
# What each experiment file is covered by: the SFT stages here, GRPO in tests/test_grpo.py, pipelines, their
# ablations and the steps only pipelines use (rs_sample, grpo_unified, grpo_direct) in tests/test_pipeline.py.
PIPELINE_ONLY = ("pipeline", "rs_sample", "no_cold_start", "no_rejection_sampling", "grpo_no_cot", "cold_start_only",
                 "grpo_unified", "grpo_direct")


def test_every_experiment_is_covered():
    assert set(FAMILIES) == set(TINY)
    for e in EXPERIMENTS:
        name = e.split("/")[-1]
        assert e.startswith("paper/") and (name in PIPELINE_ONLY or name in ("cold_start", "rejection_sampling",
                                                                            "grpo")), e
    for f in FAMILIES:
        for stage in ("cold_start", "rejection_sampling", "grpo"):
            assert f"paper/{f}/{stage}" in EXPERIMENTS


@pytest.mark.parametrize("family_dir", FAMILIES)
def test_paper_pipeline_runs_with_the_tiny_model(family_dir, tmp_path, shards):
    """cold_start, then rejection_sampling from the cold start's HF folder (as shipped: only the model is
    swapped for the tiny one of the same family, the data for the fixture shards, and the run shortened)."""
    from urt.config import compose_config
    from urt.train import train

    for stage in ("cold_start", "rejection_sampling"):
        experiment = f"paper/{family_dir}/{stage}"
        paper = compose_config([exp(experiment)])
        assert paper.optimizer.lr == 2.5e-6 and paper.optimizer.weight_decay == 0.0
        assert paper.scheduler.warmup_ratio == 0.03 and paper.stage.effective_batch_size == 128
        # bf16 compute: the sharded strategy's param_dtype (trainer=fsdp; fp32 master shards, fp32 reduction)
        assert paper.trainer.max_epochs == 3 and paper.trainer.precision == "32-true"
        assert paper.trainer.strategy.param_dtype == "bf16" and paper.trainer.strategy.reduce_dtype == "fp32"
        assert paper.data.max_length == 13000 and paper.data.target == "cot" and paper.data.order == "keep"
        assert paper.model.gradient_checkpointing and paper.model.freeze_vision and paper.model.freeze_projector
        if stage == "cold_start":
            assert list(paper.data.tasks) == ["image_generation"]
            assert str(paper.data.train_shards).endswith("ImageGen-CoT-Reward-5K/train")
        else:
            assert paper.data.tasks is None
            assert paper.model.name_or_path.endswith(f"cold_start_{family_dir}/hf/final")
            assert str(paper.data.train_shards).endswith(f"rejection_sampling/{paper.model.family}/sft")

        cfg = _cfg([exp(experiment), f"model={TINY[family_dir]}"], tmp_path, shards)
        if stage == "rejection_sampling":  # starts from the tiny cold start just written
            assert Path(cfg.model.name_or_path) == tmp_path / "runs" / f"cold_start_{family_dir}" / "hf" / "final"
        rec = LossRecorder()
        hf = train(cfg, callbacks=[rec])
        run = Path(cfg.stage.run_dir)
        assert hf == run.resolve() / "hf" / "final" and (hf / "config.json").is_file()
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
        assert sorted(rec.losses) == [1, 2] and all(v == v and v > 0 for v in rec.losses.values())
        metrics = (run / "csv" / "metrics.csv").read_text()
        for key in ("train/loss", "train/lr", "train/tokens_per_s", "val/loss"):
            assert key in metrics, (key, metrics)


def _batch(shards, collate="padded", target="answer"):
    from urt.data.datamodule import RewardDataModule
    from urt.models import load_model

    bundle = load_model("tiny", "qwen2_5_vl")
    dm = RewardDataModule(train_shards=[shards], bundle=bundle, batch_size=3, target=target, order="keep",
                          tasks=["image_generation"], shuffle=False, max_length=4096, max_pixels=12544,
                          collate=collate, max_tokens_per_batch=8000 if collate == "packed" else None)
    return bundle, next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("collate", ["padded", "packed"])
def test_loss_is_token_mean_ce_over_assistant_tokens(shards, collate):
    from urt.data.collate import model_inputs
    from urt.stages.sft import SFTModule

    bundle, batch = _batch(shards, collate, target="cot")
    module = SFTModule(bundle)
    # only the supervised positions are projected (transformers >= 5.24; 5.17's boolean logits_to_keep
    # raises in Qwen2.5-VL, so there the loss takes the full logits: the same value)
    import transformers
    from packaging.version import Version

    assert module.selected_logits is (Version(transformers.__version__) >= Version("5.24"))
    with torch.no_grad():
        loss, n = module(batch)
        logits = bundle.model(**model_inputs(batch), use_cache=False).logits
    labels = batch["labels"]
    # By hand: position t predicts labels[t+1], only where that label is supervised.
    tot, cnt = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != -100:
                tot += float(-torch.log_softmax(logits[b, t].double(), -1)[y])
                cnt += 1
    assert int(n) == cnt == sum(int((labels[b] != -100).sum()) for b in range(labels.shape[0]))
    assert float(loss) == pytest.approx(tot / cnt, rel=1e-5)
    if collate == "packed":
        assert labels.shape[0] == 1
        starts = [0] + list(torch.tensor(batch["seq_lens"]).cumsum(0)[:-1])
        assert all(int(labels[0, s]) == -100 for s in starts)  # no prediction across a sample boundary
    # The full-logits path and the model's own loss agree.
    module.selected_logits = False
    with torch.no_grad():
        assert float(module(batch)[0]) == pytest.approx(tot / cnt, rel=1e-5)
        if collate == "padded":
            hf = bundle.model(**model_inputs(batch, labels=True), use_cache=False).loss
            assert float(hf) == pytest.approx(tot / cnt, rel=1e-5)
    # Changing only the supervised targets changes the loss; prompt-only label changes do not exist.
    other = dict(batch, labels=torch.where(labels != -100, (labels + 1) % logits.shape[-1], labels))
    with torch.no_grad():
        assert float(module(other)[0]) != pytest.approx(float(loss), rel=1e-3)


def test_loss_decreases_overfitting_one_batch(shards):
    from urt.stages.sft import SFTModule

    torch.manual_seed(0)
    bundle, batch = _batch(shards, target="answer")
    module = SFTModule(bundle)
    opt = torch.optim.AdamW([p for p in bundle.model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(20):
        loss, _ = module(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_cosine_schedule_shape():
    from urt.stages.sft import cosine_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = cosine_with_warmup(opt, num_training_steps=100, warmup_ratio=0.03)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(1.0) and lrs[1] == pytest.approx(1 / 3)
    assert lrs[51] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


@pytest.mark.parametrize("every", [2, None], ids=["periodic_ckpt", "end_of_fit_ckpt"])
def test_exact_resume_matches_uninterrupted_run(tmp_path, shards, every):
    """Stop at step 2, resume to step 5 (across a data-epoch boundary: 4 batches per pass): the same
    per-step losses as one 5-step run (fp32, CPU, deterministic). The schedule spans 5 steps in both."""
    from urt.train import train

    common = ["model=tiny_qwen2_5_vl", "data.target=answer", "data.order=random", "optimizer.lr=1e-3",
              "stage.total_steps=5", "scheduler.warmup_ratio=0.2", "data.shuffle_buffer=4",
              f"stage.checkpoint.every_n_steps={every if every else 'null'}", "trainer.limit_val_batches=0"]
    full = LossRecorder()
    train(_cfg(common + ["stage.run_name=full"], tmp_path, shards, steps=5), callbacks=[full])
    first, second = LossRecorder(), LossRecorder()
    train(_cfg(common + ["stage.run_name=split"], tmp_path, shards, steps=2), callbacks=[first])
    ckpt = tmp_path / "runs" / "split" / "checkpoints" / "last.ckpt"
    assert ckpt.exists() and torch.load(ckpt, weights_only=False)["global_step"] == 2
    train(_cfg(common + ["stage.run_name=split"], tmp_path, shards, steps=5), callbacks=[second])
    assert sorted(full.losses) == [1, 2, 3, 4, 5]
    assert sorted(first.losses) == [1, 2] and sorted(second.losses) == [3, 4, 5]
    resumed = {**first.losses, **second.losses}
    for step in full.losses:
        assert resumed[step] == pytest.approx(full.losses[step], rel=1e-5), (step, resumed, full.losses)
    # The CSV log of the resumed run continues the same file.
    import csv

    rows = list(csv.DictReader((tmp_path / "runs" / "split" / "csv" / "metrics.csv").open()))
    assert sorted({int(r["step"]) for r in rows if r.get("train/loss")}) == [0, 1, 2, 3, 4]


def test_resume_never_refuses_to_overwrite(tmp_path, shards):
    from urt.errors import UrtError
    from urt.stages.run import resume_path

    cfg = _cfg(["model=tiny_qwen2_5_vl", "stage.run_name=r", "stage.resume=never"], tmp_path, shards)
    assert resume_path(cfg) is None
    (Path(cfg.stage.run_dir) / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 0}, Path(cfg.stage.run_dir) / "checkpoints" / "last.ckpt")
    with pytest.raises(UrtError, match="resume=never"):
        resume_path(cfg)
    cfg.stage.resume = "auto"
    assert resume_path(cfg).endswith("last.ckpt")


def test_hf_folder_loads_in_plain_transformers(tmp_path, shards):
    from urt.train import train

    cfg = _cfg(["model=tiny_qwen2_5_vl", "data.target=answer", "stage.run_name=hf", "optimizer.lr=1e-3",
                "scheduler=constant", "trainer.limit_val_batches=0", "stage.hf.every_n_steps=1",
                "trainer.accumulate_grad_batches=2"], tmp_path, shards, steps=1)
    hf = train(cfg)
    assert (hf.parent / "step-000001" / "config.json").is_file()
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(hf)!r})\n"
        f"p = AutoProcessor.from_pretrained({str(hf)!r})\n"
        "assert 'urt' not in sys.modules\n"
        "print(json.dumps({'cls': type(m).__name__, 'sum': float(sum(x.double().sum() for x in m.parameters())),"
        " 'tok': type(p.tokenizer).__name__}))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["cls"].startswith("Qwen2_5_VL")
    # The trained weights, not the initial ones: compare with the last Lightning checkpoint.
    state = torch.load(Path(cfg.stage.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert out["sum"] == pytest.approx(float(sum(v.double().sum() for v in state.values()
                                                 if v.is_floating_point())), rel=1e-6)


def test_cli_train_prints_run_dir_and_hf_folder(tmp_path, shards, capsys, monkeypatch):
    import argparse

    from urt.stages import cli as train_cli

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    over = ["model=tiny_qwen2_5_vl", "data.target=answer", "stage.run_name=cli", f"paths.root={tmp_path}",
            f"data.train_shards={shards}", "data.val_shards=null", "data.num_workers=0", "data.batch_size=2",
            "data.max_pixels=12544", "trainer=cpu", "trainer.max_steps=1", "stage.gen_eval.every_n_epochs=0"]
    args = parser.parse_args(["train", *over])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "cli"
    assert f"run dir: {run.resolve()}" in out and f"hf folder: {run.resolve() / 'hf' / 'final'}" in out


def test_generation_eval_logs_accuracy_and_format_rate(tmp_path, shards):
    from urt.train import train

    cfg = _cfg(["model=tiny_qwen2_5_vl", "data.target=answer", "stage.run_name=gen", "data.val_order=keep",
                "stage.gen_eval.every_n_epochs=1", "stage.gen_eval.max_samples=2",
                "stage.gen_eval.max_new_tokens=4"], tmp_path, shards)
    train(cfg)
    header = (Path(cfg.stage.run_dir) / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/gen_accuracy" in header and "val/gen_format_rate" in header


def test_schedule_length_from_the_shard_index(shards):
    from urt.data.datamodule import RewardDataModule
    from urt.stages.base import num_batches

    assert num_batches(RewardDataModule(train_shards=[shards], batch_size=2, order="keep")) == 4
    assert num_batches(RewardDataModule(train_shards=[shards], batch_size=2, order="both")) == 8
    assert num_batches(RewardDataModule(train_shards=[shards], batch_size=4, tasks=["image_generation"])) == 2


def test_lora_with_gradient_checkpointing_trains_and_exports_merged(tmp_path, shards):
    """LoRA adapters on the language model (+ gradient checkpointing) train, and the exported folder is
    a plain, merged transformers checkpoint whose weights moved away from the base."""
    from urt.models import load_model
    from urt.train import train

    cfg = _cfg(["model=tiny_qwen2_5_vl", "data.target=answer", "stage.run_name=lora", "optimizer.lr=5e-2",
                "model.gradient_checkpointing=true", "+model.lora={r: 4, alpha: 8, dropout: 0.0}"],
               tmp_path, shards, steps=3)
    hf = train(cfg)
    base = load_model("tiny", "qwen2_5_vl").model.state_dict()
    code = (
        "import sys, torch; from transformers import AutoModelForImageTextToText as M;"
        "m = M.from_pretrained(sys.argv[1]); sd = m.state_dict();"
        "assert not any('lora' in k for k in sd), 'adapters were not merged';"
        "torch.save({k: v for k, v in sd.items() if 'q_proj.weight' in k}, sys.argv[2])"
    )
    out = tmp_path / "q.pt"
    subprocess.run([sys.executable, "-c", code, str(hf), str(out)], check=True, env={**os.environ, "PYTHONPATH": ""})
    q = torch.load(out)
    moved = [k for k, v in q.items() if "language_model" in k and not torch.equal(v, base[k])]
    assert moved, "LoRA training left the language model's q_proj unchanged"
