"""Byte-compile what an image runs, at image build time, by importing it.

The venvs are installed with ``pip --no-compile``: compiling every module of every wheel would add
tens of MB (the serve image) or minutes of build time (torch) for code that never runs. Importing
the modules a stage runs writes ``__pycache__`` for exactly that closure, so the first start in the
container does not compile anything (the venv is root-owned: the server's user could not cache it).

    python precompile.py MODULE[:ATTR]... [?OPTIONAL...] [!FORBIDDEN...]

``MODULE:ATTR`` also reads the attribute (transformers' lazy ``transformers:Trainer`` imports the
trainer's modules). ``?MODULE`` is imported only when it is installed (a dependency that the
extra may or may not hold: the installed set comes from pyproject's extra, not from this list).

Fails (exit 1) when a module does not import or a ``!FORBIDDEN`` module got imported along the way
(the serve image proves it never imports torch, transformers or peft).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


def main(args: list[str]) -> int:
    forbidden = [a[1:] for a in args if a.startswith("!")]
    modules = [a for a in args if not a.startswith(("!", "?"))]
    modules += [a[1:] for a in args if a.startswith("?") and importlib.util.find_spec(a[1:].partition(":")[0]) is not None]
    sys.dont_write_bytecode = False
    for spec in modules:
        name, _, attr = spec.partition(":")
        module = importlib.import_module(name)
        if attr:
            getattr(module, attr)
    loaded = sorted(m for m in forbidden if m in sys.modules)
    if loaded:
        print(f"precompile: importing {modules} loaded {loaded}, which this image must not need", file=sys.stderr)
        return 1
    print(f"precompile: {len(sys.modules)} modules imported and compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
