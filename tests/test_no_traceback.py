"""Every subcommand against a table of broken inputs, as a new user types them: each ends with a clear
message and exit 2 (usage) or 1 (runtime), never a Python traceback, and never through the CLI's
last-resort handler (which would mean the case is not handled where it happens)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.conftest import run_cli

LAST_RESORT = "an slmops bug or an environment problem"


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("broken")
    files = {
        "empty_jsonl": "",
        "malformed_jsonl": '{"phrase": "fine", "tone": "joy"}\n{"phrase": oops\n',
        "bad_yaml": "a: [1, 2\n",
        "list_yaml": "- 1\n- 2\n",
        "badpass_yaml": "input_model: {type: HfModel, model_path: default}\npasses:\n  q: {type: OnnxStaticQuantization}\n",
        "badfield_yaml": "input_model: {type: HfModel, model_path: default}\nevaluators: {}\npasses:\n  m: {type: ModelBuilder}\n",
        "hubmodel_yaml": "input_model: {type: HfModel, model_path: org/not-here}\npasses:\n  m: {type: ModelBuilder}\n",
        "search_bad_yaml": "search_strategy: {type: grid}\nsearch_space: {learning_rate: {type: float, low: 1, high: 2}}\n",
    }
    for key, text in files.items():
        (root / key.replace("_yaml", ".yaml").replace("_jsonl", ".jsonl")).write_text(text)
    for name, text in {"corrupt": "{bad", "list": "[1, 2]", "partial": json.dumps({"schema_version": 1})}.items():
        (root / name).mkdir()
        (root / name / "bundle.json").write_text(text)
    (root / "nomodel").mkdir()
    out = {key: str(root / key.replace("_yaml", ".yaml").replace("_jsonl", ".jsonl")) for key in files}
    out.update({name: str(root / name) for name in ("corrupt", "list", "partial", "nomodel")})
    out["missing"] = str(root / "missing")
    return out


def _port_in_use() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, int(sock.getsockname()[1])


# (id, argv with {name} placeholders from `broken`, allowed exit codes, words the message must contain)
CASES = [
    ("train-missing-data", ["train", "--data_files", "{missing}.jsonl"], {2}, "--data_files"),
    ("train-empty-data", ["train", "--data_files", "{empty_jsonl}", "--max_steps", "1"], {2}, "empty.jsonl' is empty"),
    ("train-malformed-jsonl", ["train", "--data_files", "{malformed_jsonl}", "--max_steps", "1"], {2}, "malformed.jsonl' line 2"),
    ("train-config-missing", ["train", "-c", "{missing}.yaml"], {2}, "--config"),
    ("train-config-bad-yaml", ["train", "-c", "{bad_yaml}"], {2}, "not valid YAML"),
    ("train-config-list", ["train", "-c", "{list_yaml}"], {2}, "mapping"),
    ("train-not-a-number", ["train", "--max_steps", "abc"], {2}, "max_steps"),
    ("train-bad-bool", ["finetune", "--gradient_checkpointing=maybe"], {2}, "boolean"),
    ("train-search-missing", ["train", "--search", "{missing}.yaml", "--data_files", "{malformed_jsonl}"], {2}, "--config"),
    ("train-search-bad-strategy", ["train", "--search", "{search_bad_yaml}", "--data_files", "{malformed_jsonl}"], {2}, "grid"),
    ("finetune-report-to", ["finetune", "--report_to", "wandb", "--data_files", "{malformed_jsonl}"], {2}, "TensorBoard"),
    ("finetune-unknown", ["finetune", "--bogus", "--lora-rank", "3"], {2}, "--bogus"),
    ("finetune-model-not-a-folder", ["finetune", "-m", "{nomodel}", "--data_files", "{malformed_jsonl}"], {2}, "config.json"),
    ("build-missing-model", ["build", "-m", "{missing}/model", "--adapter", "{missing}", "--no-validate"], {2}, "missing"),
    ("build-bad-target", ["build", "--target", "tpu"], {2}, "--target"),
    ("build-bad-yaml", ["build", "-c", "{bad_yaml}"], {2}, "not valid YAML"),
    ("build-target-conflict", ["build", "--target", "cuda", "--device", "cpu"], {2}, "contradicts --target cuda"),
    ("build-json-flag-value", ["build", "--json", "maybe"], {2}, "maybe"),
    ("auto-opt-not-a-model", ["auto-opt", "-m", "{nomodel}", "--adapter_path", "{missing}"], {2}, "config.json"),
    ("auto-opt-conflict", ["auto-opt", "--device", "gpu", "--provider", "CPUExecutionProvider"], {2}, "contradict"),
    ("auto-opt-refused", ["auto-opt", "--enable_search", "--use_qdq_encoding"], {2}, "--enable_search"),
    ("generate-adapter-none", ["generate-adapter", "--base_model_path", "{nomodel}"], {2}, "--adapter_paths"),
    ("generate-adapter-format", ["generate-adapter", "--adapter_paths", "{missing}", "--adapter_format", "numpy"], {2}, "onnx_adapter"),
    ("run-config-missing", ["run", "--config", "{missing}.yaml"], {2}, "--config"),
    ("run-no-config", ["run"], {2}, "--config"),
    ("run-unsupported-pass", ["run", "--config", "{badpass_yaml}"], {2}, "OnnxStaticQuantization"),
    ("run-hub-model-offline", ["run", "--config", "{hubmodel_yaml}"], {2}, "could not be fetched"),
    ("run-unsupported-field", ["run", "--config", "{badfield_yaml}"], {2}, "evaluators"),
    ("inspect-missing", ["bundle", "inspect", "{missing}"], {1, 2}, "bundle.json"),
    ("inspect-corrupt", ["bundle", "inspect", "{corrupt}"], {1, 2}, "not readable JSON"),
    ("inspect-list", ["bundle", "inspect", "{list}"], {1, 2}, "list"),
    ("verify-list", ["bundle", "verify", "{list}"], {1, 2}, "list"),
    ("verify-corrupt", ["bundle", "verify", "{corrupt}"], {1, 2}, "JSON"),
    ("serve-missing", ["serve", "{missing}"], {2}, "not a folder"),
    ("serve-corrupt", ["serve", "{corrupt}"], {2}, "JSON"),
    ("serve-list", ["serve", "{list}"], {2}, "list"),
    ("serve-partial", ["serve", "{partial}"], {2}, "bundle.json"),
    ("generate-missing-ca", ["generate", "--ca-cert", "{missing}.pem", "hi"], {2}, "--ca-cert"),
    ("generate-no-server", ["generate", "--server", "127.0.0.1:1", "--timeout", "5", "hi"], {1}, "cannot reach"),
    ("adapters-no-server", ["adapters", "list", "--server", "127.0.0.1:1", "--timeout", "5"], {1}, "cannot reach"),
    ("model-unknown-option", ["model", "path", "--bogus"], {2}, "--bogus"),
    ("targets-unknown-option", ["targets", "--jsn"], {2}, "--json"),
    ("unknown-command", ["finetunee"], {2}, "No such command"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_broken_input_gives_one_clear_message(case: tuple, broken: dict[str, str], tmp_path: Path) -> None:
    _, argv, codes, words = case
    args = [a.format(**broken) for a in argv]
    proc = run_cli(args, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}, timeout=180)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-3000:]
    assert LAST_RESORT not in output, output[-2000:]
    assert proc.returncode in codes, (proc.returncode, output[-2000:])
    assert words in output, output[-2000:]


def test_metrics_port_in_use_is_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    sock, port = _port_in_use()
    with sock:
        proc = run_cli(["serve", str(tiny_bundle), "--port", "0", "--metrics-port", str(port), "--host", "127.0.0.1"],
                       cwd=tmp_path, timeout=120)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and LAST_RESORT not in output, output[-3000:]
    assert proc.returncode == 2 and "--metrics-port" in output and "--no-metrics" in output, output[-2000:]


def test_cuda_fp32_adapter_on_qkv_is_refused_before_the_export(tiny_model_dir: Path, tiny_runs: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """The builder's cuda fp32 graph has a fused Attention op (no q/k/v MatMul): one line up front,
    instead of the export's ONNX warnings and a --lora_modules hint that cannot help."""
    out = tmp_path / "cuda32"
    proc = run_cli(["build", "--target", "cuda", "--precision", "fp32", "-m", str(tiny_model_dir),
                    "--adapter", f"tone={tiny_runs['tone']}", "--no-validate", "-o", str(out)], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-3000:]
    assert "--precision" in proc.stderr and "'tone'" in proc.stderr and "fp16" in proc.stderr
    assert not out.exists()
