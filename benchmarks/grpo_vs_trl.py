"""GRPO whole-step throughput: urt's `GRPOModule.training_step` vs TRL's `GRPOTrainer`, same model, same prompts.

One step on either side is: generate G completions for each of P prompts (HF `generate`, KV cache) → rewards
(urt's `format` + `accuracy`) → group advantages → reference log-probs → one policy update (μ = 1). The number
reported is completion tokens per second of *whole* steps, generation included: generated tokens (up to and
including the first stop token) / wall time from the end of one step to the end of the next (so the data
fetch and each side's own prompt processing are inside the interval on both sides).

What is shared, so the comparison is like for like:

* the model: a randomly initialised Qwen2.5-VL of ~18M parameters (urt's tiny config scaled up: text 512
  wide, 4 layers, 8 heads / 2 KV heads, MLP 1408; vision tower 4 blocks of 256), saved once as a plain
  transformers folder that both sides load (fp32, `sdpa`); the vision tower and projector are frozen on both
  sides (urt's default), and TRL's `bf16` / `gradient_checkpointing` defaults are switched off (urt uses
  neither here);
* the prompts: P·steps image-generation pairs of real easy-vqa images (resized to --image-size) with
  captions built from easy-vqa's own answers (of varying length, so prompt lengths differ as in real data),
  rendered with urt's paper template; TRL gets the same user text and images as a conversational multimodal
  dataset, and the script checks that TRL's own tokenisation of every prompt gives urt's token ids and pixel
  values exactly;
* G, max new tokens, temperature (top-p 1, no top-k), vision placeholder tokens suppressed in sampling (TRL
  by `generation_kwargs`), prompts per step (urt: `data batch = P`, one `generate` call, one log-prob
  micro-batch of P·G sequences; TRL: `per_device_train_batch_size = P·G`), β with the k3 KL, AdamW (no weight
  decay, constant lr), gradient clipping at 1.0, μ = 1, the paper's loss aggregation (TRL `loss_type="grpo"`)
  and group-std advantages (TRL `scale_rewards="group"`), the same torch thread count (--threads, default 1);
* completion lengths: a random model rarely emits EOS, and urt and TRL would otherwise stop at different
  times, so by default both are forced to generate exactly --max-new-tokens (`min_new_tokens` =
  max_new_tokens: in TRL's `generation_kwargs`, and in the model's generation_config for urt, whose
  `generate` passes its own stop ids, which HF's min-length processor then suppresses).
  `--natural-length` lets both stop at EOS instead; the mean completion lengths are printed either way.

The two sides run interleaved (urt then TRL, then TRL then urt, …) for --repeats runs each, every run from
freshly loaded weights; the first --warmup steps of each run are dropped and the medians over the remaining
steps are reported. Per step the time is split by timers around the same operations on both sides:
`generate` (the model's `generate` call), `ref fwd` (no-grad log-prob passes: reference, and old log-probs
when μ > 1), `policy fwd` (the log-prob pass with gradients), `backward`, and `rest` (everything else:
data, prompt processing, decoding, rewards, advantages, loss maths, clipping, the optimizer step, logging).
The log-prob batches' token counts are printed too: the real tokens, what a padded batch holds (urt:
rows x longest sequence; TRL: its actual batch, left-padded prompts + right-padded completions), what was
processed (urt-shared: each prompt once per micro-batch, then the completions on its cached keys and values;
urt-packed: one row, no padding; urt-padded and TRL: rows x longest), and how many tokens the pass needs with
each prompt once per group (what urt-shared's layout approaches).

urt's sides differ only in the layout of its log-prob batches (`stage.collate`, urt.rl.shared_prompt):
`urt` is urt's default (--collate auto: shared prompts on sdpa), `urt-shared` shared prompts, `urt-padded`
right-padded rows, `urt-packed` one packed row (slow without flash-attention's variable-length kernels); all run
in the same interleaving as TRL, and the ratio of each to TRL is printed. `urt-repeated` is urt with padded
log-prob batches and generation without the shared prefill and the preallocated cache (prompts repeated G
times in the batch, HF's own cache): the path Qwen3.5 took before its hybrid cache could be shared; with it
among the sides, each other urt side's ratio to it is printed too.

--family qwen3_5 runs the urt sides on urt's tiny Qwen3.5 (urt.models.tiny: 3 gated-DeltaNet linear-attention
layers + 1 full-attention layer, random weights; no TRL side: the comparison with TRL is set up for
Qwen2.5-VL), e.g. `--family qwen3_5 --sides urt,urt-repeated`.

--profile urt,trl (any of the sides) runs one more short run of each after the measurement, its last step under
torch.profiler, and prints the top operators by self CPU time (the phases above appear as `bench::*` ranges).

Run:  python benchmarks/grpo_vs_trl.py   (defaults: P=2, G=4, 64 new tokens, sides urt-shared, urt-padded,
      urt-packed and trl, 2 runs per side of 1 warmup + 1 timed step; several minutes on 2 CPU cores)
      python benchmarks/grpo_vs_trl.py --sides urt-shared,trl --steps 2 --repeats 3 --profile urt-shared,trl
      python benchmarks/grpo_vs_trl.py --family qwen3_5 --sides urt,urt-repeated --steps 2 --repeats 3
Needs TRL (only this script does): pip install trl==1.16.0 (tested with transformers 5.24.0).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

TRL_PIN = "1.16.0"
FAMILIES = ("qwen2_5_vl", "qwen3_5")
MODEL_NAMES = {"qwen2_5_vl": "Qwen2.5-VL", "qwen3_5": "Qwen3.5 (3 gated-DeltaNet + 1 full-attention layers)"}
SIDES = ("urt", "trl", "urt-shared", "urt-padded", "urt-packed", "urt-repeated")
# urt's sides: the log-prob layout (stage.collate) each runs with; "urt" follows --collate
SIDE_LAYOUT = {"urt-shared": "shared_prompt", "urt-padded": "padded", "urt-packed": "packed", "urt-repeated": "padded"}
# urt's sides that generate with prompts repeated in the batch and HF's own cache
REPEATED_GENERATION = ("urt-repeated",)
PHASES = ("generate", "ref fwd", "policy fwd", "backward", "rest")

# The ~18M-parameter Qwen2.5-VL: urt.models.tiny's config with these sizes (head_dim 64 -> mrope 8+12+12=32).
TEXT_SIZES = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2)
MROPE_SECTION = [8, 12, 12]
VISION_SIZES = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=512,
                    fullatt_block_indexes=[3])


# ------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grpo_vs_trl.py",
        description="Whole-step GRPO throughput (completion tokens/s, generation included): urt vs TRL's "
                    "GRPOTrainer on the same ~18M-parameter tiny Qwen2.5-VL.")
    p.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl",
                   help="qwen2_5_vl: the ~18M-parameter model, TRL side possible; qwen3_5: urt's tiny Qwen3.5, "
                        "urt sides only")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (P)")
    p.add_argument("--generations", "-G", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length cap")
    p.add_argument("--steps", type=int, default=1, help="timed steps per run (after the warmup steps)")
    p.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of every run")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, interleaved urt/TRL")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.04, help="KL weight (0: no reference model on either side)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (default 1: the tiny model gains little from more, and timings "
                        "on a shared machine stay steadier); 0: torch's default")
    p.add_argument("--image-size", type=int, default=112, help="square image side in pixels (112 -> 16 tokens)")
    p.add_argument("--natural-length", action="store_true",
                   help="let completions stop at EOS (default: both sides generate exactly --max-new-tokens)")
    p.add_argument("--collate", choices=("auto", "shared_prompt", "packed", "padded"), default="auto",
                   help="the log-prob layout of the side `urt` (stage.collate; auto: urt's default)")
    p.add_argument("--sides", default="urt-shared,urt-padded,urt-packed,trl",
                   help="comma list of sides to run: urt (log-prob layout per --collate), urt-shared, urt-padded, "
                        "urt-packed (urt with that layout), urt-repeated (padded, no shared prefill or "
                        "preallocated cache), trl")
    p.add_argument("--profile", default="",
                   help="comma list of sides (as --sides) to profile afterwards: one more run each, its last "
                        "step under torch.profiler")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where to save (or reuse, if it has a config.json) the model folder; default: a temp dir")
    p.add_argument("--seed", type=int, default=0)
    return p


def require_trl():
    """TRL's module, or exit with the install command (TRL is only needed by this benchmark)."""
    try:
        import trl
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except ImportError as err:
        raise SystemExit(
            f"benchmarks/grpo_vs_trl.py compares urt with TRL's GRPOTrainer, but TRL cannot be imported ({err}).\n"
            f"Install the version this benchmark was written for:  pip install trl=={TRL_PIN}") from None
    if getattr(trl, "__version__", None) != TRL_PIN:
        warnings.warn(f"TRL {trl.__version__} is installed; this benchmark was written for trl=={TRL_PIN}",
                      stacklevel=2)
    return trl


