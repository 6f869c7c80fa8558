"""RewardDataModule: batches, position debiasing, determinism, exact resume, and counted skips."""

import itertools

import numpy as np
import pytest
import torch

from data_fixtures import four_task_samples, raw_sample, vqa_image, write_raw_shard
from urt.data.datamodule import RewardDataModule, swap_decision
from urt.data.encode import OverlongSample
from urt.data.schema import TASKS, Sample
from urt.data.shards import ShardError, write_shards
from urt.errors import UrtError

N_PER_TASK = 5


def _samples() -> list[Sample]:
    base = four_task_samples(video_data=False)
    out = []
    for j in range(N_PER_TASK):
        for s in base:
            label = 1 + (j % 2)
            cot = f"<think>x</think>\n<answer>{'Image' if 'image' in s.task else 'Video'} {label} is better</answer>"
            visuals = s.visuals
            if s.task == "image_generation":  # distinct images per pair, so a swap is visible
                visuals = [vqa_image(2 * j + 1), vqa_image(2 * j + 2)]
            out.append(Sample(f"{s.task}-{j}", s.task, label, visuals, caption=s.caption, question=s.question,
                              answers=s.answers, cot=cot, source="fixture"))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("dm_shards")
    samples = _samples()
    write_shards(samples, d, maxcount=4)  # 20 samples in 5 shards
    return str(d), {s.key: s for s in samples}


@pytest.fixture(scope="module")
def qwen():
    from urt.models import load_model

    return load_model("tiny", "qwen2_5_vl")


def _dm(shards, bundle, **kw):
    opts = dict(batch_size=3, target="answer", order="keep", shuffle_buffer=8, max_length=4096, seed=0,
                frames=4, on_error="skip")
    opts.update(kw)
    return RewardDataModule(train_shards=[shards[0]], val_shards=[shards[0]], bundle=bundle, **opts)


def _keys(batches):
    return [k for b in batches for k in b["keys"]]


def test_padded_batches(shards, qwen):
    dm = _dm(shards, qwen)
    batches = list(dm.train_dataloader())
    assert sorted(_keys(batches)) == sorted(shards[1])  # every sample once, nothing skipped
    assert dm.skip_stats.ok == 20 and dm.skip_stats.total_skipped == 0
    b = batches[0]
    B, L = b["input_ids"].shape
    assert B == 3 and b["attention_mask"].shape == (B, L) and b["labels"].shape == (B, L)
    assert b["mm_token_type_ids"].shape == (B, L)
    assert len(b["keys"]) == len(b["labels_judgement"]) == B
    assert "_stream" not in b and "pixel_values" in b
    assert {len(x["keys"]) for x in batches[:-1]} == {3}
    assert set(itertools.chain(*(x["tasks"] for x in batches))) == set(TASKS)


def test_packed_batches_respect_token_budget(shards, qwen):
    dm = _dm(shards, qwen, collate="packed", max_tokens_per_batch=1400, batch_size=8)
    batches = list(dm.train_dataloader())
    assert sorted(_keys(batches)) == sorted(shards[1])
    for b in batches:
        T = b["input_ids"].shape[1]
        assert b["input_ids"].shape == (1, T) and b["labels"].shape == (1, T)
        assert b["position_ids"].shape == (4, 1, T)
        assert sum(b["seq_lens"]) == T <= 1400
        assert b["cu_seqlens"].tolist()[-1] == T and "attention_mask" not in b
    assert any(len(b["keys"]) > 1 for b in batches)


