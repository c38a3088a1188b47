"""The serve package (and `slmops serve`) never imports torch, transformers or peft: the serve image
installs only `.[serve]`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.serve.conftest import PROMPT

TRAINING_MODULES = ("torch", "transformers", "peft", "datasets", "accelerate")


def test_serve_package_imports_no_training_dependencies(tiny_bundle: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        import slmops_serve.cli, slmops_serve.client, slmops_serve.config, slmops_serve.engine, slmops_serve.logs
        import slmops_serve.metrics, slmops_serve.protogen, slmops_serve.registry, slmops_serve.server
        import slmops_serve.servicer, slmops_serve.watch
        from slmops.cli import cli
        for name in ("serve", "generate", "adapters"):
            assert cli.get_command(None, name) is not None, name
        from slmops_serve.config import ServeConfig
        from slmops_serve.server import SlmopsServer
        server = SlmopsServer(ServeConfig(bundle_dir={str(tiny_bundle)!r}, host="127.0.0.1", port=0, metrics_port=None,
                                          threads=1))
        server.start()
        server.load()
        from slmops_serve.client import SlmopsClient
        with SlmopsClient(server.address) as client:
            assert client.generate({PROMPT!r}, adapter="tone", max_new_tokens=3).usage.completion_tokens == 3
        server.stop(grace=1)
        loaded = sorted(m for m in {TRAINING_MODULES!r} if m in sys.modules)
        print("LOADED", loaded)
        assert not loaded, loaded
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout
