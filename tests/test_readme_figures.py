"""Every measured figure in the README is rendered from bench/results/*.json (bench/readme_figures.py)."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_readme_figure_blocks_match_the_results_json() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_figures", REPO / "bench" / "readme_figures.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (REPO / "README.md").read_text()
    names = re.findall(r"<!-- figures:([\w-]+) -->", text)
    assert set(names) == set(module.BLOCKS), names  # every block is rendered, none left stale by hand
    for name in names:
        body = text.split(f"<!-- figures:{name} -->\n", 1)[1].split(f"<!-- /figures:{name} -->", 1)[0]
        try:
            want = module.BLOCKS[name]() + "\n"
        except FileNotFoundError:  # its results JSON is not committed: the block must hold no figures
            want = ""
        assert body == want, f"README block {name} differs from its JSON; run bench/readme_figures.py"


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
