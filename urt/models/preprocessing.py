"""The preprocessing a model was trained with travels with its exported folder.

Training fits every image into the data module's pixel budget (`data.min_pixels`/`max_pixels`, per video frame
`data.video_min_pixels`/`video_max_pixels`) before the processor sees it, and samples `data.frames` frames per
video. A folder written by a training stage (`run_dir/hf/*`) carries both, so that what loads it sees inputs
the way training did:

* the processor's own pixel bounds (Qwen-style `size = {shortest_edge: min pixels, longest_edge: max pixels}`
  of the image and video processors) are narrowed to the training budget, so plain transformers, `urt judge`,
  `urt serve` and `urt eval` resize an image the training never saw at its size (a 64-px image for a model
  trained on 112-px ones) into the trained range;
* `urt.json` records the budgets, the frame sampling and the optimizer step the folder holds; `urt judge`,
  `urt serve` and `urt eval` take their default frames per video from it (`exported_frames`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from urt.errors import UrtError

RECORD = "urt.json"
PIXEL_KEYS = ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels")
FRAME_KEYS = ("frames", "frame_sampling", "fps", "max_frames")


def training_preprocessing(data_cfg) -> dict | None:
    """The pixel budgets and frame sampling of a data config (`cfg.data`), None without one."""
    if data_cfg is None:
        return None
    get = data_cfg.get
    out = {k: get(k) for k in (*PIXEL_KEYS, *FRAME_KEYS)}
    for k in (*PIXEL_KEYS, "frames", "max_frames"):
        if out[k] is not None:
            out[k] = int(out[k])
    if out["fps"] is not None:
        out["fps"] = float(out["fps"])
    return out


def _narrowed(proc, lo: int | None, hi: int | None) -> bool:
    """Narrow a Qwen-style (image or video) processor's pixel bounds to [lo, hi]; whether it has such bounds."""
    size = getattr(proc, "size", None)
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    p_lo, p_hi = get("shortest_edge", None), get("longest_edge", None)
    if size is None or p_lo is None or p_hi is None:
        return False  # fixed-size processors (LLaVA-OneVision's tiles) have no pixel budget to carry
    new_lo = max(int(p_lo), int(lo)) if lo is not None else int(p_lo)
    new_hi = min(int(p_hi), int(hi)) if hi is not None else int(p_hi)
    if new_lo > new_hi:  # the training budget lies outside the processor's range: the processor's bound wins
        new_lo = new_hi
    proc.size = {"shortest_edge": new_lo, "longest_edge": new_hi}
    for attr, v in (("min_pixels", new_lo), ("max_pixels", new_hi)):
        if getattr(proc, attr, None) is not None:
            setattr(proc, attr, v)
    return True


def export_bundle(bundle, preprocessing: dict | None):
    """`bundle` with a copy of its processor whose pixel bounds are the training budget (the training
    processor itself is left alone: it keeps encoding the run's samples)."""
    if not preprocessing or not any(preprocessing.get(k) is not None for k in PIXEL_KEYS):
        return bundle
    from urt.models.bundle import ModelBundle

    processor = copy.deepcopy(bundle.processor)
    ip, vp = getattr(processor, "image_processor", None), getattr(processor, "video_processor", None)
    if ip is not None:
        _narrowed(ip, preprocessing.get("min_pixels"), preprocessing.get("max_pixels"))
    if vp is not None:
        _narrowed(vp, preprocessing.get("video_min_pixels"), preprocessing.get("video_max_pixels"))
    return ModelBundle(model=bundle.model, processor=processor, family=bundle.family)


def write_export_record(folder: str | Path, *, step: int, preprocessing: dict | None) -> None:
    rec = {"urt_export": 1, "global_step": int(step), "preprocessing": preprocessing or {}}
    (Path(folder) / RECORD).write_text(json.dumps(rec, indent=1) + "\n")


def read_export_record(folder: str | Path) -> dict | None:
    """A folder's `urt.json`, or None (a folder urt did not train, or from before it was written)."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UrtError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(rec, dict):
        raise UrtError(f"{path}: expected a JSON object, got {type(rec).__name__}")
    return rec


def exported_step(folder: str | Path) -> int | None:
    """The optimizer step a complete export in `folder` holds (None: no folder, or no record of it)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return None
    rec = read_export_record(folder)
    return int(rec["global_step"]) if rec and "global_step" in rec else None


def exported_frames(model: Any, default: int = 8) -> int:
    """Frames per video a model was trained with (its folder's urt.json), else `default`."""
    if model is None or not isinstance(model, (str, Path)) or not Path(str(model)).is_dir():
        return default
    rec = read_export_record(model) or {}
    frames = (rec.get("preprocessing") or {}).get("frames")
    return int(frames) if frames else default
