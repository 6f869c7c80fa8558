"""Evaluation: metrics (torchmetrics), benchmark scoring, the generate-and-score runner, `urt eval`.

    from urt.eval import load_items, read_predictions, score, write_results, run_eval

results.json (schema "urt.eval/1"):

    schema, benchmark (name or null for shards), mode ("cot" | "implicit"),
    benchmark_file | shards, predictions (path), run (model runs: model, family, order, seed,
        max_new_tokens, limit, generated_now, reused, ignored_generations),
    complete (no item missing),
    counts: {items, items_predicted, judgements, orders: {original, swapped}, both_orders,
             missing, missing_keys[:20], unknown, unknown_keys[:20]},
    accuracy (over judgements = predicted items x orders), correct, accuracy_missing_as_wrong,
    format_valid_rate, answer_parsed_rate,
    tau, diff, tau_diff_counts, tau_note, by_vote       (GenAI-Bench image/video, VideoGen-RewardBench;
                                                         tau null in CoT mode),
    vl_rewardbench: {official | official_script: {groups: {general|hallucination|reasoning:
                     {n, correct, accuracy}}, overall, macro}, note}   (VL-RewardBench),
    by_task: {task: {n, correct, accuracy, format_valid_rate[, tau, diff]}},
    position: {pred_1_rate, pred_2_rate, pred_tie_rate, pred_none_rate, gold_1_rate, gold_2_rate,
               gold_tie_rate, consistency: {pairs, consistent, rate}}

Rates are fractions in [0, 1]; null where nothing was counted. results.md shows percentages and "–".
"""

from urt.lazy import lazy_exports

# Resolved on first use: the metrics import torchmetrics (~9 s), which `urt --help` never needs.
__getattr__, __all__ = lazy_exports(__name__, {
    "urt.eval.benchmarks": ("BENCHMARKS", "MODES", "Item", "Prediction", "load_items", "load_shard_items",
                            "read_predictions", "score"),
    "urt.eval.metrics": ("GroupedAccuracy", "PairwiseAccuracy", "PositionConsistency", "PositionStats", "Rate",
                         "TauDiff"),
    "urt.eval.report": ("markdown", "write_results"),
    "urt.eval.runner": ("ORDERS", "run_eval", "swap_coin"),
})
