"""The rollout log of a GRPO run: every rollout of every step, one row each, as
`run_dir/rollouts/step-NNNNNN.parquet` (rank 0 writes all ranks' rows) and, when a WandbLogger is attached,
a seeded sample of whole groups as a wandb Table under `rollouts/step_NNNNNN` (`urt.rollouts` reads both).

`RolloutLog` is a Lightning callback: the GRPO module leaves each step's `RolloutRecord` on itself
(`pl_module.rollout_record`) and the callback writes it at the end of the batch.

Columns: step, rank, prompt_key, group (unique within the step across ranks), sample (index in the group),
sample_key (`key#sample`), task, label, swapped (the pair was presented in swapped order; label is the
presented one), prompt (last user turn, no vision placeholders), completion, answer (the parsed `<answer>`
text), winner ("1"/"2"/"tie" parsed, else null), reward_<name> per reward (unweighted), reward (weighted
sum), advantage, completion_length (sampled tokens, the stop token included), truncated (hit
max_new_tokens without a stop token), kept (trained on). Slots generation left empty have no row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from lightning.pytorch.callbacks import Callback

from urt.rl.distributed import all_gather_objects

ROLLOUT_DIR = "rollouts"
ROLLOUT_TABLE_KEY = "rollouts/step_{step:06d}"  # the wandb Table of one rollout step


@dataclass
class RolloutRecord:
    """One GRPO step's rollouts on this rank, G slots per prompt laid out group by group."""

    step: int
    prompts: list             # Encoded prompts
    texts: list               # completion text per slot (None: left empty)
    ids: list                 # sampled completion ids per slot ([] when empty)
    truncated: list           # per slot: ended at max_new_tokens without a stop token
    scores: dict              # "rewards/<name>" and "reward": one value per slot
    advantages: torch.Tensor
    keep: torch.Tensor        # trained on
    valid: torch.Tensor
    answers: list             # parsed <answer> text per slot
    winners: list             # parsed winner per slot


def parsed_answers(texts: Sequence[str | None], tasks: Sequence[str]) -> tuple[list, list]:
    """(answer text, winner) of each completion by `urt.prompts.parse_output`: the `<answer>` content
    (None without one) and "1" / "2" / "tie" (None when the answer is not one of the task's strings)."""
    from urt.prompts import parse_output

    answers, winners = [], []
    for t, task in zip(texts, tasks):
        j = parse_output(t, task)
        answers.append(j.answer)
        winners.append(None if j.winner is None else str(j.winner))
    return answers, winners


def user_text(tokenizer, prompt, skip_ids: set[int]) -> str:
    """The last user turn of a prompt, vision placeholders removed (for the rollout table)."""
    ids = [i for i in prompt.input_ids.tolist() if i not in skip_ids]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    start = text.rfind("<|im_start|>user\n")
    if start < 0:
        return text
    text = text[start + len("<|im_start|>user\n"):]
    return text.split("<|im_end|>", 1)[0].strip()


def rollout_arrow_table(cols: dict[str, list]):
    """A pyarrow Table of rollout columns with stable types (so every step's parquet has one schema,
    also when a string column is all null in a step)."""
    import pyarrow as pa

    types = {"step": pa.int64(), "rank": pa.int64(), "group": pa.int64(), "sample": pa.int64(),
             "completion_length": pa.int64(), "truncated": pa.bool_(), "kept": pa.bool_(), "swapped": pa.bool_(),
             "advantage": pa.float64(), "reward": pa.float64()}
    out = {}
    for k, v in cols.items():
        t = types.get(k, pa.float64() if k.startswith("reward_") else pa.string())
        out[k] = pa.array(v, type=t)
    return pa.table(out)


def sample_table_rows(groups: Sequence[int], n: int, seed: str | int) -> list[int]:
    """Row indices for the per-step wandb Table: whole groups in a seeded random order until `n` rows
    (the last group possibly cut), returned in row order. n <= 0: none."""
    if n <= 0:
        return []
    rows_of: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        rows_of.setdefault(int(g), []).append(i)
    order = sorted(rows_of)
    random.Random(seed).shuffle(order)
    picked: list[int] = []
    for g in order:
        picked += rows_of[g]
        if len(picked) >= n:
            break
    return sorted(picked[:n])


