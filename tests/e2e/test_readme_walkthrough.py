"""Every command in the README's ```bash blocks, checked as typed.

Two levels:

* **Always** (`make test`, seconds): every command of every bash block is parsed and checked against
  what it names: ``slmops ...`` against the real click CLI (options, arguments, choices: the
  command's context is made, nothing runs), ``make ...`` with ``make -n`` (the target exists, the
  variables are accepted), ``docker run`` against the images `make images` tags, ``curl`` against
  the HTTP routes the server has. A literal ``...`` or ``[--flag]`` in a command fails.
* **The walkthrough** (CI only, opt-in: ``SLMOPS_README_WALKTHROUGH=host`` from `.ci/run`,
  ``=containers`` from scripts/ci_containers.sh where Docker runs): the README's command blocks
  listed in :data:`WALKTHROUGH` run in README order, as typed, in one bash session at the
  repository root (so ``. .venv/bin/activate`` carries to the next commands, as in a terminal).
  A placeholder is replaced only where the README says what it stands for (:data:`PLACEHOLDERS`).
  A command whose README comment says it ``keeps running`` (``make serve``) runs in the
  background, as in the README's "second terminal", and ``docker run -d`` returns at once; in both
  cases the next command starts when the server answers gRPC health SERVING, as a user would wait
  for its log line. What the walkthrough started is stopped at its end, by process group / ID.

Blocks not in WALKTHROUGH are checked only: the training commands train the real default model
for minutes each (tests/e2e/test_cli_pipeline.py and test_olive_guide.py run them on a tiny
model), and the Development block is what CI itself runs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
WALKTHROUGH_ENV = "SLMOPS_README_WALKTHROUGH"

# (heading the block sits under, by prefix; which bash/python block under it, 0-based; part)
WALKTHROUGH: list[tuple[str, int, str, str]] = [
    ("On a fresh machine", 0, "bash", "host"),      # make bundle TARGET=cpu (make test: .ci/run ran it)
    ("On a fresh machine", 1, "bash", "host"),      # make serve TARGET=cpu (keeps running)
    ("On a fresh machine", 2, "bash", "host"),      # the client in a second terminal, adapters load
    ("Build (", 0, "bash", "host"),                 # up to date, cuda, merged, inspect, verify
    ("OpenAI-compatible HTTP", 0, "bash", "host"),  # curl, against make serve's HTTP port
    ("OpenAI-compatible HTTP", 0, "python", "host"),
    ("Containers and deployment", 0, "bash", "containers"),
    ("arm64 edge devices", 0, "bash", "containers-arm64"),
]
# Commands of those blocks that the walkthrough does not run, and why.
NOT_RUN: dict[str, str] = {
    "make test": ".ci/run ran the whole suite just before the walkthrough",
    "slmops deploy --host ssh://pi@pi5 --bundle dist/bundles/cpu-arm64 --memory 2g --cpus 3":
        "needs an arm64 engine; tests/containers/test_arm64.py serves that bundle under emulation",
}
# Placeholders the README names ("`X` stands for ..."), and what the walkthrough puts there.
PLACEHOLDERS: dict[str, str] = {
    "ssh://pi@edge-1": "local",  # the README: `local` for this machine's engine
    "reg.lan:5000": os.environ.get("SLMOPS_TEST_REGISTRY", "127.0.0.1:5000"),
}
SERVER_PORT = 50051


@dataclass
class Command:
    line: int  # 1-based line in the README
    text: str  # as typed (continuations and comment included)
    words: list[str] = field(default_factory=list)  # shell words, comment stripped
    comment: str = ""


@dataclass
class Block:
    heading: str
    lang: str
    index: int  # among the blocks of this language under this heading
    line: int
    body: str
    commands: list[Command]


def _commands(body: str, first_line: int) -> list[Command]:
    """Shell commands of a block: continuation lines and quoted newlines joined, blank lines skipped."""
    out: list[Command] = []
    pending: list[str] = []
    start = first_line
    for number, line in enumerate(body.splitlines(), first_line):
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = number
        pending.append(line)
        text = "\n".join(pending)
        if text.rstrip().endswith("\\"):
            continue
        try:
            words = shlex.split(text.replace("\\\n", " "), comments=True)  # bash drops a backslash-newline
        except ValueError:  # a quote still open: the command goes on
            continue
        out.append(Command(start, text, words, _comment(text)))
        pending = []
    assert not pending, f"README line {start}: unterminated command {pending}"
    return out


def _comment(text: str) -> str:
    """The shell comment of a command (a ``#`` after a blank, outside quotes), without the ``#``."""
    quote = ""
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[i + 1:].split("\n", 1)[0].strip()
    return ""


def readme_blocks(path: Path = README) -> list[Block]:
    blocks: list[Block] = []
    heading = ""
    counts: dict[tuple[str, str], int] = {}
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!") and re.match(r"#+ ", line):
            heading = line.lstrip("#").strip()
        fence = re.match(r"```(\w+)\s*$", line)
        if fence:
            lang = fence.group(1)
            end = i + 1
            while not lines[end].startswith("```"):
                end += 1
            body = "\n".join(lines[i + 1:end])
            index = counts.get((heading, lang), 0)
            counts[(heading, lang)] = index + 1
            blocks.append(Block(heading, lang, index, i + 2, body, _commands(body, i + 2) if lang == "bash" else []))
            i = end
        i += 1
    return blocks


# ---- checks that run in every `make test` ---------------------------------------------------------


def _version() -> str:
    match = re.search(r'^version *= *"(.*)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert match
    return match.group(1)


def check_slmops(args: list[str]) -> None:
    """Make the click context of ``slmops ARGS`` (options, arguments, choices, types), running nothing."""
    import click

    from slmops.cli import cli

    ctx = cli.make_context("slmops", list(args))
    command: click.Command = cli
    while isinstance(command, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest and command.invoke_without_command:  # `slmops deploy --host ...`: the group runs itself
            return
        assert rest, f"slmops {' '.join(args)}: no subcommand"
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None and name
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub


def check_make(args: list[str]) -> None:
    done = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "MAKEFLAGS": ""})
    assert done.returncode == 0, f"make -n {' '.join(args)}: {done.stderr[-1500:]}"


def check_command(cmd: Command) -> None:
    words = cmd.words
    where = f"README line {cmd.line}: {cmd.text!r}"
    for word in words:
        assert word != "..." and not re.fullmatch(r"\[.*\]", word), f"{where}: a literal {word!r} cannot be typed"
    program = words[0]
    if program == "slmops":
        try:
            check_slmops(words[1:])
        except Exception as exc:  # click's UsageError, slmops' own usage errors
            raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
    elif program == "torchrun":
        assert "-m" in words and words[words.index("-m") + 1] == "slmops.cli", where
        check_slmops(words[words.index("-m") + 2:])
    elif program == "make":
        check_make(words[1:])
    elif program in (".", "source"):
        assert words[1] == ".venv/bin/activate", where  # made by `make install`
    elif program == "cp":
        source = words[1]
        match = re.fullmatch(r"dist/bundles/([\w-]+)/adapters/(\w+)\.onnx_adapter", source)
        assert match, f"{where}: copies something a bundle does not hold"
        demo = re.search(r"^DEMO_ADAPTERS := (.*)$", (REPO / "Makefile").read_text(), re.M)
        assert demo and match.group(2) in demo.group(1).split(), f"{where}: `make bundle` builds no adapter {match.group(2)}"
    elif program == "docker" and words[1:3] == ["rm", "-f"]:
        named = {c.words[c.words.index("--name") + 1] for b in readme_blocks() for c in b.commands
                 if c.words[:2] == ["docker", "run"] and "--name" in c.words}
        assert words[3] in named, f"{where}: no README `docker run --name {words[3]}`"
    elif program == "docker":
        assert words[1] == "run", where
        image = next(w for w in reversed(words) if re.match(r"[\w.-]+:[\w.-]+$", w))
        assert re.fullmatch(rf"slmops-serve:{re.escape(_version())}(-[\w-]+)?", image), f"{where}: `make images` tags no {image}"
        mounts = [words[i + 1] for i, w in enumerate(words) if w == "-v"]
        for mount in mounts:
            assert re.fullmatch(r"\$PWD/dist/bundles/[\w-]+:/bundle:ro", mount), f"{where}: {mount}"
    elif program == "curl":
        url = next(w for w in words if w.startswith("http"))
        match = re.fullmatch(r"http://localhost:(\d+)(/\S*)", url)
        assert match, f"{where}: {url}"
        assert match.group(1) == re.search(r"^HTTP_PORT \?= (\d+)$", (REPO / "Makefile").read_text(), re.M).group(1)  # type: ignore[union-attr]
        assert f'"{match.group(2)}"' in (REPO / "serve" / "slmops_serve" / "http_api.py").read_text(), f"{where}: no route"
    elif program == "bash":
        assert (REPO / words[1]).is_file(), where
    elif program in ("python", "python3", ".venv/bin/python"):
        import importlib.util

        if words[1] == "-m":
            assert importlib.util.find_spec(words[2]) is not None, f"{where}: no module {words[2]}"
        else:
            assert (REPO / words[1]).is_file(), f"{where}: no script {words[1]}"
    else:
        raise AssertionError(f"{where}: this test does not know how to check `{program}`; teach it")


def test_the_readme_blocks_are_found() -> None:
    blocks = readme_blocks()
    bash = [b for b in blocks if b.lang == "bash"]
    assert len(bash) >= 8 and sum(len(b.commands) for b in bash) >= 30
    first = bash[0].commands[0]
    assert first.words == ["make", "bundle", "TARGET=cpu"] and "installs .venv" in first.comment
    curl = [c for b in bash for c in b.commands if c.words[0] == "curl"]
    assert curl and all("localhost:8000" in c.text for c in curl)  # quoted JSON across lines stays one command
    for heading, index, lang, _part in WALKTHROUGH:
        assert _find(blocks, heading, index, lang), f"README: no {lang} block {index} under a heading '{heading}...'"


def test_every_readme_command_parses_as_typed() -> None:
    failures = []
    for block in readme_blocks():
        if block.lang == "python":
            try:
                compile(block.body, f"README.md:{block.line}", "exec")
            except SyntaxError as exc:
                failures.append(f"README line {block.line}: python block: {exc}")
        for cmd in block.commands:
            try:
                check_command(cmd)
            except AssertionError as exc:
                failures.append(str(exc))
    assert not failures, "\n".join(failures)


def test_the_check_catches_what_users_hit() -> None:
    """The checks fail on the README mistakes they exist for."""
    bad = [
        "slmops run --config examples/olive-config.yaml [--setup]",
        "slmops build --target cpu --merge tone ...",
        "slmops adapters load support ./support.onnx_adapter --sever localhost:50051",
        "slmops bundle inspekt dist/bundles/cpu",
        "make bundel TARGET=cpu",
        "docker run -d -v \"$PWD/dist/bundles/cpu:/bundle:ro\" slmops-serve:9.9.9",
        "curl http://localhost:8000/v1/chat/complete",
    ]
    for text in bad:
        with pytest.raises(AssertionError):
            check_command(_commands(text, 1)[0])


def test_placeholders_are_only_those_the_readme_names() -> None:
    prose = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    for placeholder in PLACEHOLDERS:
        assert re.search(rf"`{re.escape(placeholder)}`[^.]*(stands for|for a)", prose), placeholder


# ---- the walkthrough (CI) -------------------------------------------------------------------------


def _find(blocks: list[Block], heading: str, index: int, lang: str) -> Block | None:
    found = [b for b in blocks if b.heading.startswith(heading) and b.lang == lang and b.index == index]
    return found[0] if found else None


WAIT_SERVING = """
_wait_serving() {  # PORT: until gRPC health answers SERVING (what a user waits for in the log)
    "$SLMOPS_WALK_PY" - "$1" <<'PY'
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
deadline = time.monotonic() + 900
while True:
    try:
        with grpc.insecure_channel(f"localhost:{sys.argv[1]}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
    except grpc.RpcError:
        pass
    if time.monotonic() > deadline:
        sys.exit("not SERVING after 900 s")
    time.sleep(1)
print(f"(walkthrough: localhost:{sys.argv[1]} is SERVING)", flush=True)
PY
}
"""


def walkthrough_script(parts: set[str], blocks: list[Block] | None = None) -> str:
    """The bash script of the walkthrough's ``parts``, in README order."""
    blocks = blocks or readme_blocks()
    chosen = [b for b in blocks if any(b.heading.startswith(h) and b.lang == lang and b.index == i and part in parts
                                       for h, i, lang, part in WALKTHROUGH)]
    chosen.sort(key=lambda b: b.line)
    lines = ["set -eo pipefail", f"cd {shlex.quote(str(REPO))}",
             f"export SLMOPS_WALK_PY={shlex.quote(sys.executable)}",
             "_groups=(); _containers=(); _deployed=",
             "_stop() {  # what this walkthrough started: process groups, containers",
             "    local rc=$?",
             "    for g in \"${_groups[@]}\"; do kill -TERM -- \"-$g\" 2>/dev/null || true; done",
             "    for g in \"${_groups[@]}\"; do for _ in $(seq 60); do kill -0 -- \"-$g\" 2>/dev/null || break; sleep 0.5; done; done",
             "    for c in \"${_containers[@]}\"; do docker rm -f \"$c\" >/dev/null 2>&1 || true; done",
             "    [ -z \"$_deployed\" ] || docker rm -f slmops-serve slmops-serve-previous >/dev/null 2>&1 || true",
             "    rm -f support.onnx_adapter",
             "    exit $rc",
             "}",
             "trap _stop EXIT",
             WAIT_SERVING]
    if "host" not in parts:  # the same shell session as the README's earlier blocks: activated, bundle built
        first = [c for b in blocks if b.lang == "bash" for c in b.commands]
        lines += [_echo(c.text) + "\n" + c.text for c in first if c.words[:1] == ["."]][:1]
        lines += [_echo("make bundle TARGET=cpu") + "\nmake bundle TARGET=cpu"]
    for block in chosen:
        lines.append(f"echo '=== README line {block.line}: {block.heading}'")
        if block.lang == "python":
            lines.append(f"python - <<'PY'\n{block.body}\nPY")
            continue
        for cmd in block.commands:
            text = cmd.text
            flat = " ".join(cmd.words)
            if flat in NOT_RUN:
                lines.append(f"echo {shlex.quote(f'(walkthrough: not run: {flat}: {NOT_RUN[flat]})')}")
                continue
            for placeholder, value in PLACEHOLDERS.items():
                text = text.replace(placeholder, value)
            lines.append(_echo(text))
            if "keeps running" in cmd.comment:
                lines.append(f"setsid bash -c {shlex.quote(text)} &\n_groups+=($!)\n_wait_serving {SERVER_PORT}")
            elif cmd.words[:2] == ["slmops", "deploy"] and cmd.words[2:3] != ["status"]:
                lines.append(f"_deployed=1\n{text}")  # its container (default name) is removed at the end
            elif cmd.words[:3] == ["docker", "run", "-d"]:
                lines.append(f"_cid=$({text})\n_containers+=(\"$_cid\")\n_wait_serving {SERVER_PORT}")
            else:
                lines.append(text)
    lines.append("echo '=== walkthrough done'")
    return "\n".join(lines) + "\n"


def _echo(text: str) -> str:
    return "echo " + shlex.quote("+ " + text)


def test_walkthrough_script_runs_servers_in_the_background_and_stops_them() -> None:
    script = walkthrough_script({"host"})
    assert "setsid bash -c 'make serve TARGET=cpu" in script and "_wait_serving 50051" in script
    assert "\nmake test\n" not in script and "(walkthrough: not run: make test" in script
    assert script.index("make bundle TARGET=cpu") < script.index("make serve") < script.index(". .venv/bin/activate")
    containers = walkthrough_script({"containers", "containers-arm64"})
    assert "\nmake images OFFLINE=1 " in containers and "\ndocker rm -f slmops-try " in containers
    assert "_cid=$(docker run -d --init" in containers and "slmops deploy --host local --bundle dist/bundles/cpu" in containers
    assert "ssh://pi@edge-1" not in containers and "reg.lan" not in containers


@pytest.mark.parametrize("part", ["host", "containers"])
def test_readme_walkthrough(part: str, tmp_path: Path) -> None:
    wanted = os.environ.get(WALKTHROUGH_ENV, "")
    if part not in wanted.split(","):
        pytest.skip(f"the README walkthrough runs in CI ({WALKTHROUGH_ENV}={part}: .ci/run, scripts/ci_containers.sh)")
    parts = {part}
    if part == "containers" and os.environ.get("SLMOPS_CI_ARM64", "1") == "1":
        parts.add("containers-arm64")
    script = tmp_path / f"walkthrough-{part}.sh"
    script.write_text(walkthrough_script(parts))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    env.setdefault("SLMOPS_DEPLOY_STATE", str(tmp_path / "deployments.json"))  # not the CI user's own record
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO / ".venv")))
    done = subprocess.run(["bash", str(script)], cwd=REPO, env=env, timeout=3600)
    assert done.returncode == 0, f"the README walkthrough ({part}) failed; the command above the error is the README's"


def test_make_images_on_this_machine_uses_docker_s_architecture_names() -> None:
    """`make images OFFLINE=1` as typed, top-level: the wheelhouse, base image and tags get amd64/arm64
    (uname -m says x86_64/aarch64, which the scripts refuse); ARCH= on the command line too."""
    import platform

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    for extra, arches in (([], arch), ([f"ARCH={arch}"], arch), (["ARCH=amd64,arm64"], "amd64,arm64")):
        done = subprocess.run(["make", "-n", "--no-print-directory", "images", "OFFLINE=1", *extra], cwd=REPO,
                              capture_output=True, text=True, timeout=120, env={**os.environ, "MAKEFLAGS": ""})
        assert done.returncode == 0, done.stderr
        assert f"ARCHES={arches} scripts/make_wheelhouse.sh" in done.stdout, done.stdout[:2000]
        assert f"ARCH={arch} DOCKER=" in done.stdout and "x86_64" not in done.stdout and "aarch64" not in done.stdout
        assert f"slmops-serve:{_version()}-{arch}" in done.stdout
