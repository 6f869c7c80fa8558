"""Batched text generation from encoded prompts: what evaluation, rejection sampling, GRPO rollouts,
the judge and the server all call.

`generate(bundle, prompts, cfg)` takes `Encoded` prompts (`SampleEncoder(..., mode="prompt")`) and
returns, per prompt and in input order, `cfg.num_return_sequences` completions:

* prompts are sorted by length (longest first) and cut into batches of `cfg.batch_size` prompts, each
  left-padded (`PaddedCollator(padding_side="left")`) and run through `model.generate` with the KV
  cache; with several return sequences each prompt is encoded once and its KV cache repeated
  (`shared_prefill`; a hybrid model's (Qwen3.5) linear-attention states, recurrent state + convolution
  window, are repeated with it: `urt.models.hybrid.LinearStateLayer`);
* the KV cache of plain attention layers (a hybrid model's full-attention layers included) is
  preallocated to the batch's final length (`PreallocatedLayer`): HF's DynamicLayer concatenates the whole
  cache at every step, which on a CPU was half of the decode time for 500-token judge prompts;
* sampling (temperature, top-p, an inverse-CDF draw) runs as logits processors, HF's step is greedy;
* generation stops at `<|im_end|>` and the tokenizer's eos;
* every vision placeholder / special vision token (`<|image_pad|>`, `<|video_pad|>`,
  `<|vision_start|>`, `<|vision_end|>`, `<|vision_pad|>`, `<image>`, `<video>`, and the ids the model
  config names) gets -inf logits: a sampled placeholder would break the next training forward
  ("Image features and image tokens do not match", docs/demo.md §Pitfalls, pitfall 5);
* sampling settings come from `GenerationConfig` only: a checkpoint's own generation_config.json
  (Qwen's ships top_k=1, temperature 0.1, repetition_penalty 1.05) never leaks in;
* sampling is seeded (`cfg.seed`, RNG state restored afterwards): same seed, same completions;
* text is decoded with special tokens skipped and the prompt's assistant prefix
  (`Encoded.meta["assistant_prefix"]`, e.g. Qwen3.5's `<think>\\n`) prepended, so it is exactly what
  the parser and the rewards must see;
* each completion is a `Completion`: that text, carrying the token ids that were sampled (`ids`, up to and
  including the stop token) and why it ended (`finish_reason`). Training uses the ids, never a
  re-tokenisation of the text: a sampled non-canonical BPE split ("a" + "b" where the tokenizer has "ab")
  stays the path whose log-probs GRPO computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.cache_utils import DynamicLayer

from urt.errors import UrtError
from urt.models.compat import cache_kwarg, model_device, model_dtype, to_device
from urt.models.hybrid import LinearStateLayer, hybrid_cache

IM_END = "<|im_end|>"
# Special vision tokens of the four families' tokenizers (whichever exist are suppressed).
VISION_TOKENS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<image>",
    "<video>",
)
# Config attributes naming vision token ids (Qwen: *_token_id; LLaVA-OV: *_token_index).
_VISION_ID_ATTRS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "image_token_index",
    "video_token_index",
)


class Completion(str):
    """A generated completion: its text (a `str`: what the parser and rewards read), plus `ids`, the
    sampled token ids (assistant prefix excluded; the stop token included when one was sampled) and
    `finish_reason` ("stop": a stop token ended it; "length": it used up max_new_tokens)."""

    ids: tuple[int, ...]
    finish_reason: str

    def __new__(cls, text: str, ids: Sequence[int] = (), finish_reason: str = "stop"):
        obj = super().__new__(cls, text)
        obj.ids = tuple(int(i) for i in ids)
        obj.finish_reason = finish_reason
        return obj

    def __reduce__(self):  # pickles (DataLoader workers, multiprocessing) with its ids
        return (Completion, (str(self), self.ids, self.finish_reason))

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


def completion_of(seq: Sequence[int], stops: Sequence[int], tokenizer, prefix: str = "") -> Completion:
    """The `Completion` of one generated row (the new tokens, right-padded after a stop): cut after the
    first stop token, text decoded with special tokens skipped, `prefix` prepended to the text."""
    seq = [int(t) for t in seq]
    cut = next((j for j, t in enumerate(seq) if t in stops), None)
    ids = seq if cut is None else seq[:cut + 1]
    body = seq if cut is None else seq[:cut]
    return Completion(prefix + tokenizer.decode(body, skip_special_tokens=True), ids,
                      "length" if cut is None else "stop")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    num_return_sequences: int = 1
    batch_size: int = 8  # prompts per generate call
    seed: int = 0
    # several samples per prompt: encode each prompt once and repeat its KV cache (GRPO groups, rejection
    # sampling): the prefill num_return_sequences times cheaper, the logits those of repeated prompts up to
    # float rounding (a draw landing within it of a CDF boundary can differ: benchmarks/rollout_generation.py)
    shared_prefill: bool = True
    # KV cache in buffers sized for the batch's final length (PreallocatedLayer) instead of HF's
    # concatenation per step: the same numbers, decode ~2x faster on CPU for judge-length prompts
    preallocate: bool = True
    # the model is sharded (FSDP2, trainer=fsdp): every forward all-gathers one layer's weights from every
    # rank, so the ranks run the same number of generate calls (a rank out of prompts repeats one, the
    # output dropped) and HF's synced_gpus keeps each call's decode steps in step until every rank is done
    lockstep: bool = False

    def validate(self) -> None:
        if isinstance(self.max_new_tokens, bool) or int(self.max_new_tokens) < 1:
            raise UrtError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature is None or float(self.temperature) < 0:
            raise UrtError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_p is None or not 0 < float(self.top_p) <= 1:
            raise UrtError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.num_return_sequences, bool) or int(self.num_return_sequences) < 1:
            raise UrtError(f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}")
        if isinstance(self.batch_size, bool) or int(self.batch_size) < 1:
            raise UrtError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0


# ------------------------------------------------------------------------------------------ tokens


def _token_id(tok, token: str) -> int | None:
    try:
        i = tok.convert_tokens_to_ids(token)
    except Exception:  # noqa: BLE001 - tokenizers differ in what they raise for unknown tokens
        return None
    if i is None or isinstance(i, list):
        return None
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and i == unk and token != getattr(tok, "unk_token", None):
        return None
    return int(i)


def _vocab_size(model) -> int | None:
    try:
        emb = model.get_output_embeddings()
        if emb is not None and getattr(emb, "weight", None) is not None:
            return int(emb.weight.shape[0])
    except Exception:  # noqa: BLE001
        pass
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    size = getattr(text, "vocab_size", None) or getattr(cfg, "vocab_size", None)
    return int(size) if size else None


def vision_token_ids(bundle) -> list[int]:
    """Ids of every special vision token the tokenizer or the model config knows (sorted)."""
    tok = bundle.tokenizer
    ids: set[int] = set()
    for t in VISION_TOKENS:
        i = _token_id(tok, t)
        if i is not None:
            ids.add(i)
    for owner in (bundle.processor, tok):
        for attr in ("image_token", "video_token", "vision_start_token", "vision_end_token"):
            t = getattr(owner, attr, None)
            if isinstance(t, str) and t:
                i = _token_id(tok, t)
                if i is not None:
                    ids.add(i)
    cfg = bundle.model.config
    for owner in (cfg, getattr(cfg, "text_config", None)):
        if owner is None:
            continue
        for attr in _VISION_ID_ATTRS:
            v = getattr(owner, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                ids.add(v)
    vocab = _vocab_size(bundle.model)
    return sorted(i for i in ids if vocab is None or i < vocab)


def stop_token_ids(bundle) -> list[int]:
    """`<|im_end|>`, the tokenizer's eos and the model's generation eos ids (deduplicated, in order)."""
    tok = bundle.tokenizer
    out: list[int] = []

    def add(v) -> None:
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, int) and not isinstance(x, bool) and x >= 0 and x not in out:
                out.append(x)

    add(_token_id(tok, IM_END))
    add(getattr(tok, "eos_token_id", None))
    add(getattr(getattr(bundle.model, "generation_config", None), "eos_token_id", None))
    if not out:
        raise UrtError(f"the {bundle.family} tokenizer has neither {IM_END} nor an eos token; cannot stop generation")
    return out


class SuppressTokens:
    """Logits processor: -inf for the given token ids (the vision placeholders)."""

    def __init__(self, token_ids: Sequence[int]):
        self.token_ids = sorted(set(int(i) for i in token_ids))
        self._index: dict[torch.device, torch.Tensor] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.token_ids:
            return scores
        idx = self._index.get(scores.device)
        if idx is None:
            idx = torch.tensor([i for i in self.token_ids if i < scores.shape[-1]], dtype=torch.long,
                               device=scores.device)
            self._index[scores.device] = idx
        scores = scores.clone()
        scores[:, idx] = -float("inf")
        return scores


class CategoricalDraw:
    """Logits processor, last in the list: draws each row's next token from softmax(scores) by inverse
    CDF (one uniform per row, seeded by torch's global RNG) and returns scores that are -inf except at
    the drawn token, so a greedy step emits it. The same distribution as torch.multinomial, which on
    CPU costs ~1.6 ms per step for 32 rows of a 2k vocabulary against 0.05 ms here."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1)
        total = cdf[:, -1:]
        # u < total strictly, and the first cdf entry above u belongs to a token of positive probability
        u = torch.minimum(torch.rand(total.shape, device=scores.device) * total,
                          torch.nextafter(total, torch.zeros_like(total)))
        drawn = torch.searchsorted(cdf, u, right=True)
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(1, drawn, 0.0)


# ------------------------------------------------------------------------------------------ KV cache


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into buffers allocated once for `capacity`
    positions, so a decode step writes one position instead of copying the whole cache (DynamicLayer's
    torch.cat). Everything else is DynamicLayer's: where crop / batch_repeat_interleave /
    batch_select_indices replace `keys` by other tensors, the next update moves them into a new buffer."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def _owns(self, length: int) -> bool:
        buf = self._kbuf
        return (buf is not None and length > 0 and self.keys.data_ptr() == buf.data_ptr()
                and self.values.data_ptr() == self._vbuf.data_ptr()
                and self.keys.shape[0] == buf.shape[0] and self.keys.stride() == buf.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        if not self._owns(old) or new > self._kbuf.shape[-2]:
            size = max(new, self.capacity, 2 * old)
            kbuf = key_states.new_empty((*key_states.shape[:-2], size, key_states.shape[-1]))
            vbuf = value_states.new_empty((*value_states.shape[:-2], size, value_states.shape[-1]))
            if old:
                kbuf[..., :old, :].copy_(self.keys)
                vbuf[..., :old, :].copy_(self.values)
            self._kbuf, self._vbuf = kbuf, vbuf
        self._kbuf[..., old:new, :].copy_(key_states)
        self._vbuf[..., old:new, :].copy_(value_states)
        self.keys = self._kbuf[..., :new, :]
        self.values = self._vbuf[..., :new, :]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        """The shared prefill's repeat, written straight into buffers of the full capacity."""
        length = self.get_seq_length()
        if length == 0:
            return
        size = max(self.capacity, length)
        bufs = []
        for states in (self.keys, self.values):
            buf = states.new_empty((states.shape[0] * repeats, *states.shape[1:-2], size, states.shape[-1]))
            buf[..., :length, :].copy_(states.repeat_interleave(repeats, dim=0))
            bufs.append(buf)
        self._kbuf, self._vbuf = bufs
        self.keys = self._kbuf[..., :length, :]
        self.values = self._vbuf[..., :length, :]


def preallocated_cache(model, capacity: int):
    """A DynamicCache of PreallocatedLayers for `model` (for a hybrid model, PreallocatedLayers for its
    full-attention layers and repeatable `LinearStateLayer`s for its linear-attention ones), or None where
    its config asks for other layer kinds (sliding windows): HF then builds the cache it needs."""
    from transformers.cache_utils import DynamicCache

    hybrid = hybrid_cache(model, lambda: PreallocatedLayer(capacity))
    if hybrid is not None:
        return hybrid
    try:
        cache = DynamicCache(config=model.config)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


# ------------------------------------------------------------------------------------------ generate


# Per-token inputs: the shared prefill runs them without the last prompt token, generate repeats them.
_TOKEN_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
_SHARED_PREFILL: dict[type, bool] = {}  # model class -> its cache can be repeated (learnt on first use)


def _generate_shared_prefill(model, inputs: dict, copies: int, gen_kwargs: dict, preallocate: bool = True):
    """`model.generate` with `copies` samples per row, each prompt encoded once: all but the last prompt
    token run through the model (vision tower included), the KV cache is repeated `copies` times, and
    generate continues every copy from the last prompt token. Returns the sequences as
    `model.generate` on the repeated rows would, or None where the cache is neither a plain key/value
    cache nor `urt.models.hybrid.hybrid_cache`'s (whose linear-attention states repeat too)."""
    ids = inputs["input_ids"]
    head = {k: (v[:, :-1] if k in _TOKEN_INPUTS else v) for k, v in inputs.items()}
    # The prefill is HF's own (a one-token greedy generate), so positions under left padding and Qwen's
    # mRoPE offsets are exactly those of the repeated prompts; the token it picks is not used.
    quiet = {k: v for k, v in gen_kwargs.items()
             if k not in ("logits_processor", "max_new_tokens", "stopping_criteria")}  # (per repeated row)
    name = cache_kwarg()
    # a hybrid model's cache is ours either way: HF's linear-attention layers cannot be repeated
    mine = preallocated_cache(model, ids.shape[1] + int(gen_kwargs["max_new_tokens"])) if preallocate \
        else hybrid_cache(model)
    pre = model.generate(**head, **quiet, **({name: mine} if mine is not None else {}), max_new_tokens=1,
                         return_dict_in_generate=True)
    cache = pre.get("cache") if pre.get("cache") is not None else pre.get("past_key_values")
    inner = getattr(model, "model", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) not in (DynamicLayer, PreallocatedLayer, LinearStateLayer) for layer in layers):
        _SHARED_PREFILL[type(model)] = False
        return None
    _SHARED_PREFILL[type(model)] = True
    cache.batch_repeat_interleave(copies)
    deltas = getattr(inner, "rope_deltas", None)
    if isinstance(deltas, torch.Tensor) and deltas.shape[0] == ids.shape[0]:
        inner.rope_deltas = deltas.repeat_interleave(copies, dim=0)
    full = {k: v.repeat_interleave(copies, dim=0) for k, v in inputs.items() if k in _TOKEN_INPUTS}
    return model.generate(**full, **{name: cache}, **gen_kwargs)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False)
    prog.start()
    return prog, prog.add_task(desc, total=total)