def test_order_both_yields_each_pair_in_both_orders(shards, qwen):
    dm = _dm(shards, qwen, batch_size=1, val_order="both")
    seen: dict[str, list] = {}
    for b in dm.val_dataloader():
        seen.setdefault(b["keys"][0], []).append(b)
    assert sorted(seen) == sorted(shards[1]) and all(len(v) == 2 for v in seen.values())
    tok = qwen.tokenizer
    for key, (a, b) in seen.items():
        s = shards[1][key]
        assert a["labels_judgement"] == [s.label] and b["labels_judgement"] == [3 - s.label]
        if s.task == "image_generation":  # the two images trade places in the visual tensor
            half = a["pixel_values"].shape[0] // 2
            assert torch.equal(a["pixel_values"][:half], b["pixel_values"][half:])
            assert torch.equal(a["pixel_values"][half:], b["pixel_values"][:half])
            assert not torch.equal(a["pixel_values"], b["pixel_values"])
        elif s.task in ("image_understanding", "video_understanding"):  # the answers trade places
            ta, tb = tok.decode(a["input_ids"][0]), tok.decode(b["input_ids"][0])
            a1, a2 = s.answers
            assert ta.index(a1) < ta.index(a2) and tb.index(a2) < tb.index(a1)
            assert torch.equal(a["pixel_values_videos" if "video" in s.task else "pixel_values"],
                               b["pixel_values_videos" if "video" in s.task else "pixel_values"])
    assert dm.eval_skip_stats["val"].ok == 40


def test_order_random_reproducible_and_balanced(shards, qwen):
    runs = []
    for _ in range(2):
        dm = _dm(shards, qwen, order="random")
        runs.append([(k, lab) for b in dm.train_dataloader() for k, lab in zip(b["keys"], b["labels_judgement"])])
    assert runs[0] == runs[1]
    swapped = sum(lab != shards[1][k].label for k, lab in runs[0])
    assert 3 <= swapped <= 17  # of 20
    share = np.mean([swap_decision(0, 0, f"key-{i}") for i in range(2000)])
    assert 0.45 < share < 0.55
    # the decision depends on (seed, epoch, key) only, not on workers
    dm2 = _dm(shards, qwen, order="random", num_workers=2)
    assert sorted(_pairs(dm2)) == sorted(runs[0])


def _pairs(dm):
    return [(k, lab) for b in dm.train_dataloader() for k, lab in zip(b["keys"], b["labels_judgement"])]


def test_tasks_filter(shards, qwen):
    dm = _dm(shards, qwen, tasks=["image_understanding", "video_generation"])
    keys = _keys(dm.train_dataloader())
    assert sorted(keys) == sorted(k for k, s in shards[1].items()
                                  if s.task in ("image_understanding", "video_generation"))
    assert dm.position["excluded_by_task"] == 10 and dm.skip_stats.total_skipped == 0
    with pytest.raises(UrtError, match="unknown task"):
        RewardDataModule(train_shards=[shards[0]], tasks=["image_gen"])


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_order(shards, qwen, workers):
    a = _keys(_dm(shards, qwen, num_workers=workers).train_dataloader())
    b = _keys(_dm(shards, qwen, num_workers=workers).train_dataloader())
    c = _keys(_dm(shards, qwen, num_workers=workers, seed=1).train_dataloader())
    assert a == b and sorted(a) == sorted(shards[1])
    assert c != a


def test_one_worker_gives_the_main_processs_batches(shards, qwen):
    """num_workers 0 and 1 read one stream: the same batches, epoch after epoch (a run may switch between them)."""
    main, worker = _dm(shards, qwen, num_workers=0, order="random"), _dm(shards, qwen, num_workers=1, order="random")
    for _ in range(2):
        a, b = list(main.train_dataloader()), list(worker.train_dataloader())
        assert len(a) == len(b) and all(_same_batch(x, y) for x, y in zip(a, b))


def test_epochs_reshuffle(shards, qwen):
    dm = _dm(shards, qwen)
    e0 = _keys(dm.train_dataloader())
    e1 = _keys(dm.train_dataloader())
    assert dm.position["epoch"] == 1 and sorted(e0) == sorted(e1) and e0 != e1