# ------------------------------------------------------------------------------------------ model + prompts
def build_model_dir(out: Path, seed: int = 0, family: str = "qwen2_5_vl") -> Path:
    """Save the ~18M-parameter tiny Qwen2.5-VL (random weights, urt's tiny tokenizer and processor) to `out`;
    for qwen3_5 urt's tiny Qwen3.5 as it is."""
    import torch
    import transformers as tf

    from urt.models.tiny import build_tiny, tiny_config, tiny_processor
    from urt.models.tokenizer import load_tiny_tokenizer

    if (out / "config.json").is_file():
        return out
    if family != "qwen2_5_vl":
        bundle = build_tiny(family, seed=seed, attn_implementation="sdpa")
        bundle.model.save_pretrained(out)
        bundle.processor.save_pretrained(out)
        return out
    tok = load_tiny_tokenizer("qwen2_5_vl")
    d = tiny_config("qwen2_5_vl", tok).to_dict()
    d["text_config"].update(TEXT_SIZES)
    d["text_config"].pop("layer_types", None)  # re-derived for the new depth
    d["text_config"]["rope_parameters"]["mrope_section"] = list(MROPE_SECTION)
    d["vision_config"].update(VISION_SIZES)
    cfg = tf.Qwen2_5_VLConfig.from_dict(d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa",
                                                                     dtype=torch.float32)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.generation_config.bos_token_id = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tiny_processor("qwen2_5_vl", tok).save_pretrained(out)
    return out


