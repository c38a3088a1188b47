"""The accuracy bound of build validation separates row-flip noise from a real loss."""

from __future__ import annotations

import pytest


def test_a_few_flips_are_noise_a_broken_bundle_is_not() -> None:
    from slmops_build.validate import paired_drop

    pytorch = [1.0] * 35 + [0.0] * 15
    # int8 activations flip 2 of 50 answers the wrong way: 4 points, inside the noise margin
    two_flips = pytorch.copy()
    two_flips[0] = two_flips[1] = 0.0
    drop, margin = paired_drop(two_flips, pytorch)
    assert drop == pytest.approx(4.0) and margin > drop
    # a broken quantization loses 12 answers: 24 points, far beyond the noise
    broken = [0.0] * 12 + pytorch[12:]
    drop, margin = paired_drop(broken, pytorch)
    assert drop == pytest.approx(24.0) and drop > margin > 4.0
    # flips both ways cancel in the drop, not in the margin
    both = pytorch.copy()
    both[0], both[40] = 0.0, 1.0
    drop, margin = paired_drop(both, pytorch)
    assert drop == 0.0 and margin > 0
    assert paired_drop([], []) == (0.0, 0.0)


def test_row_scores_per_task() -> None:
    from slmops_build.validate import row_scores, task_score

    assert row_scores(["Joy ", "fear"], ["joy", "anger"], True) == ("accuracy", [1.0, 0.0])
    metric, rows = row_scores(["the cat sat", "dog"], ["the cat sat", "a cat"], False)
    assert metric == "rouge_l" and rows[0] == 1.0 and rows[1] == 0.0
    assert task_score(["joy", "fear"], ["joy", "anger"], True) == ("accuracy", 0.5)


def test_can_run_asks_the_runtime_validation_decodes_with(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU target validates where onnxruntime (the server's runtime) has its provider, onnxruntime-genai or not."""
    import onnxruntime as ort
    from slmops_build.validate import can_run

    from slmops.targets import get_target

    assert can_run(get_target("cpu")) == (True, "")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert can_run(get_target("cuda")) == (True, "")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    runnable, why = can_run(get_target("cuda"))
    assert not runnable and "CUDAExecutionProvider is not available" in why


def test_answer_margins_are_the_taken_logit_minus_the_best_other() -> None:
    import numpy as np
    from slmops_build.validate import answer_margins

    logits = np.array([[0.0, 3.0, 1.0, 2.5], [4.0, 0.0, 0.0, 1.0], [0.0, 0.0, 9.0, 0.0]], np.float32)
    # step 0 took its argmax (3 vs 2.5), step 1 too (4 vs 1), step 2 a forced non-argmax token (0 vs 9)
    assert answer_margins(logits, [1, 0, 3]) == pytest.approx([0.5, 3.0, -9.0])
    assert answer_margins(logits, [1]) == pytest.approx([0.5])  # a path shorter than the logits


def test_expected_agreement_sees_thin_margins_that_did_not_flip() -> None:
    """50 rows all identical to PyTorch: with every margin far above the measured noise, the rows to
    come keep their answers; with a few thin margins among them, some will not, and the estimate
    says how many: the thing the observed agreement (50/50) cannot see."""
    import math

    from slmops_build.validate import expected_agreement

    shifts = [0.3, -0.3] * 50  # the bundle moves margins by 0.3 logits rms
    confident = [[8.0, 6.0]] * 50
    expected, sigma = expected_agreement(confident, shifts)
    assert sigma == pytest.approx(0.3) and expected == pytest.approx(1.0, abs=1e-9)
    thin = [[8.0, 6.0]] * 45 + [[0.1]] * 5  # 5 rows nearly tied: each keeps its answer ~63% of the time
    expected, _ = expected_agreement(thin, shifts)
    keep = 0.5 * (1 + math.erf(0.1 / 0.3 / math.sqrt(2)))
    assert expected == pytest.approx((45 + 5 * keep) / 50) and expected < 0.97
    # a longer answer: every step must hold
    assert expected_agreement([[0.3, 0.3]], shifts)[0] == pytest.approx((0.5 * (1 + math.erf(1 / math.sqrt(2)))) ** 2)
    assert expected_agreement(thin, [0.0] * 10) == (1.0, 0.0)  # an exact bundle (fp32): nothing moves
    assert expected_agreement([], []) == (1.0, 0.0)