@pytest.mark.parametrize("workers,kw", [
    (0, dict(order="both", batch_size=3)),  # the cut falls between the two orders of a pair
    (2, dict(order="random", collate="packed", max_tokens_per_batch=1400, batch_size=8)),
    (2, dict(order="both", batch_size=2)),
    (0, dict(order="random", batch_size=2, group_by_length=3)),  # cuts inside a length-sorted window
    (2, dict(order="both", batch_size=2, group_by_length=2, drop_last=True)),
])
def test_resume_continues_the_same_stream(shards, qwen, workers, kw):
    whole = _dm(shards, qwen, num_workers=workers, **kw)
    full = [b["keys"] for b in whole.train_dataloader()]
    for k in (1, 3):
        dm = _dm(shards, qwen, num_workers=workers, **kw)
        head = [b["keys"] for b in itertools.islice(dm.train_dataloader(), k)]
        state = dm.state_dict()
        assert head == full[:k] and state["batches"] == k
        state = torch.utils._pytree.tree_map(lambda x: x, state)  # a plain, picklable dict
        dm2 = _dm(shards, qwen, num_workers=workers, **kw)
        dm2.load_state_dict(state)
        rest = [b["keys"] for b in dm2.train_dataloader()]
        assert rest == full[k:], (k, rest, full)
        assert dm2.skip_stats.ok == sum(len(x) for x in full)
        assert dm2.skip_stats.skipped == whole.skip_stats.skipped  # e.g. dropped_last, counted once
    with pytest.raises(UrtError, match="num_workers"):
        _dm(shards, qwen, num_workers=workers + 1, **kw).load_state_dict(state)


def _padded_tokens(batches) -> int:
    return sum(b["input_ids"].numel() for b in batches)


def test_group_by_length_sorts_windows_and_keeps_every_sample(shards, qwen):
    plain = list(_dm(shards, qwen, batch_size=2, shuffle_buffer=20).train_dataloader())
    grouped = list(_dm(shards, qwen, batch_size=2, shuffle_buffer=20, group_by_length=5).train_dataloader())
    again = list(_dm(shards, qwen, batch_size=2, shuffle_buffer=20, group_by_length=5).train_dataloader())
    assert sorted(_keys(grouped)) == sorted(shards[1]) and _keys(grouped) == _keys(again)
    assert _padded_tokens(grouped) < _padded_tokens(plain)
    # one window of 10 samples: its 5 batches cover the sorted lengths in consecutive pairs
    for window in (grouped[:5], grouped[5:]):
        lens = sorted(n for b in window for n in b["seq_lens"])
        assert sorted(tuple(sorted(b["seq_lens"])) for b in window) == [tuple(lens[j:j + 2]) for j in range(0, 10, 2)]
    assert [b["seq_lens"] for b in grouped[:5]] != sorted(b["seq_lens"] for b in grouped[:5])  # shuffled order
    # the window's samples come from the same stretch of the stream as without grouping
    assert sorted(_keys(grouped[:5])) == sorted(_keys(plain[:5]))


def test_group_by_length_drop_last_counts_the_short_batch(shards, qwen):
    dm = _dm(shards, qwen, batch_size=3, group_by_length=4, drop_last=True)  # windows of 12 and 8 samples
    keys = _keys(dm.train_dataloader())
    assert len(keys) == 18 and len(set(keys)) == 18
    assert dm.skip_stats.ok == 18 and dm.skip_stats.skipped == {"dropped_last": 2}
    with pytest.raises(UrtError, match="group_by_length"):
        _dm(shards, qwen, group_by_length=-1)
    with pytest.raises(UrtError, match="group_by_length=4 applies to padded batches"):
        _dm(shards, qwen, group_by_length=4, collate="packed")