# Added to captions in turn (0..4 of them), so prompt lengths differ as in real data (and padding shows).
CAPTION_DETAILS = (" on a plain background", ", drawn with flat colour and sharp edges",
                   ", in the middle of a square picture with nothing else in it",
                   ", in the style of a simple educational illustration for children learning shapes and colours")


def build_samples(n: int, image_size: int):
    """n image-generation pairs of real easy-vqa images; caption "a <color> <shape>" of the described image
    (from easy-vqa's own answers) plus 0-4 details, label alternating 1/2 (the described image first or
    second)."""
    import easy_vqa
    from PIL import Image

    from urt.data.schema import Sample

    paths = easy_vqa.get_train_image_paths()
    questions, answers, ids = easy_vqa.get_train_questions()
    shapes = {"circle", "rectangle", "triangle"}
    color, shape = {}, {}
    for q, a, i in zip(questions, answers, ids):
        if q == "what color is the shape?":
            color[i] = a
        elif q.startswith("what") and a in shapes:
            shape[i] = a
    usable = sorted(i for i in color if i in shape)
    if len(usable) < 2 * n:
        raise SystemExit(f"easy-vqa has only {len(usable)} captionable images; ask for fewer prompts/steps")

    def image(i):
        img = Image.open(paths[i]).convert("RGB")
        return img.resize((image_size, image_size), Image.BICUBIC)

    out = []
    for k in range(n):
        a, b = usable[2 * k], usable[2 * k + 1]
        label = 1 + k % 2
        pair = [image(a), image(b)] if label == 1 else [image(b), image(a)]
        caption = f"a {color[a]} {shape[a]}" + "".join(CAPTION_DETAILS[: k % (len(CAPTION_DETAILS) + 1)])
        out.append(Sample(f"pair-{k}", "image_generation", label, pair, caption=caption, source="easy-vqa"))
    return out