def wandb_loggers(trainer) -> list:
    """The trainer's WandbLoggers (none without a trainer)."""
    if trainer is None:
        return []
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class RolloutLog(Callback):
    """Writes each GRPO step's `RolloutRecord` (see the module docstring). `out_dir` None: no parquet;
    `table_rows` 0: no wandb Table; both off: nothing is gathered."""

    def __init__(self, out_dir: str | Path | None, table_rows: int = 16, seed: int = 0):
        self.out_dir = Path(out_dir) if out_dir else None
        self.table_rows = int(table_rows or 0)
        self.seed = int(seed)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = getattr(pl_module, "rollout_record", None)
        if record is None:
            return
        pl_module.rollout_record = None
        self.write(trainer, pl_module, record)

    def columns(self, pl_module, r: RolloutRecord, rank: int) -> dict[str, list]:
        G, n = pl_module.G, len(r.texts)
        skip = set(pl_module.vision_ids)
        users = [user_text(pl_module.bundle.tokenizer, p, skip) for p in r.prompts]
        of = [r.prompts[i // G] for i in range(n)]
        cols: dict[str, list] = {
            "step": [r.step] * n, "rank": [rank] * n,
            "prompt_key": [p.key for p in of],
            "group": [i // G for i in range(n)], "sample": [i % G for i in range(n)],
            "sample_key": [f"{p.key}#{i % G}" for i, p in enumerate(of)],
            "task": [p.task for p in of], "label": [str(p.label) for p in of],
            "swapped": [bool((p.meta.get("sample_meta") or {}).get("swapped", False)) for p in of],
            "prompt": [users[i // G] for i in range(n)], "completion": [t or "" for t in r.texts],
            "answer": list(r.answers), "winner": list(r.winners),
        }
        for name, vals in r.scores.items():
            if name.startswith("rewards/"):
                cols[f"reward_{name.split('/', 1)[1]}"] = [float(v) for v in vals]
        cols["reward"] = [float(v) for v in r.scores["reward"]]
        cols["advantage"] = [float(a) for a in r.advantages]
        cols["completion_length"] = [len(x) for x in r.ids]
        cols["truncated"] = [bool(t) for t in r.truncated]
        cols["kept"] = [bool(k) for k in r.keep]
        if not bool(r.valid.all()):  # slots generation left empty have no row
            rows_at = [i for i, t in enumerate(r.texts) if t is not None]
            cols = {k: [v[i] for i in rows_at] for k, v in cols.items()}
        return cols

    def write(self, trainer, pl_module, r: RolloutRecord) -> None:
        tables = wandb_loggers(trainer) if self.table_rows > 0 else []
        if self.out_dir is None and not tables:
            return
        rank = pl_module.global_rank
        cols = self.columns(pl_module, r, rank)
        parts = all_gather_objects((cols, len(r.prompts)))  # a collective: every rank gets here
        if rank != 0:
            return
        merged: dict[str, list] = {k: [] for k in cols}
        offset = 0  # group ids: rank r's groups follow those of ranks < r
        for part, n_groups in parts:
            for k in cols:
                merged[k] += [g + offset for g in part[k]] if k == "group" else part[k]
            offset += n_groups
        if self.out_dir is not None:
            import pyarrow.parquet as pq

            self.out_dir.mkdir(parents=True, exist_ok=True)
            pq.write_table(rollout_arrow_table(merged), self.out_dir / f"step-{r.step:06d}.parquet")
        if tables:
            at = sample_table_rows(merged["group"], self.table_rows, f"urt-rollout-table:{self.seed}:{r.step}")
            names = list(merged)
            data = [[merged[k][i] for k in names] for i in at]
            for lg in tables:
                lg.log_table(key=ROLLOUT_TABLE_KEY.format(step=r.step), columns=names, data=data,
                             step=trainer.global_step)
