"""HTTP (OpenAI-compatible) vs gRPC on one `slmops serve` process: the cost of the HTTP stack.

    .venv/bin/python bench/bench_http.py dist/bundles/cpu    # -> bench/results/http_cpu.new.json

Runs `slmops serve BUNDLE --http-port` as a subprocess and measures, interleaved in one run (the
order alternates every repeat, so drift on a shared machine hits both sides alike):
  1. aggregate stream tok/s over HTTP SSE vs gRPC GenerateStream, 1 and 4 concurrent streams, every
     request forced to the same length (min_tokens = max_tokens): goal HTTP / gRPC >= 0.95. The
     HTTP client is http.client reading the SSE lines (no JSON parsing per event), the gRPC client
     iterates the stream's messages: each side's client does the least its protocol needs;
     the official `openai` client is measured too (it parses every event into pydantic objects);
  2. client-side time to first token on both;
  3. structured output over HTTP: decode tok/s of json_schema-guided requests (the extract schema)
     vs the same requests unguided on the same adapter: goal >= 0.9.
Timings on a shared machine swing: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a long, detailed story about a small robot who learns to paint. Describe every color it discovers."
EXTRACT_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 32},
                                                   "date": {"type": "string", "maxLength": 32},
                                                   "guests": {"type": "integer", "minimum": 1, "maximum": 50}},
                  "required": ["city", "date", "guests"], "additionalProperties": False}
GOALS = {"http_over_grpc": 0.95, "guided_over_unguided": 0.9}

sys.path.insert(0, str(REPO / "bench"))
from bench_serve import free_port, start_tied  # noqa: E402
from bench_serve import versions as serve_versions  # noqa: E402


def versions() -> dict[str, str]:
    return serve_versions(("slmops", "onnxruntime", "grpcio", "fastapi", "starlette", "uvicorn", "openai", "llguidance"))


class Server:
    """`slmops serve` with gRPC and HTTP on free ports."""

    def __init__(self, bundle: Path, threads: int | None, max_batch: int, log: Path) -> None:
        self.port, self.http_port = free_port(), free_port()
        args = [sys.executable, "-m", "slmops.cli", "serve", str(bundle), "--host", "127.0.0.1", "--port", str(self.port),
                "--http-port", str(self.http_port), "--no-metrics", "--max-batch", str(max_batch),
                "--max-new-tokens-limit", "4096", "--log-level", "WARNING"]
        if threads:
            args += ["--threads", str(threads)]
        self.log = log.open("w")
        self.proc = start_tied(args, stdout=self.log, stderr=subprocess.STDOUT,
                               env={**os.environ, "SLMOPS_ADMIN_TOKEN": ""})

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"slmops serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def http_stream(port: int, body: dict[str, Any], path: str = "/v1/completions") -> dict[str, Any]:
    """One SSE request read line by line; tokens from the usage chunk (include_usage)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    conn.request("POST", path, body=json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
                 headers={"content-type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first = last = None
    usage_line = b""
    events = 0
    while True:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        now = time.perf_counter()
        if line.startswith(b"data: [DONE]"):
            break
        events += 1
        if b'"usage":{' in line:
            usage_line = line
        elif first is None:
            first = now
        last = now
    conn.close()
    tokens = json.loads(usage_line[6:])["usage"]["completion_tokens"] if usage_line else 0
    end = time.perf_counter()
    return {"tokens": tokens, "events": events, "ttft_s": (first or end) - started, "total_s": end - started,
            "decode_s": (last or end) - (first or end)}


def openai_stream(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    first = None
    tokens = 0
    known = {k: v for k, v in body.items() if k != "min_tokens"}
    stream = client.completions.create(stream=True, stream_options={"include_usage": True},
                                       extra_body={"min_tokens": body["min_tokens"]}, **known)
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        elif first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": tokens, "ttft_s": (first or end) - started, "total_s": end - started}


def grpc_stream(client: Any, prompt: str, adapter: str, tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    first = None
    last = None
    for message in client.generate_stream(prompt, adapter=adapter, max_new_tokens=tokens, min_new_tokens=tokens):
        if first is None:
            first = time.perf_counter()
        last = message
    end = time.perf_counter()
    return {"tokens": last.usage.completion_tokens if last is not None else 0, "ttft_s": (first or end) - started,
            "total_s": end - started}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_concurrent(fn: Any, streams: int, per_stream: int, server_pid: int) -> dict[str, Any]:
    """``streams`` clients at once, each sending ``per_stream`` requests one after the other; wall
    tok/s, and the CPU time the server and this client process spent per token."""
    server_cpu, client_cpu = cpu_seconds(server_pid), time.process_time()
    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        records = [r for batch in pool.map(lambda _: [fn() for _ in range(per_stream)], range(streams)) for r in batch]
    wall = time.perf_counter() - started
    total = sum(r["tokens"] for r in records)
    return {"tok_s": total / wall, "tokens": total, "wall_s": wall, "ttft_s": [r["ttft_s"] for r in records],
            "server_cpu_us_per_token": (cpu_seconds(server_pid) - server_cpu) / total * 1e6,
            "client_cpu_us_per_token": (time.process_time() - client_cpu) / total * 1e6}


def bench_protocols(server: Server, grpc_client: Any, oai: Any, adapter: str, tokens: int, streams: int,
                    reps: int, per_stream: int) -> dict[str, Any]:
    body = {"model": adapter, "prompt": PROMPT, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
    sides = {
        "grpc": lambda: grpc_stream(grpc_client, PROMPT, adapter, tokens),
        "http": lambda: http_stream(server.http_port, body),
        "http_openai_client": lambda: openai_stream(oai, body),
    }
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    for rep in range(reps):
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for name in order:
            runs[name].append(run_concurrent(sides[name], streams, per_stream, server.proc.pid))
    ratios = [h["tok_s"] / g["tok_s"] for h, g in zip(runs["http"], runs["grpc"], strict=True)]
    ratios_oai = [h["tok_s"] / g["tok_s"] for h, g in zip(runs["http_openai_client"], runs["grpc"], strict=True)]
    out: dict[str, Any] = {"streams": streams, "tokens_per_request": tokens, "requests_per_stream": per_stream,
                           "reps": reps}
    for name, records in runs.items():
        ttfts = [t for r in records for t in r["ttft_s"]]
        out[name] = {"tok_s_median": round(statistics.median(r["tok_s"] for r in records), 2),
                     "tok_s_all": [round(r["tok_s"], 2) for r in records],
                     "ttft_ms_median": round(statistics.median(ttfts) * 1000, 2),
                     "server_cpu_us_per_token_median": round(statistics.median(r["server_cpu_us_per_token"] for r in records), 1),
                     "client_cpu_us_per_token_median": round(statistics.median(r["client_cpu_us_per_token"] for r in records), 1)}
        assert all(r["tokens"] == tokens * streams * per_stream for r in records), (name, [r["tokens"] for r in records])
    out["http_over_grpc_median"] = round(statistics.median(ratios), 3)
    out["http_over_grpc_all"] = [round(r, 3) for r in ratios]
    out["openai_client_over_grpc_median"] = round(statistics.median(ratios_oai), 3)
    # CPU per token does not swing with other processes' load the way wall time does
    out["server_cpu_per_token_http_over_grpc"] = round(
        out["http"]["server_cpu_us_per_token_median"] / out["grpc"]["server_cpu_us_per_token_median"], 3)
    return out


def bench_guided(server: Server, adapter: str, prompts: list[str], tokens: int, reps: int) -> dict[str, Any]:
    """Decode tok/s (first to last token, client side) of schema-guided vs unguided requests."""
    fmt = {"type": "json_schema", "json_schema": {"name": "booking", "schema": EXTRACT_SCHEMA}}
    rates: dict[str, list[float]] = {"guided": [], "unguided": []}
    valid = 0
    count = 0
    for rep in range(reps):
        for prompt in prompts:
            for name in (("guided", "unguided") if rep % 2 == 0 else ("unguided", "guided")):
                body: dict[str, Any] = {"model": adapter, "messages": [{"role": "user", "content": prompt}],
                                        "max_tokens": tokens, "temperature": 0}
                if name == "guided":
                    body["response_format"] = fmt
                record = http_stream(server.http_port, body, "/v1/chat/completions")
                if record["tokens"] > 2 and record["decode_s"] > 0:
                    rates[name].append((record["tokens"] - 1) / record["decode_s"])
                if name == "guided" and rep == 0:
                    count += 1
                    text = whole_text(server.http_port, {**body, "stream": False})
                    try:
                        value = json.loads(text)
                        valid += isinstance(value, dict) and set(value) == set(EXTRACT_SCHEMA["required"])
                    except ValueError:
                        pass
    guided, unguided = statistics.median(rates["guided"]), statistics.median(rates["unguided"])
    return {"adapter": adapter, "requests": len(prompts) * reps, "guided_decode_tok_s_median": round(guided, 2),
            "unguided_decode_tok_s_median": round(unguided, 2), "guided_over_unguided": round(guided / unguided, 3),
            "schema_valid": f"{valid}/{count}"}


def whole_text(port: int, body: dict[str, Any]) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    payload = json.loads(conn.getresponse().read())
    conn.close()
    return str(payload["choices"][0]["message"]["content"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the bundle's)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request (forced)")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--requests-per-stream", type=int, default=4, help="requests each client sends in one run")
    parser.add_argument("--adapter", default="", help="adapter of the protocol runs ('' = base)")
    parser.add_argument("--guided-adapter", default="extract", help="adapter of the guided run (the base when the "
                        "bundle lacks it; '' = the base)")
    parser.add_argument("--skip-guided", action="store_true")
    parser.add_argument("--guided-rows", type=int, default=10, help="extract eval rows for the guided run")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON  [default: bench/results/http_<bundle folder name>.new.json, beside the README's]")
    args = parser.parse_args(argv)
    args.out = args.out or REPO / "bench" / "results" / f"http_{args.bundle.resolve().name}.json"
    if args.out:  # never over a committed results file (bench/readme_figures.py)
        from readme_figures import beside_committed

        args.out = beside_committed(args.out)

    import openai
    from slmops_serve.client import SlmopsClient

    bundle = args.bundle.resolve()
    manifest = json.loads((bundle / "bundle.json").read_text())
    log = args.out.with_suffix(".server.log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = Server(bundle, args.threads, args.max_batch, log)
    result: dict[str, Any] = {"bundle": str(bundle), "target": manifest["target"], "base_model": manifest["base_model"]["name"],
                              "goals": GOALS, "versions": versions(), "load_avg_before": os.getloadavg()}
    try:
        server.wait_ready()
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="x", max_retries=0, timeout=600)
        with SlmopsClient(f"127.0.0.1:{server.port}", timeout=600) as grpc_client:
            for _ in range(2):  # warm both paths
                grpc_stream(grpc_client, PROMPT, args.adapter, 8)
                http_stream(server.http_port, {"model": args.adapter, "prompt": PROMPT, "max_tokens": 8})
            result["protocols"] = []
            for streams in [int(s) for s in args.concurrency.split(",") if s]:
                record = bench_protocols(server, grpc_client, oai, args.adapter, args.tokens, streams, args.reps,
                                         args.requests_per_stream)
                print(json.dumps({k: record[k] for k in ("streams", "http_over_grpc_median", "openai_client_over_grpc_median",
                                                         "server_cpu_per_token_http_over_grpc")}
                                 | {"grpc_tok_s": record["grpc"]["tok_s_median"], "http_tok_s": record["http"]["tok_s_median"]}),
                      flush=True)
                result["protocols"].append(record)
        if not args.skip_guided:
            guided_adapter = args.guided_adapter if args.guided_adapter in manifest.get("adapters", {}) else ""
            rows = [json.loads(line)["request"] for line in
                    (REPO / "examples" / "extract" / "eval.jsonl").read_text().splitlines()[:args.guided_rows]]
            result["guided"] = bench_guided(server, guided_adapter, rows, 96, 2)
            print(json.dumps(result["guided"]), flush=True)
    finally:
        server.stop()
        result["load_avg_after"] = os.getloadavg()
    worst = min(r["http_over_grpc_median"] for r in result["protocols"])
    result["summary"] = {"http_over_grpc_worst_median": worst, "meets_http_goal": worst >= GOALS["http_over_grpc"]}
    if "guided" in result:
        result["summary"]["guided_over_unguided"] = result["guided"]["guided_over_unguided"]
        result["summary"]["meets_guided_goal"] = result["guided"]["guided_over_unguided"] >= GOALS["guided_over_unguided"]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
