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
