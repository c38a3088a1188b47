"""The build stage reads the train stage's files only: it never imports slmops_train, refuses a
run.json of another schema version on one line (exit 2), and writes a bundle.json that names no
folder of the build machine."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, run_cli

BUILD_SRC = REPO / "build" / "slmops_build"


def test_no_build_module_imports_the_train_package() -> None:
    """Anywhere in a module, a function body's lazy import included (where the old validation had it)."""
    found = []
    for path in sorted(BUILD_SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else
                [node.value] if isinstance(node, ast.Constant) and isinstance(node.value, str) else [])
            found += [f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}" for n in names if n.split(".")[0] == "slmops_train"]
    assert found == []
    # and importing every build module loads none of it
    code = ("import importlib, pkgutil, sys, slmops_build\n"
            "for m in pkgutil.iter_modules(slmops_build.__path__): importlib.import_module('slmops_build.' + m.name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('slmops_train')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def _run_copy(run: Path, tmp_path: Path, **changes: Any) -> Path:
    copy = tmp_path / run.name
    shutil.copytree(run, copy, symlinks=True)
    record = json.loads((copy / "run.json").read_text())
    record.update(changes)
    (copy / "run.json").write_text(json.dumps(record))
    return copy


@pytest.mark.parametrize(("version", "words"), [(99, "schema_version 99 is not supported"),
                                                (1, "version 1 has no rendered validation rows")])
def test_run_json_of_another_schema_is_refused_on_one_line(version: int, words: str, tiny_model_dir: Path,
                                                           tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    run = _run_copy(tiny_runs["tone"], tmp_path, schema_version=version)
    out = tmp_path / "cpu"
    proc = run_cli(["build", "-m", str(tiny_model_dir), "--precision", "fp32", "--adapter", f"tone={run}", "-o", str(out)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(run / "run.json") in lines[0] and words in lines[0] and "retrain" in lines[0]
    assert not out.exists()


def test_bundle_json_names_no_folder_of_the_build_machine(tiny_model_dir: Path, tiny_runs: dict[str, Path],
                                                          tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A validated build from absolute paths, with the train package made unimportable: it validates
    from the run's files, and bundle.json holds no absolute path and no temp folder."""
    out = tmp_path / "bundle" / "cpu"
    args = ["build", "-m", str(tiny_model_dir), "--precision", "fp32", "--adapter", f"tone={tiny_runs['tone']}",
            "--adapter", f"extract={tiny_runs['extract']}", "-o", str(out), "--validate_rows", "4"]
    code = ("import sys\nsys.modules['slmops_train'] = None  # any import of it raises ImportError\n"
            "from slmops.cli import main\nsys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**__import__("os").environ, "SLMOPS_BUILDER_IN_PROCESS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "bundle.json").read_text())
    validation = data["validation"]
    assert validation["status"] == "passed", validation
    for name in ("tone", "extract"):
        entry = validation["adapters"][name]
        assert entry["rows"] == 4 and entry["eval_source"] == f"{name}/validation/eval.jsonl (eval split 'eval')"
        assert len(entry["eval_sha256"]) == 64
    assert data["adapters"]["tone"]["source_run"] == "tone"
    strings: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                strings.append(str(k))
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            strings.append(value)

    walk(data)
    base = str(tmp_path_factory.getbasetemp())
    assert [s for s in strings if s.startswith("/") or base in s or str(Path.home()) + "/" in s] == []