# ------------------------------------------------------------------------------------------ measuring
class Probe:
    """Phase timers and token counters, taken (and reset) once per step."""

    def __init__(self, stop_ids):
        self.stop_ids = set(int(i) for i in stop_ids)
        self.acc: dict[str, float] = defaultdict(float)
        self.steps: list[dict] = []
        self._last = None

    @contextlib.contextmanager
    def phase(self, name: str):
        import torch

        t = time.perf_counter()
        with torch.profiler.record_function(f"bench::{name}"):
            try:
                yield
            finally:
                self.acc[name] += time.perf_counter() - t

    def count_generated(self, sequences, width: int) -> None:
        """Completion tokens of a `generate` output: up to and including each row's first stop token."""
        lens = []
        for row in sequences[:, width:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in self.stop_ids), len(row))
            lens.append(cut)
        self.acc["tokens"] += sum(lens)
        self.acc["sequences"] += len(lens)

    def start(self) -> None:
        self._last = time.perf_counter()
        self.acc.clear()

    def step_end(self) -> None:
        now = time.perf_counter()
        rec = dict(self.acc)
        rec["step"] = now - self._last
        rec["rest"] = rec["step"] - sum(rec.get(k, 0.0) for k in PHASES if k != "rest")
        self.steps.append(rec)
        self.acc.clear()
        self._last = time.perf_counter()


def _wrap_generate(model, probe: Probe) -> None:
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        with probe.phase("generate"):
            out = original(*args, **kwargs)
        if kwargs.get("max_new_tokens") == 1 and kwargs.get("return_dict_in_generate"):
            return out  # urt's shared prefill encoding the prompts: its one token is dropped, not a completion
        ids = kwargs.get("input_ids", args[0] if args else None)
        seqs = out if not hasattr(out, "sequences") else out.sequences
        probe.count_generated(seqs, int(ids.shape[1]))
        return out

    model.generate = generate


# ------------------------------------------------------------------------------------------ urt side
def run_urt(args, model_dir: Path, samples, n_steps: int, profile: bool = False, collate: str | None = None,
            repeated_generation: bool = False):
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    import urt.stages.grpo as grpo
    from urt.data.encode import IGNORE_INDEX, SampleEncoder
    from urt.generation import stop_token_ids
    from urt.models import load_model
    from urt.rl.objective import PolicyLoss

    import urt.generation

    collate = collate or args.collate
    family = args.family
    bundle = load_model(str(model_dir), family=family, attn_implementation="sdpa", dtype="float32", device="cpu")
    if not args.natural_length:
        bundle.model.generation_config.min_new_tokens = args.max_new_tokens
    probe = Probe(stop_token_ids(bundle))
    P, G = args.prompts, args.generations
    encoder = SampleEncoder(bundle.processor, family, mode="prompt")
    batcher = grpo.PromptBatch()
    loader = DataLoader(samples[: P * n_steps], batch_size=P, shuffle=False, num_workers=0,
                        collate_fn=lambda items: batcher([encoder(s) for s in items]))
    module = grpo.GRPOModule(
        bundle, optimizer=functools.partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.0),
        num_generations=G, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0,
        generation_batch_size=P, loss=PolicyLoss(beta=args.beta, kl_estimator="k3", aggregation="paper"),
        advantage="paper", num_iterations=1, num_mini_batches=1, micro_batch_size=P * G, max_grad_norm=1.0,
        collate=collate, seed=args.seed)

    layout = logprob_layout(module.collate)

    # timers around the same operations as on the TRL side
    _wrap_generate(bundle.model, probe)
    original_logprobs = grpo.sequence_logprobs

    def sequence_logprobs(model, collator, seqs, **kw):
        grad = torch.is_grad_enabled()
        lens = [len(s) for s in seqs]
        comp = sum(int((s.labels != IGNORE_INDEX).sum()) for s in seqs)
        tag = "policy" if grad else "ref"
        probe.acc[f"{tag}_real_tokens"] += sum(lens)
        probe.acc[f"{tag}_padded_tokens"] += len(lens) * max(lens)
        prompts = {s.key.rsplit("#", 1)[0]: s.prompt_length for s in seqs}  # sequence keys are "<prompt key>#<i>"
        if layout == "shared":  # the prompts (less their last token) padded once, then rows of last token + completion
            batch = len(prompts) * (max(prompts.values()) - 1) + len(lens) * (1 + max(n - s.prompt_length
                                                                                     for n, s in zip(lens, seqs)))
        else:
            batch = sum(lens) if layout == "packed" else len(lens) * max(lens)
        probe.acc[f"{tag}_batch_tokens"] += batch
        probe.acc[f"{tag}_completion_tokens"] += comp
        probe.acc[f"{tag}_sequences"] += len(lens)
        probe.acc[f"{tag}_shared_tokens"] += sum(prompts.values()) + comp
        with probe.phase("policy fwd" if grad else "ref fwd"):
            return original_logprobs(model, collator, seqs, **kw)

    original_backward = module.manual_backward

    def manual_backward(loss, *a, **kw):
        with probe.phase("backward"):
            return original_backward(loss, *a, **kw)

    module.manual_backward = manual_backward

    class Timer(Callback):
        def on_train_start(self, trainer, pl_module):
            probe.start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if profile and batch_idx == n_steps - 1:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if profile and batch_idx == n_steps - 1:
                self.prof.__exit__(None, None, None)
                probe.profile = self.prof
            probe.step_end()

    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=n_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    original_generate = urt.generation.generate

    def generate_repeated(bundle, prompts, cfg, **kw):  # GRPOModule imports generate at each call
        return original_generate(bundle, prompts, dataclasses.replace(cfg, shared_prefill=False, preallocate=False),
                                 **kw)

    grpo.sequence_logprobs = sequence_logprobs
    if repeated_generation:
        urt.generation.generate = generate_repeated
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        grpo.sequence_logprobs = original_logprobs
        urt.generation.generate = original_generate
    if len(probe.steps) != n_steps:
        raise RuntimeError(f"urt ran {len(probe.steps)} steps, expected {n_steps}")
    for rec in probe.steps:
        rec["layout"] = layout
    if profile:
        return probe.steps, probe.profile
    return probe.steps


def logprob_layout(collator) -> str:
    """"shared", "packed" or "padded": the layout of urt's log-prob batches a GRPOModule's collator gives."""
    from urt.data.collate import PackedCollator
    from urt.rl.shared_prompt import SharedPromptLogprobs

    if isinstance(collator, SharedPromptLogprobs):
        return "shared"
    return "packed" if isinstance(collator, PackedCollator) else "padded"


# ------------------------------------------------------------------------------------------ TRL side
def trl_dataset(samples):
    """The same prompts as a conversational multimodal dataset: the user text rendered by urt's paper template,
    the images in an `images` column (TRL puts their placeholders before the text, as urt's rendering does)."""
    from datasets import Dataset

    from urt.prompts import answer_string, render_text

    rows = []
    for s in samples:
        text = render_text("paper", s.task, **s.fields())
        rows.append({"prompt": [{"role": "user", "content": text}], "images": list(s.visuals),
                     "solution": answer_string(s.task, int(s.label)), "key": s.key})
    return Dataset.from_list(rows)


def _reward_fn(name: str):
    from urt.rewards import get_reward

    fn = get_reward(name)

    def reward(prompts, completions, solution, **kwargs):
        return [float(fn(c[0]["content"] if isinstance(c, list) else c, s)) for c, s in zip(completions, solution)]

    reward.__name__ = f"urt_{name}"
    return reward


