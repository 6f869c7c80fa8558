"""GRPO stage (urt.stages.grpo): a step runs end to end and writes its rollout table; the advantages of
known rewards are group_advantages' exactly; packed log-probs equal padded ones; beta=0 builds no
reference model; a stopped-and-resumed run repeats the uninterrupted one; the paper experiment runs with
the tiny model swapped in."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from data_fixtures import vqa_image
from grpo_fixtures import grpo_cfg, write_grpo_prompts
from urt.data.schema import Sample

CONF = Path(__file__).resolve().parents[1] / "conf"
COLUMNS = {"step", "prompt_key", "group", "sample", "task", "label", "prompt", "completion", "reward_format",
           "reward_accuracy", "reward", "advantage", "completion_length"}


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one thread beats two on 2 cores


def exp(name: str) -> str:
    return f"experiment={name}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 image-generation prompts (labels 1/2, no CoTs: GRPO needs none), 2 shards with index.json."""
    return write_grpo_prompts(tmp_path_factory.mktemp("grpo_shards"))


def _cfg(tmp_path, shards, *overrides, steps=1):
    return grpo_cfg(tmp_path, shards, *overrides, steps=steps)


class Recorder(Callback):
    def __init__(self):
        self.losses: dict[int, float] = {}
        self.module = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.module = pl_module
        self.losses[pl_module.rollout_step] = float(outputs["loss"])


def _rollouts(run: Path, step: int):
    return pq.read_table(run / "rollouts" / f"step-{step:06d}.parquet").to_pydict()


def test_one_step_end_to_end(tmp_path, shards):
    import csv

    from urt.train import train

    cfg = _cfg(tmp_path, shards, "stage.loss.beta=0.04", "stage.run_name=e2e")
    rec = Recorder()
    hf = train(cfg, callbacks=[rec])
    run = Path(cfg.stage.run_dir)
    assert (hf / "config.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert rec.module.ref_model is not None  # beta != 0: a frozen reference copy
    assert not any(k.startswith("ref_model") for k in rec.module.state_dict())  # never checkpointed
    df = _rollouts(run, 1)
    assert len(df["step"]) == 2 * 3 and COLUMNS <= set(df)
    assert set(df["step"]) == {1} and sorted(df["sample"]) == [0, 0, 1, 1, 2, 2]
    assert all("picture" in p and "image_pad" not in p for p in df["prompt"])
    assert all(1 <= n <= 8 for n in df["completion_length"])
    assert df["reward"] == [f + a for f, a in zip(df["reward_format"], df["reward_accuracy"])]
    with open(next(run.glob("csv/**/metrics.csv"))) as f:
        columns = set(csv.DictReader(f).fieldnames)
    for k in ("completion_length", "rewards/format", "rewards/accuracy", "reward", "reward_std", "kl",
              "all_wrong", "all_correct", "clip_fraction", "entropy", "tokens_per_s", "loss"):
        assert f"train/{k}" in columns, k
    for k in ("generate", "score", "update"):
        assert f"time/{k}" in columns


def test_canned_completions_give_exact_advantages(tmp_path, shards, monkeypatch):
    """beta=0: no reference model; the parquet's rewards/advantages are group_advantages of the known
    rewards; the step's loss equals policy_loss recomputed (paper: -mean advantage at ratio 1)."""
    import urt.generation
    from urt.prompts import answer_string
    from urt.rl.objective import group_advantages
    from urt.train import train

    def canned(bundle, prompts, cfg, **kw):
        out = []
        for p in prompts:
            ans = answer_string(p.task, int(p.label))
            out.append([f"<think>ok</think><answer>{ans}</answer>", "<think>ok</think><answer>nope</answer>",
                        "no format", f"<think>x</think> <answer>{ans}</answer> trailing"][: cfg.num_return_sequences])
        return out

    monkeypatch.setattr(urt.generation, "generate", canned)
    cfg = _cfg(tmp_path, shards, "stage.loss.beta=0", "stage.num_generations=4", "stage.run_name=canned",
               "stage.advantage=paper")
    rec = Recorder()
    train(cfg, callbacks=[rec])
    assert rec.module.ref_model is None
    df = _rollouts(Path(cfg.stage.run_dir), 1)
    assert df["reward"] == [2.0, 1.0, 0.0, 2.0] * 2
    expect = group_advantages(torch.tensor(df["reward"]), 4, "paper")
    assert torch.equal(torch.tensor(df["advantage"], dtype=torch.float32), expect)
    # beta=0, one update: per-token loss -A, paper aggregation -> -mean over sequences of A
    assert rec.losses[1] == pytest.approx(float(-expect.mean()), abs=1e-6)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "qwen3_5"])
