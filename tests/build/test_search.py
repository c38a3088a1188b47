"""``slmops build --search`` on the tiny model: one export, candidate quantizations measured against
PyTorch+PEFT, the fastest within the budget picked and recorded; a candidate whose answers flip is
outside the budget; bad flags exit 2 in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from slmops.bundle import read_manifest


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from slmops.cli import main

    try:
        code = main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return int(code or 0), captured.out, captured.err


def _args(model: Path, run: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "-m", str(model), "--adapter", f"joy={run}", "-o", str(out), *extra]


def test_search_picks_the_fastest_candidate_within_the_budget(tiny_model_dir: Path, joy_run: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SLMOPS_BUILDER_IN_PROCESS", "1")
    out = tmp_path / "cpu"
    code, stdout, err = _run(_args(tiny_model_dir, joy_run, out, "--search"), capsys)
    assert code == 0, err
    assert "quantization search" in err and "pick:" in err
    manifest = read_manifest(out)
    search = manifest.build["search"]
    rows = {r["name"]: r for r in search["candidates"]}
    assert len(rows) >= 5 and "int4-b32-acc4" in rows and "int4-b32-acc1" in rows
    within = [r for r in rows.values() if r["within_budget"]]
    assert within and search["pick"] == max(within, key=lambda r: r["speed"]["one_stream_mean"])["name"]
    for row in rows.values():  # every candidate measured: quality per adapter and speed per case
        entry = row["quality"]["adapters"]["joy"]
        assert entry["rows"] == 10 and 0 <= entry["agreement"] <= 1 and "noise_margin_points" in entry
        assert 0 <= entry["expected_agreement"] <= 1 and entry["margin_shift_rms"] > 0  # int4 moves the logits
        assert {"base", "joy", "mixed4", "one_stream_mean"} <= set(row["speed"]) and row["speed"]["base"] > 0
        assert row["within_budget"] == (not row["outside_budget"])
    assert search["pareto_front"] and set(search["pareto_front"]) <= set(rows)
    assert search["pick"] in search["reason"] and search["budget"]["min_agreement"] == 0.97
    # the bundle is the pick: its MatMulNBits carry the pick's block size, and it passed the gate
    import onnx

    graph = onnx.load(str(out / "model" / "model.onnx"), load_external_data=False).graph
    blocks = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert int(search["pick_options"]["block_size"]) in blocks
    assert manifest.validation["status"] == "passed" and manifest.build["builder_options"]["block_size"]
    code, stdout, _ = _run(["bundle", "inspect", str(out)], capsys)
    assert code == 0 and "quantization search" in stdout and search["pick"] in stdout


def test_a_candidate_whose_answers_flip_is_outside_the_budget(tiny_model_dir: Path, joy_run: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A perturbed adapter (B sign-flipped on conversion, as a lost transpose/scale would) flips every
    answer on every candidate: no candidate is within the budget, the build fails and says why."""
    import slmops_build.adapters as adapters

    from slmops.contract import read_adapter_tensors, write_adapter_tensors

    real_convert = adapters.convert_adapter

    def sign_flipped(*args: Any, **kwargs: Any) -> Any:
        info = real_convert(*args, **kwargs)
        arrays = read_adapter_tensors(Path(args[3]))
        write_adapter_tensors({k: -v if ".lora_B." in k else v for k, v in arrays.items()}, Path(args[3]))
        return info

    monkeypatch.setenv("SLMOPS_BUILDER_IN_PROCESS", "1")
    monkeypatch.setattr(adapters, "convert_adapter", sign_flipped)
    out = tmp_path / "cpu"
    code, _, err = _run(_args(tiny_model_dir, joy_run, out, "--search"), capsys)
    assert code == 1, err
    assert "no candidate is within the budget" in err and "answers identical to PyTorch on" in err
    assert "(--min_agreement)" in err and not out.exists()


def test_test_check_passes_a_good_bundle_and_fails_a_flipped_one(tiny_model_dir: Path, joy_run: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """--test_check scores the bundle against PyTorch on the run's test rows (held out from training
    and the search) and records them; with the eval gate off, a flipped adapter is caught there."""
    import slmops_build.adapters as adapters

    from slmops.contract import read_adapter_tensors, write_adapter_tensors

    monkeypatch.setenv("SLMOPS_BUILDER_IN_PROCESS", "1")
    out = tmp_path / "good"
    code, _, err = _run(_args(tiny_model_dir, joy_run, out, "--precision", "fp32", "--test_check"), capsys)
    assert code == 0, err
    test_rows = read_manifest(out).validation["test_rows"]
    assert test_rows["passed"] and test_rows["adapters"]["joy"]["rows"] == 10
    assert test_rows["adapters"]["joy"]["drop_points"] == 0 and "test rows" in err

    real_convert = adapters.convert_adapter

    def sign_flipped(*args: Any, **kwargs: Any) -> Any:
        info = real_convert(*args, **kwargs)
        arrays = read_adapter_tensors(Path(args[3]))
        write_adapter_tensors({k: -v if ".lora_B." in k else v for k, v in arrays.items()}, Path(args[3]))
        return info

    monkeypatch.setattr(adapters, "convert_adapter", sign_flipped)
    # the eval gate would stop it first (--no-validate): the test check judges it alone
    code, _, err = _run(_args(tiny_model_dir, joy_run, tmp_path / "bad", "--precision", "fp32", "--test_check",
                              "--no-validate"), capsys)
    assert code == 1 and "on the test rows vs 1.000 in PyTorch" in err and not (tmp_path / "bad").exists(), err


def test_search_budget_unit() -> None:
    """budget_failures: agreement below the minimum fails even when the accuracy does not drop (flips
    that cancel out); a drop inside the noise margin does not fail on its own."""
    from slmops_build.search import budget_failures, pareto_front
    from slmops_build.validate import Bounds

    def q(agreement_rows: int, drop: float, margin: float, ppl: float = 0.0, expected: float = 1.0) -> dict[str, Any]:
        return {"adapters": {"a": {"rows": 100, "rows_same": agreement_rows, "agreement": agreement_rows / 100,
                                   "expected_agreement": expected, "margin_shift_rms": 0.4,
                                   "metric": "accuracy", "drop_points": drop, "noise_margin_points": margin}},
                "ppl_increase_pct": ppl}

    bounds = Bounds()
    assert budget_failures(q(100, 0.0, 0.0), bounds) == []
    assert budget_failures(q(97, 1.0, 1.96), bounds) == []
    flips = budget_failures(q(94, 0.0, 4.8), bounds)  # 3 rows won, 3 lost: accuracy equal, answers not
    assert len(flips) == 1 and "94/100" in flips[0] and "--min_agreement" in flips[0]
    assert "drop 5.0 points" in budget_failures(q(95, 5.0, 4.38), bounds)[-1]
    assert "perplexity" in budget_failures(q(100, 0.0, 0.0, ppl=12.0), bounds)[0]
    # every row identical, but thin margins among them: rows to come would flip
    thin = budget_failures(q(100, 0.0, 0.0, expected=0.95), bounds)
    assert len(thin) == 1 and "expected agreement on unseen rows 95.0%" in thin[0]
    rows = [{"name": "fast-bad", "speed": {"one_stream_mean": 10.0}, "min_agreement": 0.9},
            {"name": "slow-good", "speed": {"one_stream_mean": 5.0}, "min_agreement": 1.0},
            {"name": "dominated", "speed": {"one_stream_mean": 4.0}, "min_agreement": 0.95}]
    assert pareto_front(rows) == ["fast-bad", "slow-good"]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--search", "--merge", "joy"], "--search"),
    (["--search", "--target", "cuda", "--allow-unverified"], "--search"),
    (["--search", "--extra_option", "block_size=64"], "--extra_option"),
    (["--min_agreement", "1.5"], "--min_agreement"),
])
def test_bad_search_flags_exit_2_in_one_line(tiny_model_dir: Path, joy_run: Path, tmp_path: Path, extra: list[str],
                                             needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(_args(tiny_model_dir, joy_run, tmp_path / "x", *extra), capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_search_report_is_json(tiny_model_dir: Path) -> None:
    """The candidate list is plain data (bundle.json stores it as is)."""
    from slmops_build.search import candidates

    from slmops.targets import get_target

    cands = candidates(get_target("cpu"))
    assert json.loads(json.dumps([c.options for c in cands]))
    assert {c.block for c in cands} == {32, 64, 128}


def test_candidates_share_one_quantization_per_block_size(lora_export: Any, tmp_path: Path) -> None:
    """Accuracy-level variants of a block size rewrite only MatMulNBits attributes (the weights file is
    shared); fp32_last_layers puts level 1 on the last layers' int4 MatMuls only; the int8 head keeps 4."""
    import onnx
    from slmops_build.search import Candidate, quantize_candidates

    from slmops.targets import get_target

    chosen = [Candidate("a", {"block_size": "32", "accuracy_level": "4"}, ""),
              Candidate("b", {"block_size": "32", "accuracy_level": "4", "fp32_last_layers": "1"}, ""),
              Candidate("c", {"block_size": "32", "accuracy_level": "1"}, "")]
    dirs = quantize_candidates(lora_export.model_dir, tmp_path, get_target("cpu"), {}, chosen, lambda _: None)

    def levels(name: str) -> dict[str, int]:
        graph = onnx.load(str(dirs[name] / "model.onnx"), load_external_data=False).graph
        return {n.name: next(a.i for a in n.attribute if a.name == "accuracy_level") for n in graph.node
                if n.op_type == "MatMulNBits"}

    a, b, c = levels("a"), levels("b"), levels("c")
    assert set(a) == set(b) == set(c) and set(a.values()) == {4}
    last = max(int(n.split("/layers.")[1].split("/")[0]) for n in a if "/layers." in n)
    assert all(v == (1 if f"/layers.{last}/" in n else 4) for n, v in b.items())
    assert all(v == (4 if "lm_head" in n else 1) for n, v in c.items())
    assert (dirs["b"] / "model.onnx.data").stat().st_ino == (dirs["a"] / "model.onnx.data").stat().st_ino
