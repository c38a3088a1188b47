"""The `slmops` CLI as a user runs it: exit codes, one-line errors, lazy imports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """The CLI entry point in-process (fast); returns (exit code, stderr)."""
    from slmops.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0), capsys.readouterr().err


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom slmops.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\nprint('LIGHT')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "LIGHT" in out.stdout, out.stderr
    assert "train" in out.stdout and "model" in out.stdout


@pytest.mark.parametrize(
    ("extra", "option", "text"),
    [
        (["--data_files", "/nonexistent/x.jsonl"], "--data_files", "does not exist"),
        (["--text_template", "{sentence}: {tone}"], "--text_template", "sentence"),
        (["--train_split", "train[3:1:2]"], "--train_split", "slice"),
        (["--train_split", "train[7:7]"], "--train_split", "no rows"),
        (["--target_modules", "attn_qkv"], "--target_modules", "attn_qkv"),
        (["--model_name_or_path", "someone/not-a-local-model"], "--model_name_or_path", "local"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_option(base_args, extra, option, text, capsys) -> None:
    args = ["train", "--model_name_or_path", base_args["model_name_or_path"],
            "--data_files", base_args["data_files"][0].split("=", 1)[1], "--eval_split", "none",
            "--text_template", base_args["text_template"], "--max_steps", "1",
            "--output_path", base_args["output_path"], "--no-progress", *extra]
    code, stderr = run_main(args, capsys)
    assert code == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: {option}:") and text in last, stderr[-2000:]
    assert not Path(base_args["output_path"]).exists()


def test_existing_output_without_overwrite_exits_2(base_args) -> None:
    out = Path(base_args["output_path"])
    out.mkdir(parents=True)
    (out / "x").write_text("x")
    proc = run_cli(["train", "-m", base_args["model_name_or_path"], "--data_files", base_args["data_files"][0].split("=")[1],
                    "--text_template", base_args["text_template"], "-o", str(out)])
    assert proc.returncode == 2 and "--overwrite" in proc.stderr  # the real console script, in a subprocess
    assert (out / "x").read_text() == "x"


def test_qlora_without_bitsandbytes_exits_2(base_args, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    from slmops.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "-m", base_args["model_name_or_path"], "--data_files", base_args["data_files"][0].split("=")[1],
              "--text_template", base_args["text_template"], "--method", "qlora", "-o", base_args["output_path"]])
    assert exc.value.code == 2


def test_config_file_trains_two_adapters(base_args, tiny_data, tmp_path) -> None:
    shared = {k: v for k, v in base_args.items() if k not in ("data_files", "output_path", "text_template")}
    cfg = {**shared, "max_steps": 2, "eval_split": "eval", "adapters": {
        "tone": {"data_files": [f"train={tiny_data['tone_train']}", f"eval={tiny_data['tone_eval']}"],
                 "text_template": "{phrase}\n{tone}"},
        "extract": {"data_files": [f"train={tiny_data['extract_train']}", f"eval={tiny_data['extract_eval']}"],
                    "text_template": "{request}\n{json}", "target_modules": ["all-linear"], "lora_r": 4},
    }}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli(["train", "-c", str(tmp_path / "two.yaml"), "--output_path", str(tmp_path / "runs")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tone = json.loads((tmp_path / "runs" / "tone" / "run.json").read_text())
    extract = json.loads((tmp_path / "runs" / "extract" / "run.json").read_text())
    assert tone["task"]["type"] == "classification" and "eval_macro_f1" in tone["metrics"]["final"]
    assert extract["task"]["type"] == "generation"
    assert {"eval_rouge_l", "eval_bleu", "eval_exact_match"} <= set(extract["metrics"]["final"])
    assert extract["adapter"]["r"] == 4
    assert extract["adapter"]["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