def _lockstep_batches(n: int, device) -> int:
    """The most generate calls any rank makes (a collective; `n` on one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return n
    t = torch.tensor([float(n)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


class _StopRows:
    """A stopping criterion (HF's per-row protocol) that ends the rows of the prompts `stop` names: asked
    every decoding step with the prompt indices (input order) of the call, it returns one flag per index."""

    def __init__(self, stop, prompt_of_row: list[int]):
        self.stop = stop
        self.prompt_of_row = prompt_of_row
        self.prompts = sorted(set(prompt_of_row))

    def __call__(self, input_ids, scores, **kwargs):
        flags = dict(zip(self.prompts, self.stop(self.prompts)))
        return torch.tensor([bool(flags[p]) for p in self.prompt_of_row], dtype=torch.bool, device=input_ids.device)


def generate(bundle, prompts: list, cfg: GenerationConfig, *, progress: bool = False,
             desc: str = "generating", stop_rows=None, pad_prompt=None, visual_cache=None
             ) -> list[list[Completion]]:
    """Completions for `Encoded` prompts (see the module docstring): a list, in input order, of
    `cfg.num_return_sequences` `Completion`s per prompt (text starting with the prompt's assistant prefix,
    with the sampled ids). `stop_rows(indices) -> [bool]`, asked every decoding step, ends the generation of
    the prompts it flags (their completions stop where they are: a server's cancelled or timed-out
    requests), so the others in the batch go on and the call returns early when all are flagged.
    `cfg.lockstep` (a sharded model): every rank calls this, `pad_prompt` is what a rank generates for (and
    drops) while it has no prompts left and another rank still has. `visual_cache` (a
    `urt.rl.visual_cache.VisualCache` of this model): the prefill takes the prompts' cached visual features
    (`mm_encoder_outputs`, which transformers' generate hands to the first forward) instead of running the
    vision tower; prompts it has not seen are encoded into it."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from urt.data.collate import make_collator, model_inputs
    from urt.data.encode import Encoded

    if cfg is None:
        cfg = GenerationConfig()
    cfg.validate()
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, Encoded):
            raise UrtError(f"generate takes Encoded prompts (urt.data.encode.SampleEncoder mode='prompt'); "
                           f"prompt {i} is a {type(p).__name__}")
        if p.prompt_length != len(p) or int((p.labels != -100).sum()) > 0:
            raise UrtError(f"prompt {p.key!r} was encoded with a target (mode='sft'); generation needs "
                           f"prompt-only encodings (SampleEncoder(..., mode='prompt'))")
    if not prompts and not cfg.lockstep:
        return []

    model = bundle.model
    tok = bundle.tokenizer
    n = int(cfg.num_return_sequences)
    greedy = cfg.greedy
    copies = 1 if greedy else n  # greedy decoding gives n identical sequences: decode once, repeat
    collate = make_collator("padded", bundle, padding_side="left")
    device, dtype = model_device(model), model_dtype(model)
    stops = stop_token_ids(bundle)
    # Sampling is ours: the warpers and an inverse-CDF draw run as logits processors and HF's greedy
    # step takes the drawn token (torch.multinomial costs ~30x more on CPU: a quarter of a GRPO rollout).
    processors = LogitsProcessorList([SuppressTokens(vision_token_ids(bundle))])
    if not greedy:
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        if float(cfg.temperature) != 1.0:
            processors.append(TemperatureLogitsWarper(float(cfg.temperature)))
        if float(cfg.top_p) < 1.0:
            processors.append(TopPLogitsWarper(float(cfg.top_p)))
        processors.append(CategoricalDraw())
    gen_kwargs = dict(
        max_new_tokens=int(cfg.max_new_tokens),
        do_sample=False,
        num_beams=1,
        num_return_sequences=1,
        eos_token_id=stops,
        pad_token_id=collate.pad_token_id,
        use_cache=True,
        # Explicit, so a checkpoint's generation_config.json (top_k, repetition_penalty, temperature, ...)
        # cannot change the method's sampling; the neutral values raise no "ignored flag" warnings.
        repetition_penalty=1.0,
        typical_p=1.0,
        no_repeat_ngram_size=0,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        logits_processor=processors,
    )

    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    bs = int(cfg.batch_size)
    starts = list(range(0, len(order), bs))
    if cfg.lockstep:
        gen_kwargs["synced_gpus"] = True
        pad = prompts[0] if prompts else pad_prompt
        extra_calls = _lockstep_batches(len(starts), device) - len(starts)
        if extra_calls and pad is None:
            raise UrtError("lockstep generation: this rank has no prompts and no pad_prompt to keep the "
                           "sharded model's collectives in step with the other ranks")
        starts += [None] * extra_calls
    results: list[list[Completion] | None] = [None] * len(prompts)
    bar = _progress(len(prompts), desc, progress)
    was_training = model.training
    model.eval()
    cuda = [device] if device.type == "cuda" else []
    try:
        # no_grad under lockstep: FSDP2's all-gathered parameters are not inference tensors
        grad_off = torch.no_grad() if cfg.lockstep else torch.inference_mode()
        with torch.random.fork_rng(devices=cuda), grad_off:
            torch.manual_seed(int(cfg.seed))
            for start in starts:
                idx = order[start:start + bs] if start is not None else []
                shared = copies > 1 and cfg.shared_prefill and _SHARED_PREFILL.get(type(model), True)
                rows = [prompts[i] if idx else pad for i in (idx or [None]) for _ in range(1 if shared else copies)]
                batch = collate(rows)
                inputs = to_device(model_inputs(batch), device, dtype)
                if visual_cache is not None:
                    inputs = visual_cache.inputs_for(model, rows, inputs)
                width = int(inputs["input_ids"].shape[1])
                if stop_rows is not None:  # rows are each prompt's `copies` samples, in order, on every path
                    gen_kwargs["stopping_criteria"] = StoppingCriteriaList(
                        [_StopRows(stop_rows, [i for i in idx for _ in range(copies)])])
                try:
                    out = (_generate_shared_prefill(model, inputs, copies, gen_kwargs, cfg.preallocate)
                           if shared else None)
                    if out is None:
                        if shared:  # this model's cache cannot be repeated: repeat the prompts instead
                            rows = [p for p in rows for _ in range(copies)]
                            inputs = to_device(model_inputs(collate(rows)), device, dtype)
                            if visual_cache is not None:
                                inputs = visual_cache.inputs_for(model, rows, inputs)
                        cache = preallocated_cache(model, width + int(cfg.max_new_tokens)) if cfg.preallocate else None
                        extra = {} if cache is None else {cache_kwarg(): cache}
                        out = model.generate(**inputs, **gen_kwargs, **extra)
                except UrtError:
                    raise
                except (ValueError, RuntimeError) as err:
                    raise UrtError(f"generation failed for prompts {[prompts[i].key for i in idx]}: "
                                   f"{type(err).__name__}: {err}") from err
                if not idx:  # a padding call: only the collectives mattered
                    continue
                new = out[:, width:].tolist()
                for k, i in enumerate(idx):
                    prefix = prompts[i].meta.get("assistant_prefix", "") or ""
                    mine = [completion_of(seq, stops, tok, prefix) for seq in new[k * copies:(k + 1) * copies]]
                    results[i] = mine * n if greedy else mine
                if bar is not None:
                    bar[0].advance(bar[1], len(idx))
    finally:
        if bar is not None:
            bar[0].stop()
        if was_training:
            model.train()
    return results  # type: ignore[return-value]
