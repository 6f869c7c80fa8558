"""benchmarks/mfu_cuda.py (the CUDA MFU benchmark): its FLOP model on hand-computed cases, its imports on a
bare machine (no lightning, hydra, webdataset, wandb, av, rich, peft; urt not installed), and an end-to-end
CPU run of the tiny configuration."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mfu_cuda.py"
BARE_MACHINE_MISSING = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "webdataset", "wandb", "av", "rich",
                        "peft")


@pytest.fixture(scope="module")
def mfu():
    spec = importlib.util.spec_from_file_location("mfu_cuda", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mfu_cuda"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("mfu_cuda", None)


def test_lm_flops_hand_computed(mfu):
    d = mfu.LMDims(hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)
    # q 4x4, k and v 4x2 each, o 4x4, MLP 3 x 4x8
    assert d.layer_matmul_params == 16 + 8 + 8 + 16 + 96 == 144
    f = mfu.lm_forward_flops(d, [3, 2], logit_positions=2)
    assert f["decoder_matmul"] == 2 * 144 * 1 * 5 == 1440
    # causal score entries per sequence: 3*4/2 + 2*3/2 = 9; 2 matmuls * 2 FLOPs * heads 2 * head_dim 2 = 16
    assert f["attention"] == 16 * 9 == 144
    assert f["lm_head"] == 2 * 4 * 10 * 2 == 160
    assert f["total"] == 1744
    # the packed total (5 tokens as one sequence: 15 entries) would over-count attention
    assert mfu.attention_flops(1, 2, 2, [5]) == 240 != f["attention"]
    assert mfu.attention_flops(1, 2, 2, [3, 2], causal=False) == 16 * 13


def test_vision_flops_hand_computed(mfu):
    v = mfu.VisionDims(hidden=4, depth=2, heads=2, intermediate=6, patch=14, temporal_patch=2, merge=2,
                       in_channels=3, out_hidden=8, window=56, full_blocks=(1,))
    assert v.patch_embed_params == 3 * 2 * 14 * 14 * 4 == 4704
    assert v.block_matmul_params == 4 * 12 + 16 + 3 * 4 * 6 == 136
    assert v.merger_matmul_params == 16 * 16 + 16 * 8 == 384
    f = mfu.vision_forward_flops(v, [(1, 8, 12)])
    # 96 patches; windows of 56px = 2 merged units a side: merged grid 4x6 -> 6 windows of 16 patches
    assert f["patches"] == 96
    assert f["matmul"] == 2 * (4704 + 136 * 2) * 96 + 2 * 384 * 96 // 4 == 955392 + 18432
    # head_dim 2: 4 * heads * hd * (full block: 96^2 + window block: 6 * 16^2)
    assert f["attention"] == 4 * 2 * 2 * (96 ** 2 + 6 * 16 ** 2) == 172032
    # partial windows: merged grid 3x3 -> windows of 2x2, 2x1, 1x2, 1x1 merged units = 16, 8, 8, 4 patches
    g = mfu.vision_forward_flops(v, [(1, 6, 6)])
    assert g["attention"] == 16 * (36 ** 2 + 16 ** 2 + 8 ** 2 + 8 ** 2 + 4 ** 2)


def test_flop_model_matches_the_instantiated_tiny_model(mfu):
    import torch
    import transformers

    tok = mfu.U.load_tiny_tokenizer("qwen2_5_vl")
    cfg = mfu.model_config(tok, tiny=True, layers=1)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(cfg)
    lm, vis = mfu.LMDims.from_config(cfg.text_config), mfu.VisionDims.from_config(cfg.vision_config)
    mfu.check_flop_model(model, lm, vis)  # raises SystemExit on a mismatch


def test_3b_config_is_qwen2_5_vl_3b(mfu):
    tok = mfu.U.load_tiny_tokenizer("qwen2_5_vl")
    cfg = mfu.model_config(tok)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size) == (2048, 36, 16, 2, 11008, 151936)
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size, v.window_size,
            list(v.fullatt_block_indexes)) == (32, 1280, 16, 3420, 2048, 112, [7, 15, 23, 31])
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") < t.vocab_size
    lm = mfu.LMDims.from_config(t)
    # 36 x 77.1M decoder matmul weights + 311M tied embedding/lm_head ~ Qwen2.5-VL-3B's 3.09B LM
    assert lm.layer_matmul_params * 36 + 2048 * 151936 == pytest.approx(3.09e9, rel=0.01)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table(mfu, name, peak):
    assert mfu.peak_tflops_for(name) == peak


def _bare_import(tmp_path: Path, extra_blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Import the script in a fresh interpreter where the bare GPU machine's missing packages cannot be
    found and urt is not installed (the editable-install finder removed, cwd elsewhere).

    Every finder on sys.meta_path is wrapped so that it answers None for the blocked names: `import x` then
    raises ModuleNotFoundError (an ImportError) and `importlib.util.find_spec("x")` returns None, exactly as
    on a machine without them (a finder that raised ImportError from find_spec would also break the
    availability probes of transformers / accelerate, which a real absence answers with None)."""
    blocked = BARE_MACHINE_MISSING + extra_blocked
    code = textwrap.dedent(f"""
        import importlib.util, sys
        BLOCKED = {blocked!r}

        class Hide:
            def __init__(self, inner):
                self.inner = inner

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    return None
                find = getattr(self.inner, "find_spec", None)
                return None if find is None else find(name, path, target)

            def __getattr__(self, attr):
                return getattr(self.inner, attr)

        def editable(f):
            return "__editable__" in (getattr(f, "__module__", "") or "") + type(f).__module__

        for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
            del sys.modules[name]
        sys.meta_path[:] = [Hide(f) for f in sys.meta_path if not editable(f)]
        sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in (getattr(h, "__module__", "") or "")]
        sys.path[:] = [p for p in sys.path if p not in ("", ".", {str(ROOT)!r})]
        sys.path_importer_cache.clear()
        for name in BLOCKED:
            assert importlib.util.find_spec(name) is None, name
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise AssertionError(name + " still importable")
        assert importlib.util.find_spec("urt") is None, "urt still importable: not a bare machine"
        spec = importlib.util.spec_from_file_location("mfu_cuda", {str(SCRIPT)!r})
        mod = importlib.util.module_from_spec(spec)
        sys.modules["mfu_cuda"] = mod
        spec.loader.exec_module(mod)
        assert mod.U.policy_loss.__module__ == "urt.rl.objective"
        assert mod.U.PackedCollator.__module__ == "urt.data.collate"
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("IMPORT_OK", sys.modules["urt"].__file__)
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_imports_on_a_bare_gpu_machine(tmp_path):
    proc = _bare_import(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"IMPORT_OK {ROOT / 'urt' / '__init__.py'}" in proc.stdout


def test_imports_without_pillow_or_torchvision(tmp_path):
    proc = _bare_import(tmp_path, ("PIL", "torchvision"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"IMPORT_OK {ROOT / 'urt' / '__init__.py'}" in proc.stdout


@pytest.mark.slow
def test_tiny_cpu_run_end_to_end(tmp_path):
    out = tmp_path / "mfu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--layers", "1", "--steps", "1", "--warmup", "1",
         "--json-out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    res = json.loads(last)
    assert res == json.loads(out.read_text())
    for key in ("device", "device_name", "attn_implementation", "dtype", "grad_ckpt", "model", "peak_tflops",
                "check", "check_pass", "sft", "grpo", "seq_len", "batch_tokens", "targets_mfu"):
        assert key in res, key
    assert res["dtype"] == "float32" and res["grad_ckpt"] is True
    sdpa = res["check"]["sdpa"]
    assert sdpa["pass"] and sdpa["max_abs_dlogit"] <= 1e-4 and sdpa["max_abs_dlogp"] <= 1e-4
    assert sdpa["negative_control_dlogit"] > 100 * sdpa["tol_logit"]  # the check does see a leak
    assert res["check_pass"] is True
    assert "skipped" in res["check"]["flash_attention_2"]
    for phase in ("sft", "grpo"):
        r = res[phase]
        for key in ("step_time_s", "tokens", "tokens_per_s", "model_flops_per_step", "hardware_flops_per_step",
                    "tflops", "mfu", "hfu", "flops"):
            assert key in r, (phase, key)
        assert r["tokens_per_s"] > 0 and r["model_flops_per_step"] > 0
        assert r["hardware_flops_per_step"] > r["model_flops_per_step"]  # grad ckpt recompute
        assert r["mfu"] is None  # no peak on a CPU
    assert res["grpo"]["sequences"] % res["grpo"]["group_size"] == 0
    assert "PASS" in proc.stdout and "MFU" in proc.stdout


def test_frozen_vision_tower_gets_no_backward_under_grad_ckpt(mfu):
    """transformers' checkpointing hooks make the frozen vision tower's output require grad (so it is
    recomputed and back-propagated); the script removes those hooks and the LM still gets gradients."""
    import torch
    import transformers

    tok = mfu.U.load_tiny_tokenizer("qwen2_5_vl")
    cfg = mfu.model_config(tok, tiny=True, layers=1)
    b = mfu.Builder(tok, cfg, 112)
    v = b.visual()

    def vision_out_requires_grad(drop: bool) -> bool:
        torch.manual_seed(0)
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(cfg)
        model.model.visual.requires_grad_(False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if drop:
            mfu.drop_input_grad_hooks(model)
        model.train()
        out = model.model.get_image_features(v["pixel_values"], v["image_grid_thw"])
        t = getattr(out, "pooler_output", out)
        t = torch.cat(list(t)) if isinstance(t, (list, tuple)) else t
        if drop:  # the language model still trains through its checkpointed layers
            seq = b.sft_sample("s", b.prompt_len + 8)
            p = mfu.prepare(mfu.U.PackedCollator("qwen2_5_vl", model.config, tok.pad_token_id), [seq],
                            torch.device("cpu"), torch.float32)
            loss = torch.nn.functional.cross_entropy(mfu.selected_logits(model, p.inputs, p.keep), p.targets)
            loss.backward()
            assert model.model.language_model.layers[0].mlp.down_proj.weight.grad is not None
            assert all(q.grad is None for q in model.model.visual.parameters())
        return t.requires_grad

    assert vision_out_requires_grad(drop=False)  # transformers' default: the frozen tower records a graph
    assert not vision_out_requires_grad(drop=True)