def test_overlong_filtered_counted_or_raised(shards, qwen):
    lengths = {k: n for b in _dm(shards, qwen).train_dataloader() for k, n in zip(b["keys"], b["seq_lens"])}
    limit = sorted(lengths.values())[9]
    short = sorted(k for k, n in lengths.items() if n <= limit)
    dm = _dm(shards, qwen, max_length=limit)
    assert sorted(_keys(dm.train_dataloader())) == short  # filtered before collation, never truncated
    assert dm.skip_stats.skipped == {"overlong": 20 - len(short)} and dm.skip_stats.ok == len(short)
    assert f"overlong: {20 - len(short)}" in dm.summary()
    dm = _dm(shards, qwen, max_length=10, on_error="raise", shuffle=False)
    with pytest.raises(OverlongSample, match="longer than max_length=10") as err:
        list(dm.train_dataloader())
    assert err.value.key in shards[1]


def test_corrupt_samples_skipped_and_counted(shards, qwen, tmp_path):
    write_raw_shard(tmp_path / "bad-000000.tar", [
        raw_sample("good-raw"),
        raw_sample("bad-img", {"v0.png": b"not a png"}),
        raw_sample("bad-json", {"json": b"{nope"}),
        raw_sample("no-image", {"v1.png": None}),
    ])
    dm = _dm(shards, qwen, num_workers=2)
    dm.train_shards = [shards[0], str(tmp_path / "bad-000000.tar")]
    keys = _keys(dm.train_dataloader())
    assert "good-raw" in keys and len(keys) == 21
    st = dm.skip_stats
    assert st.skipped == {"corrupt_image": 1, "bad_json": 1, "missing_member": 1} and st.ok == 21
    assert "corrupt_image" in dm.summary() and "bad-img" in str(st.examples["corrupt_image"])
    assert dm.history[-1]["skipped"] == dict(st.skipped)

    dm = _dm(shards, qwen, on_error="raise", shuffle=False)
    dm.train_shards = [str(tmp_path / "bad-000000.tar")]
    with pytest.raises(ShardError, match="bad-img"):
        list(dm.train_dataloader())


def test_cot_target_with_swaps_is_counted_not_silent(shards, qwen):
    with pytest.warns(UserWarning, match="swapped samples"):
        dm = _dm(shards, qwen, target="cot", order="both")
    keys = _keys(dm.train_dataloader())
    assert len(keys) == 20 and dm.skip_stats.skipped == {"encode_error": 20}


def test_llava_onevision_padded_and_packed(shards):
    from urt.models import load_model

    bundle = load_model("tiny", "llava_onevision")
    for collate in ("padded", "packed"):
        dm = _dm(shards, bundle, collate=collate, max_tokens_per_batch=3000, tasks=["image_generation",
                                                                                  "image_understanding"])
        batches = list(dm.train_dataloader())
        assert sorted(_keys(batches)) == sorted(k for k, s in shards[1].items() if s.task.startswith("image"))
        b = batches[0]
        assert "pixel_values" in b and "image_sizes" in b
        if collate == "packed":
            assert b["input_ids"].shape[0] == 1 and b["position_ids"].shape == b["input_ids"].shape
        else:
            assert b["input_ids"].shape == b["attention_mask"].shape


def test_hydra_config_instantiates(shards, qwen):
    import hydra

    from urt.config import compose_config

    cfg = compose_config(["data=tiny_debug", f"data.train_shards={shards[0]}", f"data.val_shards={shards[0]}"])
    dm = hydra.utils.instantiate(cfg.data)
    assert isinstance(dm, RewardDataModule) and dm.order == "both"
    with pytest.raises(UrtError, match="attach"):
        dm.setup("fit")
    dm.attach(qwen)
    b = next(iter(dm.train_dataloader()))
    assert len(b["keys"]) == 2


