"""The edit guard's cumulative limits: a run of edits each just under the per-edit limit is
stopped when together they drift too far from the base, and a refused edit changes nothing."""

from __future__ import annotations

import math

import transformers as tf

from editors.patch import Patch
from editors.weight_state import WeightState
from service.engine.guard import EditGuard, GuardLimits

NO_LIMIT = math.inf


def test_edits_just_under_the_per_edit_limit_are_stopped_by_the_cumulative_one(
    tiny_model_dir, gpt2_tok
):
    model = tf.GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    weights = WeightState(model)
    limits = GuardLimits(
        max_perplexity_rise=NO_LIMIT,
        max_canary_changed=NO_LIMIT,
        max_canary_nll_rise=NO_LIMIT,
        max_delta_ratio=0.06,  # each edit below moves its matrix by 5 % of its norm
        max_entropy_drop=NO_LIMIT,
        max_total_perplexity_rise=NO_LIMIT,
        max_total_canary_changed=NO_LIMIT,
        max_total_canary_nll_rise=NO_LIMIT,
        max_total_delta_ratio=0.5,  # 1.05 ** 8 = 1.48 passes, 1.05 ** 9 = 1.55 does not
        max_total_entropy_drop=NO_LIMIT,
    )

    def on_base(work):
        undo = weights.snapshot()
        try:
            weights.restore([])
            return work()
        finally:
            weights.reset_to(undo)

    guard = EditGuard(model, gpt2_tok, limits, on_base)
    name = "transformer.h.2.mlp.c_proj.weight"
    outcomes = []
    for _ in range(20):
        checksum = weights.checksum()
        current = model.get_parameter(name).detach().float()
        report, _ = guard.check(Patch("scale", {name: 0.05 * current}), weights, checksum)
        assert report.figures["delta_ratio"] <= 0.0501  # every edit is under the per-edit limit
        outcomes.append(report.passed)
        if not report.passed:
            assert weights.checksum() == checksum  # the refused edit changed nothing
            assert report.reasons == [
                f"total_delta_ratio {report.figures['total_delta_ratio']:.3f} exceeds 0.5"
            ]
    assert outcomes == [True] * 8 + [False] * 12
