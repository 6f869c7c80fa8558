"""Shared builders for GRPO tests (tests/test_grpo.py, tests/test_rollout_logging.py): the prompt shards and
the composed tiny GRPO config."""

from __future__ import annotations

from data_fixtures import vqa_image
from urt.data.schema import Sample
from urt.data.shards import write_shards


def write_grpo_prompts(directory) -> str:
    """6 image-generation prompts (labels 1/2, no CoTs: GRPO needs none), 2 shards with index.json."""
    out = [Sample(f"ig-{j}", "image_generation", 1 + j % 2, [vqa_image(2 * j + 1), vqa_image(2 * j + 2)],
                  caption=f"picture {j}", source="fixture") for j in range(6)]
    write_shards(out, directory, maxcount=3)
    return str(directory)


def grpo_cfg(tmp_path, shards, *overrides, steps=1):
    """A tiny Qwen2.5-VL GRPO run on `shards` under `tmp_path`, G=3, 8 new tokens, checkpoint every step."""
    from urt.config import compose_config

    base = ["stage=grpo", "trainer=cpu", "logger=csv", "model=tiny_qwen2_5_vl", f"paths.root={tmp_path}",
            f"data.train_shards={shards}", "data.val_shards=null", "data.num_workers=0", "data.batch_size=2",
            "data.max_length=4096", "data.min_pixels=null", "data.max_pixels=12544", "data.shuffle_buffer=4",
            "data.on_error=raise", "data.order=random", f"trainer.max_steps={steps}", "stage.num_generations=3",
            "stage.max_new_tokens=8", "stage.micro_batch_size=4", "stage.checkpoint.every_n_steps=1",
            "optimizer.lr=1e-3", "scheduler=constant"]
    return compose_config(base + list(overrides))