def test_lightning_resume_sees_the_uninterrupted_batches(shards, qwen, tmp_path):
    """Through a real Trainer: checkpoint after 3 steps, resume, and the steps after the checkpoint get
    the same batches as the uninterrupted run (Lightning's one-batch prefetch is not counted)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, idx):
            assert "_stream" not in batch
            self.seen.append(tuple(batch["keys"]))
            return (self.w * 0).sum() + self.w.sum() ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer(steps, **kw):
        return L.Trainer(max_steps=steps, accelerator="cpu", logger=CSVLogger(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, **kw)

    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = dict(num_workers=2, order="random", batch_size=2)
    full = Probe()  # 10 batches per epoch: 8 steps stay inside epoch 0; a checkpoint after step 3
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer(8, callbacks=[ckpt]).fit(full, datamodule=_dm(shards, qwen, **kw))
    resumed = Probe()
    trainer(8).fit(resumed, datamodule=_dm(shards, qwen, **kw), ckpt_path=tmp_path / "ck" / "step=3.ckpt")
    assert len(full.seen) == 8 and resumed.seen == full.seen[3:]

    # a run stopped by max_steps and continued from its final checkpoint goes on with the same pass
    first = Probe()
    t = trainer(3)
    dm = _dm(shards, qwen, **kw)
    t.fit(first, datamodule=dm)
    assert dm.position["batches"] == 3 and first.seen == full.seen[:3]
    t.save_checkpoint(tmp_path / "end.ckpt")
    again = Probe()
    trainer(8).fit(again, datamodule=_dm(shards, qwen, **kw), ckpt_path=tmp_path / "end.ckpt")
    assert again.seen[:5] == full.seen[3:]


def _same_batch(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("order", ["keep", "random", "both"])
@pytest.mark.parametrize("workers", [0, 2])
def test_cache_encoded_gives_the_same_batches_encoding_once(shards, qwen, order, workers):
    """cache_encoded: three epochs give batch for batch the same tensors as without it, and each (pair,
    order) is encoded once; the epochs still reshuffle, and skips are counted in every epoch. With workers,
    they encode the first epoch and send the units to the main process, which reads the later epochs itself
    (playing the workers' round-robin): no encoding there but the overlong retries."""
    plain = _dm(shards, qwen, order=order, max_length=485, num_workers=workers)  # image-understanding pairs: overlong
    cached = _dm(shards, qwen, order=order, max_length=485, cache_encoded=True, num_workers=workers)
    calls = []  # encodings in the main process (a worker appends to its own copy)
    encoder = cached.encoder

    def counting(sample):
        calls.append((sample.key, bool(sample.meta.get("swapped"))))
        return encoder(sample)

    cached.encoder = counting
    epochs = []
    for epoch in range(3):
        want, got = list(plain.train_dataloader()), list(cached.train_dataloader())
        assert len(want) == len(got) and all(_same_batch(a, b) for a, b in zip(want, got)), epoch
        assert cached.skip_stats.skipped == plain.skip_stats.skipped and cached.skip_stats.skipped["overlong"] > 0
        epochs.append(_keys(got))
        if workers and epoch == 0:
            assert not calls and cached._encoded.units >= 15  # the worker's units arrived with its batches
    assert epochs[0] != epochs[1]  # reshuffled
    overlong = plain.skip_stats.skipped["overlong"]  # per epoch
    kept = {u for u in calls if not u[0].startswith("image_understanding")}
    if workers:  # main process: the overlong retries of epochs 2 and 3; (random: units new in a later epoch)
        assert len(calls) - len(kept) == 2 * overlong and (order == "random" or not kept)
        assert cached._encoded.units == 15 * (2 if order == "both" else 1) or order == "random"
        return
    # each kept (pair, order) encoded once; the overlong ones are tried (and counted) in every epoch
    assert len(calls) == len(kept) + 3 * overlong
    assert cached._encoded.units == len(kept)
    if order != "random":
        assert len(kept) == 15 * (2 if order == "both" else 1)


def test_cache_encoded_is_dropped_when_the_fit_ends(shards, qwen):
    """The cache serves the epochs of one fit: teardown("fit") (Lightning calls it at the end of fit) empties it,
    so a pipeline's next step does not carry the last one's encodings."""
    dm = _dm(shards, qwen, cache_encoded=True)
    list(dm.train_dataloader())
    assert dm._encoded
    dm.teardown("validate")
    assert dm._encoded
    dm.teardown("fit")
    assert len(dm._encoded) == 0 and dm._encoded.nbytes == 0