def test_packed_logprobs_equal_padded(family):
    """Packed (padding-free, per-sequence mRoPE positions) and right-padded log-prob passes agree."""
    from urt.data.collate import make_collator
    from urt.data.encode import SampleEncoder
    from urt.models import load_model
    from urt.rl.logprobs import completion_sequence, sequence_logprobs

    torch.manual_seed(0)
    bundle = load_model("tiny", family=family)
    enc = SampleEncoder(bundle.processor, family, mode="prompt")
    prompts = [enc(Sample(f"s{j}", "image_generation", 1, [vqa_image(j), vqa_image(j + 1)], caption=f"cap {j}",
                          source="x")) for j in range(2)]
    seqs = [completion_sequence(prompts[i // 2], torch.randint(10, 400, (3 + 2 * i,)).tolist(), i % 2)
            for i in range(4)]
    model = bundle.model.eval()
    assert type(make_collator("packed", bundle)).__name__ == "PackedCollator"
    with torch.no_grad():
        packed, ent = sequence_logprobs(model, make_collator("packed", bundle), seqs, entropy=True)
        padded, _ = sequence_logprobs(model, make_collator("padded", bundle), seqs)
    assert [len(x) for x in packed] == [3, 5, 7, 9] and all(len(e) == len(x) for e, x in zip(ent, packed))
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _vowel_reward(completion, solution=None, **kwargs):
    """A dense test reward (share of vowels): a random tiny model scores 0 on the paper's rewards, so
    every advantage, gradient and KL would be 0 and a resume test would compare nothing."""
    return sum(c in "aeiou" for c in completion) / max(1, len(completion))


def _with_weights(cfg, weights):
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.reward = {"weights": weights}
    return cfg


def test_resume_is_exact(tmp_path, shards):
    """3 steps straight == 1 step, stop, resume for 2 (losses, KL, completions, rewards, per step)."""
    import csv

    from urt.rewards import register_reward
    from urt.train import train

    register_reward("test_vowels", override=True)(_vowel_reward)
    w = {"test_vowels": 1.0}
    straight = Recorder()
    cfg = _with_weights(_cfg(tmp_path, shards, "stage.run_name=straight", steps=3), w)
    train(cfg, callbacks=[straight])
    first, second = Recorder(), Recorder()
    train(_with_weights(_cfg(tmp_path, shards, "stage.run_name=resumed", steps=1), w), callbacks=[first])
    cfg2 = _with_weights(_cfg(tmp_path, shards, "stage.run_name=resumed", steps=3), w)
    train(cfg2, callbacks=[second])
    assert sorted(straight.losses) == [1, 2, 3] and sorted(first.losses) == [1] and sorted(second.losses) == [2, 3]
    resumed = {**first.losses, **second.losses}
    for k in (1, 2, 3):
        assert resumed[k] == pytest.approx(straight.losses[k], abs=1e-7), k
        a, b = _rollouts(Path(cfg.stage.run_dir), k), _rollouts(Path(cfg2.stage.run_dir), k)
        assert a["completion"] == b["completion"] and a["prompt_key"] == b["prompt_key"]
        assert a["reward"] == b["reward"] and a["advantage"] == b["advantage"]
    # not a trivial comparison: the advantages are non-zero and the policy moved away from the reference
    assert any(abs(x) > 0.1 for x in _rollouts(Path(cfg.stage.run_dir), 1)["advantage"])
    with open(next(Path(cfg.stage.run_dir).glob("csv/**/metrics.csv"))) as f:
        kl = [float(r["train/kl"]) for r in csv.DictReader(f) if r.get("train/kl")]
    assert len(kl) == 3 and kl[0] == 0 and kl[2] > 0
    assert straight.losses[3] != 0


TINY = {"qwen2_5_vl_7b": ("tiny_qwen2_5_vl", "qwen2_5_vl"), "llava_ov_7b": ("tiny_llava_onevision", "llava_onevision"),
        "qwen3_vl": ("tiny_qwen3_vl", "qwen3_vl"), "qwen3_5": ("tiny_qwen3_5", "qwen3_5")}


def test_every_grpo_experiment_is_covered():
    shipped = sorted(p.parent.name for p in (CONF / "experiment").rglob("grpo.yaml"))
    assert shipped == sorted(TINY)


@pytest.mark.parametrize("family_dir", ["qwen3_vl", "qwen3_5"])
def test_qwen3_grpo_experiments_keep_the_qwen_recipe(family_dir):
    from urt.config import compose_config

    cfg = compose_config([exp(f"paper/{family_dir}/grpo")])
    st = cfg.stage
    assert (st.num_generations, st.loss.beta, st.loss.kl_estimator, st.top_p, st.max_new_tokens) == (8, 0.04, "k3", 0.95, 4096)
    assert cfg.optimizer.lr == 1e-6 and cfg.model.family == TINY[family_dir][1]
    assert cfg.model.name_or_path.endswith(f"rejection_sampling_{family_dir}/hf/final")
    tiny = compose_config([exp(f"paper/{family_dir}/grpo"), f"model={TINY[family_dir][0]}"])
    assert tiny.model.name_or_path.endswith(f"rejection_sampling_{family_dir}/hf/final")  # only the model swaps


def test_paper_experiment_runs_with_tiny_model(tmp_path, shards):
    from urt.config import compose_config
    from urt.train import train

    paper = compose_config([exp("paper/qwen2_5_vl_7b/grpo")])
    st = paper.stage
    assert (st.name, st.num_generations, st.loss.beta, st.loss.kl_estimator, st.temperature, st.top_p) == \
        ("grpo", 8, 0.04, "k3", 1.0, 0.95)
    assert (st.max_new_tokens, st.num_iterations, st.advantage, st.loss.aggregation) == (4096, 1, "paper", "paper")
    assert (st.loss.epsilon_low, st.loss.epsilon_high, st.filter_zero_variance) == (0.2, 0.2, False)
    assert paper.optimizer.lr == 1e-6 and paper.data.mode == "prompt"
    assert paper.model.name_or_path.endswith("rejection_sampling_qwen2_5_vl_7b/hf/final")
    assert str(paper.data.train_shards).endswith("rejection_sampling/qwen2_5_vl/grpo")
    llava = compose_config([exp("paper/llava_ov_7b/grpo")]).stage
    assert (llava.max_new_tokens, llava.top_p) == (2048, 1.0)

    cfg = _cfg(tmp_path, shards, exp("paper/qwen2_5_vl_7b/grpo"), "model=tiny_qwen2_5_vl", "trainer=cpu",
               "stage.num_generations=2", "stage.max_new_tokens=8", "data.batch_size=2", "stage.micro_batch_size=4",
               "scheduler=constant", steps=2)
    start = Path(cfg.model.name_or_path)  # the stage-2 HF folder: here a saved tiny model
    assert start == tmp_path / "runs" / "rejection_sampling_qwen2_5_vl_7b" / "hf" / "final"
    from urt.models import load_model, save_pretrained

    save_pretrained(load_model("tiny", family="qwen2_5_vl"), start)
    rec = Recorder()
    hf = train(cfg, callbacks=[rec])
    assert (hf / "config.json").is_file() and sorted(rec.losses) == [1, 2]
    assert rec.module.ref_model is not None and rec.module.G == 2
    assert len(_rollouts(Path(cfg.stage.run_dir), 2)["completion"]) == 4


class GradCapture(Callback):
    """The prompts of the first batch and the gradients the first optimizer step applies."""

    def __init__(self):
        self.prompts, self.grads = None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.prompts is None:
            self.prompts = list(batch["prompts"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()
                          if p.requires_grad and p.grad is not None}


def test_step_gradient_equals_policy_loss_recomputed(tmp_path, shards, monkeypatch):
    """The gradient of a training step (canned completions, beta=0, no clipping) equals the gradient of
    policy_loss over log-probs recomputed naively (full logits, right padding) from the same weights."""
    import urt.generation
    from urt.data.collate import make_collator, model_inputs
    from urt.generation import stop_token_ids
    from urt.models import load_model
    from urt.prompts import answer_string
    from urt.rewards import score
    from urt.rl.objective import completion_mask, group_advantages, policy_loss
    from urt.rl.logprobs import completion_sequence, text_completion_ids
    from urt.train import train

    def canned(bundle, prompts, cfg, **kw):
        return [[f"<think>a</think><answer>{answer_string(p.task, int(p.label))}</answer>", "<think>b</think>",
                 "plain words here"][: cfg.num_return_sequences] for p in prompts]

    monkeypatch.setattr(urt.generation, "generate", canned)
    cfg = _cfg(tmp_path, shards, "stage.loss.beta=0", "stage.run_name=grad", "stage.max_grad_norm=null",
               "stage.micro_batch_size=2")  # 6 sequences in 3 accumulated micro-batches
    cap = GradCapture()
    train(cfg, callbacks=[cap])

    bundle = load_model("tiny", family="qwen2_5_vl")  # the same starting weights
    texts = [t for g in canned(bundle, cap.prompts, urt.generation.GenerationConfig(num_return_sequences=3))
             for t in g]
    eos = stop_token_ids(bundle)[0]
    ids = [text_completion_ids(bundle.tokenizer, t, "", eos, 8) for t in texts]
    seqs = [completion_sequence(cap.prompts[i // 3], ids[i], i % 3) for i in range(6)]
    adv = group_advantages(torch.tensor(score(texts, [answer_string(cap.prompts[i // 3].task,
                                                                     int(cap.prompts[i // 3].label))
                                                       for i in range(6)])["reward"]), 3, "paper")
    batch = make_collator("padded", bundle)(seqs)
    logits = bundle.model(**model_inputs(batch), use_cache=False).logits.float()
    logp, mask = torch.zeros(6, 8), torch.zeros(6, 8)
    for i, s in enumerate(seqs):
        n, c = s.prompt_length, len(ids[i])
        lp = logits[i, n - 1:n - 1 + c].log_softmax(-1).gather(-1, torch.tensor(ids[i])[:, None]).squeeze(-1)
        logp[i, :c] = lp
        mask[i, :c] = completion_mask(torch.tensor(ids[i])[None], eos)[0]
    loss, _ = policy_loss(logp, adv, mask, beta=0.0)
    bundle.model.zero_grad()
    loss.backward()
    assert cap.grads
    for name, p in bundle.model.named_parameters():
        if name in cap.grads:
            torch.testing.assert_close(cap.grads[name], p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("variant", [
    ["stage.num_iterations=2", "stage.num_mini_batches=2", "stage.filter_zero_variance=true",
     "stage.loss.aggregation=token", "stage.loss.epsilon_high=0.28", "stage.micro_batch_size=2"],
    ["+model.lora={r: 4, alpha: 8, dropout: 0.0}", "stage.loss.beta=0.04", "stage.collate=padded",
     "stage.loss.aggregation=dr_grpo", "stage.advantage=none"],
], ids=["mu2_minibatches_filter_token", "lora_reference_padded_drgrpo"])
def test_variants_run(tmp_path, shards, variant, monkeypatch):
    """Canned completions: the first prompt's group has distinct rewards, the second's are all 0 (zero
    variance: dropped when the filter is on)."""
    import csv

    import urt.generation
    from urt.prompts import answer_string
    from urt.train import train

    def canned(bundle, prompts, cfg, **kw):
        good = [f"<think>a</think><answer>{answer_string(p.task, int(p.label))}</answer>" for p in prompts]
        return [[good[0], "<think>b</think><answer>x</answer>", "none"]] + [["none"] * 3 for _ in prompts[1:]]

    monkeypatch.setattr(urt.generation, "generate", canned)
    cfg = _cfg(tmp_path, shards, "stage.run_name=variant", *variant)
    rec = Recorder()
    train(cfg, callbacks=[rec])
    lora = any("lora" in v for v in variant)
    if lora:
        assert rec.module.ref_model is None  # LoRA: the base with adapters disabled is the reference
    assert rec.losses[1] == rec.losses[1]  # an update happened (not NaN)
    with open(next(Path(cfg.stage.run_dir).glob("csv/**/metrics.csv"))) as f:
        row = next(csv.DictReader(f))
    assert float(row["train/clip_fraction"]) >= 0 and float(row["train/kl"]) >= 0  # beta 0.04 (stage default)
    df = _rollouts(Path(cfg.stage.run_dir), 1)
    if lora:
        assert float(row["train/filtered_groups"]) == 0 and all(df["kept"])
    else:
        assert float(row["train/filtered_groups"]) == 1 and df["kept"] == [True] * 3 + [False] * 3


def test_llava_paper_experiment_runs_with_tiny_model(tmp_path, shards):
    from urt.models import load_model, save_pretrained
    from urt.train import train

    model, family = TINY["llava_ov_7b"]
    cfg = _cfg(tmp_path, shards, exp("paper/llava_ov_7b/grpo"), f"model={model}", "trainer=cpu",
               "stage.num_generations=2", "stage.max_new_tokens=8", "data.batch_size=2", "stage.micro_batch_size=4",
               "scheduler=constant", steps=1)
    save_pretrained(load_model("tiny", family=family), cfg.model.name_or_path)
    rec = Recorder()
    hf = train(cfg, callbacks=[rec])
    assert (hf / "config.json").is_file() and sorted(rec.losses) == [1]
    assert len(_rollouts(Path(cfg.stage.run_dir), 1)["completion"]) == 4


# ------------------------------------------------------------------------------------------ bad input
def _canned_answers(bundle, prompts, cfg, **kw):
    """Distinct completions per group: 'aaa' / 'bbb' / 'ccc' ... (one per generation)."""
    return [[f"<think>{chr(97 + j) * 3}</think><answer>x</answer>" for j in range(cfg.num_return_sequences)]
            for _ in prompts]


def test_nonfinite_reward_stops_with_checkpoint(tmp_path, shards, monkeypatch):
    import urt.generation
    from urt.errors import UrtError
    from urt.rewards import register_reward
    from urt.train import train

    def nan_on_b(completion, solution=None, **kwargs):
        return float("nan") if "bbb" in completion else 1.0

    register_reward("test_nan_on_b", override=True)(nan_on_b)
    monkeypatch.setattr(urt.generation, "generate", _canned_answers)
    cfg = _with_weights(_cfg(tmp_path, shards, "stage.loss.beta=0", "stage.run_name=nanreward"), {"test_nan_on_b": 1.0})
    seen = Recorder()
    with pytest.raises(UrtError, match=r"step 1\b.*'test_nan_on_b'.*#1'") as err:
        train(cfg, callbacks=[seen])
    assert not seen.losses  # stopped before any update
    msg = str(err.value)
    assert "non-finite" in msg and "ig-" in msg
    ckpts = list((Path(cfg.stage.run_dir) / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in ckpts] == ["failed-step-000001.ckpt"] and str(ckpts[0]) in msg
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    assert "state_dict" in state and state["urt"]["rollout_step"] == 0


def test_nonfinite_loss_stops_with_checkpoint(tmp_path, shards, monkeypatch):
    import urt.generation
    from urt.errors import UrtError
    from urt.rewards import register_reward
    from urt.rl.objective import PolicyLoss
    from urt.train import train

    register_reward("test_vowels", override=True)(_vowel_reward)
    monkeypatch.setattr(urt.generation, "generate", _canned_answers)
    real = PolicyLoss.__call__
    monkeypatch.setattr(PolicyLoss, "__call__",
                        lambda self, *a, **k: (lambda l, m: (l * float("inf"), m))(*real(self, *a, **k)))
    cfg = _with_weights(_cfg(tmp_path, shards, "stage.loss.beta=0", "stage.run_name=nanloss"), {"test_vowels": 1.0})
    with pytest.raises(UrtError, match=r"step 1\b.*loss is non-finite"):
        train(cfg)
    assert (Path(cfg.stage.run_dir) / "checkpoints" / "failed-step-000001.ckpt").is_file()


def test_raising_reward_names_reward_and_sample(tmp_path, shards, monkeypatch):
    import urt.generation
    from urt.errors import UrtError
    from urt.rewards import register_reward
    from urt.train import train

    def boom_on_c(completion, solution=None, **kwargs):
        if "ccc" in completion:
            raise ValueError("cannot parse ccc")
        return 0.5

    register_reward("test_boom", override=True)(boom_on_c)
    monkeypatch.setattr(urt.generation, "generate", _canned_answers)
    cfg = _with_weights(_cfg(tmp_path, shards, "stage.loss.beta=0", "stage.run_name=boom"), {"test_boom": 1.0})
    with pytest.raises(UrtError, match=r"'test_boom'.*'ig-\d+#2'.*cannot parse ccc") as err:
        train(cfg)
    assert isinstance(err.value.__cause__, ValueError)


def test_short_group_uses_valid_completions(tmp_path, shards, monkeypatch):
    """Group 0 gets 2 of 3 completions (advantages over those 2), group 1 just 1 (skipped): both counted
    in train/short_groups; the update still runs on group 0."""
    import csv

    import urt.generation
    from urt.rewards import register_reward
    from urt.rl.objective import group_advantages
    from urt.train import train

    register_reward("test_vowels", override=True)(_vowel_reward)

    def short(bundle, prompts, cfg, **kw):
        full = _canned_answers(bundle, prompts, cfg)
        return [full[0][:2]] + [g[:1] for g in full[1:]]

    monkeypatch.setattr(urt.generation, "generate", short)
    cfg = _with_weights(_cfg(tmp_path, shards, "stage.loss.beta=0", "stage.run_name=short"), {"test_vowels": 1.0})
    rec = Recorder()
    train(cfg, callbacks=[rec])
    assert rec.losses[1] == rec.losses[1]  # an update happened (not NaN)
    df = _rollouts(Path(cfg.stage.run_dir), 1)
    assert df["sample"] == [0, 1, 0] and df["kept"] == [True, True, False]
    expect = group_advantages(torch.tensor(df["reward"][:2]), 2, "paper")
    assert torch.equal(torch.tensor(df["advantage"][:2], dtype=torch.float32), expect) and df["advantage"][2] == 0
    with open(next(Path(cfg.stage.run_dir).glob("csv/**/metrics.csv"))) as f:
        row = next(csv.DictReader(f))
    assert float(row["train/short_groups"]) == 2 and float(row["train/skipped_groups"]) == 1


def test_grouped_advantages_over_valid_slots():
    from urt.rl.objective import group_advantages
    from urt.rl.advantages import grouped_advantages

    r = torch.tensor([1.0, 0.0, 2.0, 5.0, 3.0, 0.0])
    full, zv, ok = grouped_advantages(r, torch.ones(6, dtype=torch.bool), 3, "paper")
    assert torch.equal(full, group_advantages(r, 3, "paper")) and ok.all() and not zv.any()
    valid = torch.tensor([True, False, True, True, True, True])
    for mode in ("paper", "none", "batch"):
        adv, zv, ok = grouped_advantages(r, valid, 3, mode)
        assert adv[1] == 0 and ok.all()
        if mode != "batch":
            assert torch.allclose(adv[[0, 2]], group_advantages(torch.tensor([1.0, 2.0]), 2, mode))
    adv, zv, ok = grouped_advantages(r, torch.tensor([True, False, False, True, True, True]), 3, "paper")
    assert ok.tolist() == [False, True] and adv[:3].eq(0).all()


def test_solution_strings_and_ties():
    from urt.data.encode import Encoded
    from urt.stages.grpo import solution_string

    def enc(label, task="image_generation", ts="paper"):
        ids = torch.tensor([1, 2, 3])
        return Encoded(key="k", task=task, label=label, input_ids=ids, labels=ids.clone(), visual={},
                       mm_token_type_ids=None, prompt_length=3, meta={"template_set": ts})

    assert solution_string(enc(2)) == "Image 2 is better"
    assert solution_string(enc(1, "video_understanding")) == "Answer 1 is better"
    assert solution_string(enc("tie", ts="implicit")) == "Both images are equally good"
    assert solution_string(enc("tie")) is None  # CoT prompts have no tie answer: the prompt is left out
    assert solution_string(enc("tie", "image_understanding", "implicit")) is None


def test_cli_train_stage_grpo_logs_rollouts(tmp_path, shards, capsys):
    """`urt train stage=grpo ...` as users type it: the run writes its rollout table and final HF folder."""
    from urt.cli import main

    args = ["train", "stage=grpo", "trainer=cpu", "logger=csv", "model=tiny_qwen2_5_vl", f"paths.root={tmp_path}",
            f"data.train_shards={shards}", "data.val_shards=null", "data.num_workers=0", "data.batch_size=2",
            "data.min_pixels=null", "data.max_pixels=12544", "trainer.max_steps=1", "stage.num_generations=2",
            "stage.max_new_tokens=8", "stage.run_name=cli_grpo"]
    assert main(args) == 0
    run = tmp_path / "runs" / "cli_grpo"
    table = _rollouts(run, 1)
    assert len(table["completion"]) == 4 and set(table["sample"]) == {0, 1}
    assert {"reward", "advantage", "answer", "truncated", "reward_format", "reward_accuracy"} <= set(table)
    assert (run / "hf" / "final" / "config.json").is_file()
    assert "train/reward" in (run / "csv" / "metrics.csv").read_text()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_trained_logprobs_are_the_samplers(family, monkeypatch):
    """The policy GRPO updates is the policy that sampled: the per-token log-probs of sampled completions
    under the training pass (the stage's auto layout, cached visual features) equal those of the sampler's
    own logits (urt.generation.generate: left-padded batches of image and video prompts, KV cache). A wrong
    position, mask or visual feed in either path breaks this. (The sampler also sets the vision placeholders'
    logits to -inf: its distribution is the trained one renormalised over the other tokens, a shift of
    log(1 - p(placeholders)): ~1e-5 nats for the demo's trained model.)"""
    from urt.data.encode import SampleEncoder
    from urt.generation import GenerationConfig, generate, stop_token_ids, vision_token_ids
    from urt.models import load_model
    from urt.rl.shared_prompt import make_logprob_collator
    from urt.rl.visual_cache import VisualCache
    from urt.rl.logprobs import completion_sequence, sequence_logprobs
    from data_fixtures import four_task_samples

    torch.manual_seed(0)
    bundle = load_model("tiny", family=family)  # vision tower and projector frozen (the default): features cached
    model = bundle.model
    enc = SampleEncoder(bundle.processor, family, mode="prompt", max_length=8192)
    samples = [s for s in four_task_samples(video_data=False) if s.task in ("image_generation", "video_generation")]
    prompts = [enc(s) for s in samples]
    assert len(prompts[0]) != len(prompts[1])  # the shorter one is left-padded in the sampler's batch
    stops = stop_token_ids(bundle)
    captured = []
    real_generate = model.generate

    def recording_generate(**kwargs):
        if kwargs.get("return_dict_in_generate"):  # the shared prefill (one token, its cache)
            return real_generate(**kwargs)
        out = real_generate(**kwargs, output_logits=True, output_scores=True, return_dict_in_generate=True)
        captured.append((out.sequences[:, kwargs["input_ids"].shape[1]:], torch.stack(out.logits, 1),
                         torch.stack(out.scores, 1)))
        return out.sequences

    monkeypatch.setattr(model, "generate", recording_generate)
    generate(bundle, prompts, GenerationConfig(max_new_tokens=12, temperature=1.0, num_return_sequences=2,
                                                batch_size=2, seed=3))
    assert len(captured) == 1
    new, logits, scores = captured[0]
    # the processed scores are the draw: 0 at the emitted token, -inf elsewhere; never a placeholder
    assert (scores.gather(-1, new[..., None]) == 0).all() and (torch.isfinite(scores).sum(-1) == 1).all()
    assert not set(new.flatten().tolist()) & set(vision_token_ids(bundle))
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))  # generate's batch order
    seqs, sampler = [], []
    for row in range(new.shape[0]):
        ids = new[row].tolist()
        cut = next((j + 1 for j, t in enumerate(ids) if t in stops), len(ids))
        seqs.append(completion_sequence(prompts[order[row // 2]], ids[:cut], row % 2))
        sampler.append(logits[row, :cut].float().log_softmax(-1).gather(-1, new[row, :cut, None]).squeeze(-1))
    cache = VisualCache.for_step(model, family, seqs)
    if cache is None:  # transformers before `mm_encoder_outputs` (5.17): the vision tower runs in the pass
        from urt.rl.visual_cache import cache_blocker

        assert "mm_encoder_outputs" in (cache_blocker(model, family) or "")
    with torch.no_grad():
        trained, _ = sequence_logprobs(model.train(), make_logprob_collator("auto", bundle), seqs,
                                       visual_cache=cache)
    assert sum(len(s) for s in sampler) > 8
    for a, b in zip(trained, sampler):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def _non_canonical_split(tokenizer) -> tuple[list[int], list[int]]:
    """(a sampled path, its re-tokenisation): two vocabulary tokens whose text the tokenizer encodes as
    other ids (a BPE merge the sampler did not take)."""
    vocab = tokenizer.get_vocab()
    for piece, cid in sorted(vocab.items(), key=lambda kv: kv[1]):
        text = tokenizer.decode([cid])
        if len(text) < 2 or not text.isalpha():
            continue
        for cut in range(1, len(text)):
            a = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
            b = tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
            if len(a) == 1 and len(b) == 1:
                path = [a[0], b[0]]
                again = tokenizer(tokenizer.decode(path), add_special_tokens=False)["input_ids"]
                if again != path:
                    return path, again
    raise AssertionError("no non-canonical split in this vocabulary")


def test_trained_ids_are_the_sampled_ids_not_the_text(tmp_path, shards, monkeypatch):
    """The sampler draws a non-canonical split ("a" + "b" where the tokenizer has "ab"): GRPO trains on the
    ids that were sampled, and their trained log-probs are the sampler's (the policy's at those tokens), not
    those of the text's canonical re-tokenisation."""
    import urt.generation as generation
    import urt.stages.grpo as grpo_mod
    from urt.models import load_model
    from urt.train import train

    bundle = load_model("tiny", family="qwen2_5_vl")
    path, canonical = _non_canonical_split(bundle.tokenizer)
    stop = generation.stop_token_ids(bundle)[0]

    class ForcedPath:  # stands in for the sampler's draw: emits `path`, then the stop token
        def __init__(self, *args, **kwargs):
            self.width = None

        def __call__(self, input_ids, scores):
            self.width = self.width or input_ids.shape[1]
            t = input_ids.shape[1] - self.width
            forced = torch.full_like(scores, float("-inf"))
            forced[:, (path + [stop])[min(t, len(path))]] = 0.0
            return forced

    monkeypatch.setattr(generation, "CategoricalDraw", ForcedPath)
    seen = []
    real = grpo_mod.sequence_logprobs

    def recording(model, collate, seqs, **kw):
        out = real(model, collate, seqs, **kw)
        if torch.is_grad_enabled():  # the policy pass that is trained
            seen.extend((s.input_ids[s.prompt_length:].tolist(), lp.detach(), s) for s, lp in zip(seqs, out[0]))
        return out

    monkeypatch.setattr(grpo_mod, "sequence_logprobs", recording)
    rec = Recorder()
    cfg = _cfg(tmp_path, shards, "stage.loss.beta=0", "stage.run_name=noncanonical", "optimizer.lr=0")
    train(cfg, callbacks=[rec])
    assert seen and all(ids == path + [stop] for ids, _, _ in seen)  # never the canonical `canonical + [stop]`
    model = rec.module.model.eval()
    ids, trained, s = seen[0]
    with torch.no_grad():  # the policy's own log-probs of the sampled path, one plain forward (lr 0: unchanged)
        from urt.data.collate import make_collator, model_inputs

        batch = make_collator("padded", rec.module.bundle)([s])
        logits = model(**model_inputs(batch), use_cache=False).logits[0].float().log_softmax(-1)
    n = s.prompt_length
    want = logits[n - 1:n - 1 + len(ids)].gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(trained, want, atol=2e-5, rtol=0)


def test_stage_settings_must_be_the_modules(tmp_path, shards):
    """A stage key the module does not take is an error naming it (a typo is never silently ignored)."""
    from urt.errors import UrtError
    from urt.train import train

    with pytest.raises(UrtError, match=r"stage\.betaa is not a setting of GRPOModule.*num_generations"):
        train(_cfg(tmp_path, shards, "+stage.betaa=0.1", "stage.run_name=typo"))
    with pytest.raises(UrtError, match=r"stage\.seed is not a stage setting"):
        train(_cfg(tmp_path, shards, "+stage.seed=3", "stage.run_name=seed"))


@pytest.mark.parametrize("variant", ["gspo", "cispo"])
def test_loss_variants_train_from_config(tmp_path, shards, variant):
    """stage/loss=gspo|cispo builds that component and a step trains with it (μ = 2: the ratios move)."""
    from urt.rl.objective import PolicyLoss
    from urt.train import train

    rec = Recorder()
    cfg = _cfg(tmp_path, shards, f"stage/loss={variant}", f"stage.run_name={variant}", "stage.num_iterations=2")
    assert cfg.stage.loss.variant == variant
    train(cfg, callbacks=[rec])
    assert isinstance(rec.module.loss_fn, PolicyLoss) and rec.module.loss_fn.variant == variant
    assert rec.module.ref_model is None  # both default to no KL term
    assert torch.isfinite(torch.tensor(rec.losses[1]))


def test_rewards_named_in_the_config_see_the_sample(tmp_path, shards, monkeypatch):
    """`reward.imports` loads a user's module whose registered reward GRPO then calls with the sample's
    task, label, rollout key and meta beside the completion; a component built by Hydra works the same."""
    import sys

    from urt.train import train

    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "my_rewards.py").write_text(
        "from urt.rewards import register_reward\n"
        "SEEN = []\n"
        "@register_reward('test_sees_sample', override=True)\n"
        "def sees_sample(completion, solution, *, task, label, key, meta, **kw):\n"
        "    SEEN.append((task, label, key, dict(meta)))\n"
        "    return 1.0 if meta.get('attributes') is not None or key.endswith('#0') else 0.5\n"
        "def scaled(completion, solution, *, factor, **kw):\n"
        "    return factor * len(completion)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rec = Recorder()
    cfg = _cfg(tmp_path, shards, "stage.loss.beta=0", "stage.run_name=userreward", "reward.imports=[userpkg.my_rewards]",
               "+reward.components.length={_target_: userpkg.my_rewards.scaled, _partial_: true, factor: 0.5}",
               "+reward.weights.test_sees_sample=1.0", "+reward.weights.length=0.0")
    train(cfg, callbacks=[rec])
    seen = sys.modules["userpkg.my_rewards"].SEEN
    assert len(seen) == 2 * 3  # 2 prompts x G=3 completions
    keys = sorted(k for _, _, k, _ in seen)
    assert all(t == "image_generation" and lbl in (1, 2) and isinstance(m, dict) for t, lbl, _, m in seen)
    assert {k.rsplit("#", 1)[1] for k in keys} == {"0", "1", "2"}
    rows = _rollouts(Path(cfg.stage.run_dir), 1)
    assert rows["reward_length"] == [0.5 * len(c) for c in rows["completion"]]
    assert set(rows["reward_test_sees_sample"]) <= {0.5, 1.0}


def test_reference_is_built_by_configure_model():
    """The reference is made once the strategy is known (configure_model: a frozen copy on one device, a
    skeleton filled from the shards when sharded); training steps run outside a Trainer without it stop
    with the call to make, not a missing-adapter error."""
    from urt.errors import UrtError
    from urt.models import load_model
    from urt.rl.objective import PolicyLoss
    from urt.stages.grpo import GRPOModule

    m = GRPOModule(load_model("tiny", family="qwen2_5_vl"), loss=PolicyLoss(beta=0.04), num_generations=2)
    assert m.ref_model is None and m.wants_reference and m.rollout_mode == "gather"
    with pytest.raises(UrtError, match="configure_model"):
        m._reference_logprobs([], [])
    m.configure_model()
    ref = m.ref_model
    assert ref is not None and ref is not m.model and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), m.model.parameters()))