def run_trl(args, model_dir: Path, dataset, trainable: set[str], vision_ids: list[int], n_steps: int,
            profile: bool = False):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from urt.rewards import DEFAULT_WEIGHTS

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32,
                                                        attn_implementation="sdpa")
    for name, p in model.named_parameters():  # the same trainable set as urt's (vision tower + projector frozen)
        p.requires_grad_(name in trainable)
    processor = AutoProcessor.from_pretrained(str(model_dir))
    processor.tokenizer.padding_side = "left"  # GRPOTrainer requires it (its prompt ids are left-padded)
    P, G = args.prompts, args.generations
    gen_kwargs = {"suppress_tokens": list(vision_ids)}
    if not args.natural_length:
        gen_kwargs["min_new_tokens"] = args.max_new_tokens
    out_dir = tempfile.mkdtemp(prefix="grpo_vs_trl-")
    cfg = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=P * G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        repetition_penalty=1.0, generation_kwargs=gen_kwargs, beta=args.beta, num_iterations=1, epsilon=0.2,
        loss_type="grpo", scale_rewards="group", learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", max_steps=n_steps,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
        logging_steps=n_steps + 1, save_strategy="no", shuffle_dataset=False, seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True, log_completions=False,
        reward_weights=[float(w) for w in DEFAULT_WEIGHTS.values()])
    probe = Probe(list(processor.tokenizer.convert_tokens_to_ids(["<|im_end|>"])) +
                  [processor.tokenizer.eos_token_id])

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            probe.start()

        def on_step_begin(self, a, state, control, **kw):
            if profile and state.global_step == n_steps - 1:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_step_end(self, a, state, control, **kw):
            if profile and state.global_step == n_steps:
                self.prof.__exit__(None, None, None)
                probe.profile = self.prof
            probe.step_end()

    trainer = GRPOTrainer(model=model, reward_funcs=[_reward_fn(n) for n in DEFAULT_WEIGHTS], args=cfg,
                          train_dataset=dataset.select(range(P * n_steps)), processing_class=processor,
                          callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics dict
    _wrap_generate(model, probe)
    original_logps = trainer._get_per_token_logps_and_entropies

    def logps(mdl, input_ids, attention_mask, logits_to_keep, *a, **kw):
        grad = torch.is_grad_enabled()
        tag = "policy" if grad else "ref"
        probe.acc[f"{tag}_real_tokens"] += int(attention_mask.sum())
        probe.acc[f"{tag}_padded_tokens"] += int(input_ids.numel())
        probe.acc[f"{tag}_batch_tokens"] += int(input_ids.numel())
        probe.acc[f"{tag}_completion_tokens"] += int(attention_mask[:, -logits_to_keep:].sum())
        probe.acc[f"{tag}_sequences"] += int(input_ids.shape[0])
        with probe.phase("policy fwd" if grad else "ref fwd"):
            return original_logps(mdl, input_ids, attention_mask, logits_to_keep, *a, **kw)

    trainer._get_per_token_logps_and_entropies = logps
    original_backward = trainer.accelerator.backward

    def backward(loss, *a, **kw):
        with probe.phase("backward"):
            return original_backward(loss, *a, **kw)

    trainer.accelerator.backward = backward
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # save_strategy="no": nothing of value in it
    if len(probe.steps) != n_steps:
        raise RuntimeError(f"TRL ran {len(probe.steps)} steps, expected {n_steps}")
    if profile:
        return probe.steps, probe.profile
    return probe.steps


# ------------------------------------------------------------------------------------------ checks + report
def prompt_lengths(model_dir: Path, samples, dataset=None, family: str = "qwen2_5_vl") -> tuple[list[int], bool | None]:
    """urt's prompt lengths and, given TRL's dataset, whether TRL's own tokenisation of every row (its
    `prepare_multimodal_messages` + the processor's chat template) gives urt's token ids and pixels exactly."""
    from transformers import AutoProcessor

    from urt.data.encode import SampleEncoder
    from urt.models import load_model

    bundle = load_model(str(model_dir), family=family, attn_implementation="sdpa", dtype="float32", device="cpu")
    encoder = SampleEncoder(bundle.processor, family, mode="prompt")
    ours = [encoder(s) for s in samples]
    lens = [len(e) for e in ours]
    if dataset is None:
        return lens, None
    from trl.data_utils import prepare_multimodal_messages

    processor = AutoProcessor.from_pretrained(str(model_dir))
    same = True
    for e, row in zip(ours, dataset):
        msgs = prepare_multimodal_messages(row["prompt"], images=row["images"])
        theirs = processor.apply_chat_template(conversation=[msgs], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)
        same = same and list(theirs["input_ids"][0]) == e.input_ids.tolist() and \
            theirs["pixel_values"].shape == e.visual["pixel_values"].shape and \
            bool((theirs["pixel_values"] == e.visual["pixel_values"]).all())
    return lens, same


def _median(steps: list[dict], key: str) -> float:
    vals = [s.get(key, 0.0) for s in steps]
    return statistics.median(vals) if vals else float("nan")


def summarise(steps: list[dict]) -> dict:
    tps = [s["tokens"] / s["step"] for s in steps]
    out = {"tokens_per_s": statistics.median(tps), "step": _median(steps, "step"),
           "tokens": _median(steps, "tokens"),
           "completion_length": sum(s["tokens"] for s in steps) / max(1, sum(s["sequences"] for s in steps))}
    for k in PHASES:
        out[k] = _median(steps, k)
    for tag in ("ref", "policy"):
        for k in ("real_tokens", "padded_tokens", "batch_tokens", "completion_tokens", "sequences", "shared_tokens"):
            out[f"{tag}_{k}"] = _median(steps, f"{tag}_{k}")
    out["layout"] = steps[0].get("layout", "padded") if steps else "padded"
    seqs = sum(s.get("policy_sequences", 0) for s in steps)
    out["logp_completion_length"] = sum(s.get("policy_completion_tokens", 0) for s in steps) / max(1, seqs)
    return out


def print_report(results: dict, args, prompt_lens: list[int], same: bool | None, n_params: float,
                 runs: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=150)
    mode = "natural: stop at EOS" if args.natural_length else f"forced to {args.max_new_tokens} tokens"
    con.print(f"model: tiny {MODEL_NAMES[args.family]}, {n_params / 1e6:.1f}M parameters (vision tower + "
              f"projector frozen), fp32, sdpa, {args.threads} torch thread(s); P={args.prompts} prompts x G={args.generations} per step, "
              f"max_new_tokens={args.max_new_tokens} ({mode}), temperature {args.temperature}, beta {args.beta}, "
              f"lr {args.lr}, mu=1; prompts {min(prompt_lens)}-{max(prompt_lens)} tokens (mean "
              f"{statistics.mean(prompt_lens):.0f}, {args.image_size}px image pairs)"
              + ("" if same is None else f"; TRL's prompt tokens and pixels identical to urt's: {same}"))
    con.print(f"medians over {', '.join(f'{k} {v}' for k, v in runs.items())} steps ({args.repeats} interleaved "
              f"run(s) per side x {args.steps} step(s), first {args.warmup} step(s) of every run dropped)")
    t = Table(title="GRPO whole step (medians; seconds per step and its phases)")
    for c in ("side", "tok/s", "step", *PHASES, "tok/step", "len gen", "len logp"):
        t.add_column(c, justify="left" if c == "side" else "right")
    for side, r in results.items():
        t.add_row(side, f"{r['tokens_per_s']:.1f}", f"{r['step']:.2f}", *[f"{r[k]:.2f}" for k in PHASES],
                  f"{r['tokens']:.0f}", f"{r['completion_length']:.1f}", f"{r['logp_completion_length']:.1f}")
    con.print(t)
    con.print("tok/s: generated completion tokens / step wall time; len gen / len logp: mean completion length "
              "as generated / as scored in the log-prob passes (urt scores the sampled ids)")
    t2 = Table(title="log-prob batches per step (tokens through the model, medians)")
    for c in ("side", "pass", "seqs", "real tokens", "padded (rows x longest)", "processed", "prompt once per group"):
        t2.add_column(c, justify="left" if c in ("side", "pass") else "right")
    for side, r in results.items():
        for tag in ("ref", "policy"):
            if not r[f"{tag}_sequences"]:
                continue
            real, padded, batch = r[f"{tag}_real_tokens"], r[f"{tag}_padded_tokens"], r[f"{tag}_batch_tokens"]
            how = r["layout"]
            shared = r.get(f"{tag}_shared_tokens", 0.0)
            t2.add_row(side, tag, f"{r[f'{tag}_sequences']:.0f}", f"{real:.0f}",
                       f"{padded:.0f} (+{(padded / real - 1) * 100:.1f}%)", f"{batch:.0f} {how}",
                       f"{shared:.0f} ({shared / real * 100:.0f}%)" if shared else "-")
    con.print(t2)


def print_profile(con, side: str, prof, rows: int) -> None:
    con.print(f"\n[bold]{side}: one step under torch.profiler (CPU), top {rows} operators by self CPU time[/bold]")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    phases = [e for e in prof.key_averages() if e.key.startswith("bench::")]
    for e in sorted(phases, key=lambda e: -e.cpu_time_total):
        con.print(f"  {e.key:<22} {e.cpu_time_total / 1e6:8.3f} s total over {e.count} call(s)")


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides or len(set(sides)) != len(sides):
        raise SystemExit(f"--sides takes a comma list of {', '.join(SIDES)} (each once), got {args.sides!r}")
    for name in ("prompts", "max_new_tokens", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.generations < 2 or args.warmup < 0:
        raise SystemExit("--generations must be >= 2 and --warmup >= 0")
    profiled = [s.strip() for s in args.profile.split(",") if s.strip()]
    if any(s not in SIDES for s in profiled):
        raise SystemExit(f"--profile takes a comma list of {', '.join(SIDES)}, got {args.profile!r}")
    if "trl" in sides + profiled:
        if args.family != "qwen2_5_vl":
            raise SystemExit(f"the TRL side is set up for qwen2_5_vl; with --family {args.family} run urt sides only, "
                             f"e.g. --sides urt,urt-repeated")
        require_trl()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    import lightning.pytorch  # noqa: F401 - sets its loggers' levels on import; quieten them after

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl", "accelerate", "datasets",
                 "urt"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass

    from urt.generation import vision_token_ids
    from urt.models import load_model

    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="grpo_vs_trl-model-")
        args.model_dir = Path(tmp.name)
    model_dir = build_model_dir(args.model_dir, seed=args.seed, family=args.family)
    n_steps = args.warmup + args.steps
    samples = build_samples(args.prompts * n_steps, args.image_size)
    ref = load_model(str(model_dir), family=args.family, attn_implementation="sdpa", dtype="float32", device="cpu")
    n_params = sum(p.numel() for p in ref.model.parameters())
    trainable = {n for n, p in ref.model.named_parameters() if p.requires_grad}
    vision_ids = vision_token_ids(ref)
    del ref

    dataset = trl_dataset(samples) if "trl" in sides + profiled else None
    prompt_lens, same = prompt_lengths(model_dir, samples, dataset, args.family)
    if same is False:
        print("WARNING: TRL's tokenisation of the prompts differs from urt's; the comparison is off", file=sys.stderr)

    def run(side: str, steps: int, profile: bool = False):
        if side.startswith("urt"):
            collate = SIDE_LAYOUT.get(side, args.collate)
            return run_urt(args, model_dir, samples, steps, profile=profile, collate=collate,
                           repeated_generation=side in REPEATED_GENERATION)
        return run_trl(args, model_dir, dataset, trainable, vision_ids, steps, profile=profile)

    kept: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.repeats):
        order = sides if r % 2 == 0 else list(reversed(sides))
        for side in order:
            steps = run(side, n_steps)
            kept[side] += steps[args.warmup:]
            shown = [f"{s['tokens'] / s['step']:.1f} tok/s ({s['step']:.2f} s)" for s in steps]
            shown[:args.warmup] = [f"[warmup {x}]" for x in shown[:args.warmup]]
            print(f"run {r + 1}/{args.repeats} {side}: " + ", ".join(shown), flush=True)

    results = {side: summarise(kept[side]) for side in sides}
    print_report(results, args, prompt_lens, same, n_params, {s: len(v) for s, v in kept.items()})

    if profiled:
        from rich.console import Console

        con = Console(width=150)
        for side in profiled:
            _, prof = run(side, max(1, args.warmup) + 1, profile=True)
            print_profile(con, side, prof, args.profile_rows)

    if "trl" in results:
        for side in (s for s in sides if s.startswith("urt")):
            ratio = results[side]["tokens_per_s"] / results["trl"]["tokens_per_s"]
            print(f"ratio {side}/trl: {ratio:.2f} ({results[side]['layout']} log-prob batches)")
    if "urt-repeated" in results:
        base = results["urt-repeated"]
        for side in (s for s in sides if s.startswith("urt") and s != "urt-repeated"):
            r = results[side]
            print(f"ratio {side}/urt-repeated: {r['tokens_per_s'] / base['tokens_per_s']:.2f} tok/s, "
                  f"{base['step'] / r['step']:.2f} step time ({r['layout']} log-prob batches)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
