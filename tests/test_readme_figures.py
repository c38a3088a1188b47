"""Every measured figure in the README is rendered from bench/results/*.json (bench/readme_figures.py)."""

from __future__ import annotations

import re

from tests.conftest import REPO


def _module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_figures", REPO / "bench" / "readme_figures.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_figure_blocks_match_the_results_json() -> None:
    module = _module()
    seen: set[str] = set()
    for doc in module.DOCS:
        text = doc.read_text()
        names = re.findall(r"<!-- figures:([\w-]+) -->", text)
        seen |= set(names)
        for name in names:
            assert name in module.BLOCKS, f"{doc.name}: block {name} has no renderer in bench/readme_figures.py"
            body = text.split(f"<!-- figures:{name} -->\n", 1)[1].split(f"<!-- /figures:{name} -->", 1)[0]
            try:
                want = module.BLOCKS[name]() + "\n"
            except FileNotFoundError:  # its results JSON is not committed: the block must hold no figures
                want = ""
            assert body == want, f"{doc.relative_to(REPO)}: block {name} differs from its source; run bench/readme_figures.py"
    assert seen == set(module.BLOCKS), seen  # every block is rendered somewhere, none left stale by hand


def test_figures_that_appear_twice_come_from_one_source() -> None:
    """The image sizes stand in both READMEs, rendered from bench/results/images.json; no other size
    of the serve image is written by hand in either."""
    module = _module()
    block = module.image_sizes()
    for doc in module.DOCS:
        text = doc.read_text()
        assert f"<!-- figures:image-sizes -->\n{block}\n<!-- /figures:image-sizes -->" in text, doc
        outside = re.sub(r"<!-- figures:([\w-]+) -->.*?<!-- /figures:\1 -->", "", text, flags=re.S)
        by_hand = re.findall(r".{0,40}(?:\d{3}(?:-\d{3})? MB (?:amd64|arm64)|(?:amd64|arm64) \d{3}(?:-\d{3})? MB|"
                             r"MB without a bundle|base image \d+ MB).{0,20}", outside)
        assert not by_hand, (doc, by_hand)


def test_the_readme_states_the_code_s_adapter_abi() -> None:
    from slmops.bundle import ABI_VERSION

    text = (REPO / "README.md").read_text()
    stated = {int(v) for v in re.findall(r"abi_version: (\d+)|adapter ABI (\d+)", text) for v in v if v}
    assert stated == {ABI_VERSION}, stated


def test_a_stale_figure_is_caught(tmp_path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_figures", REPO / "bench" / "readme_figures.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (REPO / "README.md").read_text()
    body = module.BLOCKS["lora-speed"]()
    stale = text.replace(body, body.replace("|", "| 0.997x", 1))
    assert stale != text and module.render(stale) == text


def test_a_benchmark_run_writes_beside_the_committed_results_and_accept_replaces_them(tmp_path) -> None:
    """Running a README benchmark never changes what `make test` compares; `make figures` does."""
    module = _module()
    results = tmp_path / "results"
    results.mkdir()
    (results / "lora_cpu.json").write_text('{"old": 1}\n')
    new = module.beside_committed(results / "lora_cpu.json", results)
    assert new == results / "lora_cpu.new.json"
    assert module.beside_committed(new, results) == new  # asked for the new file: that one
    assert module.beside_committed(tmp_path / "elsewhere.json", results) == tmp_path / "elsewhere.json"
    assert module.committed_of(new) == results / "lora_cpu.json"
    new.write_text('{"new": 2}\n')
    assert module.accept(results) == ["lora_cpu.json"]
    assert (results / "lora_cpu.json").read_text() == '{"new": 2}\n'
    assert not new.exists()
    assert module.accept(results) == []


def test_every_benchmark_with_out_writes_beside_the_committed_results() -> None:
    """A new bench/*.py with --out must route it through beside_committed too."""
    for path in sorted((REPO / "bench").glob("*.py")):
        text = path.read_text()
        if re.search(r"add_argument\(\s*\"--out\"", text):
            assert "beside_committed(args.out)" in text, f"{path.name}: --out must go through readme_figures.beside_committed"


def test_a_benchmark_script_redirects_its_out(tmp_path) -> None:
    """As a script (bench/ on sys.path, as the README runs them): `--out bench/results/NAME.json` is
    announced and used as NAME.new.json; nothing is written under the committed name."""
    import subprocess
    import sys

    committed = REPO / "bench" / "results" / "probe_cpu.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "score_run.py"), str(tmp_path / "no-run"),
                           "--out", str(committed)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0  # no run there: it fails after choosing where to write
    assert "probe_cpu.new.json" in done.stderr, done.stderr[-2000:]
    assert not committed.exists() and not committed.with_name("probe_cpu.new.json").exists()
