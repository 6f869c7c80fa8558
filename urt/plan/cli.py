"""`urt plan [OVERRIDES...]`: the memory plan of a stage or a pipeline (urt.plan), before anything is loaded."""

from __future__ import annotations

import argparse


def _plan(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from urt.config import compose_config
    from urt.plan import GiB, check, model_sizes, plan_config, stage_configs, table

    cfg = compose_config(args.overrides)
    total = int(args.gpu_memory * GiB)
    plans, sizes = [], {}
    for label, stage_cfg, base in stage_configs(cfg, args.overrides):
        mc = OmegaConf.to_container(stage_cfg.model, resolve=True)
        mc["name_or_path"] = args.model or base or mc["name_or_path"]
        key = repr(sorted((k, repr(v)) for k, v in mc.items()))  # one meta model per model setting
        if key not in sizes:
            sizes[key] = model_sizes(mc)
        plan = plan_config(stage_cfg, label, total, args.gpus, model=mc["name_or_path"], sizes=sizes[key])
        plan.host_node_bytes = int(args.host_memory * GiB) if args.host_memory else None
        plans.append(plan)
    name = cfg.get("experiment") or ", ".join(p.label for p in plans)
    print(f"memory plan: {name} ({args.gpus} GPU(s) of {args.gpu_memory:g} GiB where trainer.devices=auto)")
    print(table(plans))
    if args.check:
        check(plans)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="memory per GPU of a stage or pipeline (weights, gradients, optimizer, reference, activations, "
             "KV cache, peak) before anything is loaded",
        description="Print, per rank and per training stage, the bytes each part needs and the peak, against "
                    "--gpu-memory, from the model's config alone (a local folder's, the Hugging Face cache's, "
                    "or the released sizes' shipped with urt); name the strategy, micro-batch and generation "
                    "batch that fit. Takes the overrides of urt train / urt pipeline. docs/scaling.md",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=paper/qwen2_5_vl_7b/pipeline")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs where trainer.devices=auto (default 8)")
    p.add_argument("--host-memory", type=float, default=None,
                   help="GiB of host memory per node to check the host columns against (default: not checked)")
    p.add_argument("--model", default=None, help="plan with this checkpoint's config (a hub id, folder or "
                                                 "released name) instead of model.name_or_path")
    p.add_argument("--check", action="store_true", help="exit with an error when a stage does not fit")
    p.set_defaults(func=_plan)
