#!/usr/bin/env python3
"""`make bench`: what modelgate adds to every request, measured in one run
against bare Envoy, the backend directly, and LiteLLM, on the same simulator; each route's cost
over its floor (the least any body-routing wasm filter, or ext_proc service, costs Envoy); what a
response cache hit costs;
OpenAI's Responses API and Anthropic's Messages API streamed through their translation into chat
completions; a batch of chat completions run through the Batch API; and a self-hosted pool's
replica picking against Envoy's own balancing, on simulated vLLM engines.

    python bench/run.py [--short] [--out DIR]

Every figure is reported against bare Envoy measured in the same run: these
machines are shared and noisy, and absolute numbers mean little on their own.
Writes DIR/bench-<time>.json, .md and .svg (latency against offered rate).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import secrets
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from devstack import (ADMIN_PORT, BIN, DEMO_CONFIG, EXT_PROC_PORT, INNER_LISTENER_PORT, LISTENER_PORT,  # noqa: E402
                      POOL_REPLICAS, STREAM_GUARD_PORT, Stack, edit_filter_config, free_port)

LOADGEN = ROOT / "target" / "release" / "modelgate-loadgen"
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
BARE_CONFIG = ROOT / "bench" / "bare-envoy.yaml"
# The floors: the least any body-routing wasm filter, and any ext_proc service behind one, cost
# Envoy, and the least a body read by Envoy's native json_to_metadata costs, with and without a
# wasm filter reading its metadata; and what a second pass through Envoy costs, as a stream through
# the stream guard takes one (docs/performance.md). Each is an Envoy on bare Envoy's
# listener, cluster and backend; start_floors starts them. Scenario -> (the Envoy's process name,
# its configuration).
FLOORS = {"floor_wasm": ("floor-wasm-envoy", ROOT / "bench" / "floor-wasm.yaml"),
          "floor_wasm_header": ("floor-wasm-header-envoy", ROOT / "bench" / "floor-wasm-header.yaml"),
          "floor_ext_proc": ("floor-ext-proc-envoy", ROOT / "bench" / "floor-ext-proc.yaml"),
          "floor_native_model": ("floor-native-model-envoy", ROOT / "bench" / "floor-native-model.yaml"),
          "floor_native_route": ("floor-native-route-envoy", ROOT / "bench" / "floor-native-route.yaml"),
          "floor_two_pass": ("floor-two-pass-envoy", ROOT / "bench" / "floor-two-pass.yaml"),
          "floor_relay": ("floor-relay-envoy", ROOT / "bench" / "floor-relay.yaml")}
# What they load and call: the floor filter (bench/floor-filter) and the ext_proc service answering
# "continue" (bench/continue-ext-proc), which floor_ext_proc's Envoy calls on EXT_PROC_PORT.
FLOOR_FILTER = ROOT / "target" / "wasm32-wasip1" / "release" / "modelgate_floor_filter.wasm"
CONTINUE_EXT_PROC = BIN / "modelgate-continue-ext-proc"
# The process floor_relay's Envoy sends each request through between its passes (bench/floor-relay).
FLOOR_RELAY = BIN / "modelgate-floor-relay"
# Each route's floor: its added cost over it is modelgate's own.
ROUTE_FLOORS = {**{s: "floor_wasm_header" for s in ["unaccounted", "passthrough", "cache_hit", "rate_limited", "rename"]},
                **{s: "floor_ext_proc" for s in ["pool", "anthropic", "ollama"]}}
BACKEND = "vllm-llama"
MODEL = "llama-3.1-8b-instruct"      # routed straight to BACKEND
RENAMED = "gpt-4o-mini"              # routed to BACKEND, renamed by the filter
CHAINED = "resilient-llama"          # BACKEND first of a fallback chain, through the stream guard
POOLED = "qwen3-8b"                  # the demo's pool of four replicas, each request's replica picked by ext-proc
# Models of the demo's translated backends: the same simulator behind another dialect.
TRANSLATED = {"anthropic": "claude-sonnet-4-6", "ollama": "llama3.2"}
CHAT = "/v1/chat/completions"
# The client APIs besides chat completions, by scenario: each is sent to THROUGH_CHAT, an
# OpenAI-dialect backend that does not serve them itself, so ext-proc translates the request into
# a chat completion and the chat stream back into the API's own events.
CLIENT_APIS = {"responses": "/v1/responses", "messages": "/v1/messages"}
THROUGH_CHAT = "qwen-2.5-7b-instruct"
# Where each API's request holds the prompt and the bound on the answer's tokens.
API_FIELDS = {CHAT: ("messages", "max_tokens"), "/v1/responses": ("input", "max_output_tokens"),
              "/v1/messages": ("messages", "max_tokens")}
PROMPT = [{"role": "user", "content": "Hello, how are you today?"}]
# Lines of the batch scenario, full and short.
BATCH_LINES = 10_000
SHORT_BATCH_LINES = 1_000
BATCH_TIMEOUT_S = 600

# On two or more CPUs, the gateway under test (Envoy, ext-proc, stream guard) and its peer (LiteLLM) get
# CPU 1 to themselves, while the load generator and the backend share CPU 0: a 2-core
# machine is otherwise so contended that the figures measure the scheduler, not the gateway.
PINNING = ({name: "1" for name in ["envoy", "bare-envoy", "keyed-envoy", "quiet-envoy", "cached-envoy", "ext-proc",
                                    "stream-guard", "litellm", *(envoy for envoy, _ in FLOORS.values()),
                                    "continue-ext-proc", "floor-relay"]}
           | {name: "0" for name in ["vllm-llama", "sglang-qwen", "llamacpp-mistral", *TRANSLATED, *POOL_REPLICAS,
                                     "loadgen"]}
           if (os.cpu_count() or 1) >= 2 else {})

# The rate-limited route: a second gateway Envoy whose one client key has request and token limits
# (on the key and on MODEL) far above any rate here, so every request pays for the checks and the
# token debit, and none is refused.
BENCH_KEY = f"sk-bench-{secrets.token_hex(8)}"


def gateway(*edits):
    """An Envoy configuration's adjustment: the demo's filter configuration with the cache's store
    and idempotency configured and no route caching (every gateway here has a cache, and its routes
    pay nothing for it unless they cache), then `edits` applied."""
    def edit(routing: dict) -> None:
        routing.setdefault("cache", {"cluster": "modelgate_admin"})
        routing.setdefault("idempotency", {})
        for holder in [*routing["models"], *routing["backends"].values()]:
            holder.pop("cache", None)
        for more in edits:
            more(routing)
    return lambda config: edit_filter_config(config, edit)


def with_limited_key(routing: dict) -> None:
    limits = {"requests_per_minute": 60_000_000, "tokens_per_minute": 60_000_000,
              "models": {MODEL: {"requests_per_minute": 60_000_000, "tokens_per_minute": 60_000_000}}}
    digest = hashlib.sha256(BENCH_KEY.encode()).hexdigest()
    routing["client_keys"] = [{"name": "bench", "sha256": digest, "limits": limits}]


def with_cached_model(routing: dict) -> None:
    """The cache-hit route: MODEL's answers cached (deterministic requests only, as by default), so
    the same `temperature: 0` request is a hit after its first."""
    next(route for route in routing["models"] if route["match"] == MODEL)["cache"] = {"ttl_secs": 3600}


def without_accounting(routing: dict) -> None:
    """The demo without usage records: what accounting costs is the difference (budgets, which
    need them, go too)."""
    routing.pop("accounting")
    routing.pop("budgets", None)


def cache_hits(stack: Stack, envoy_admin_port: int) -> float:
    """Cache hits so far: ext-proc's (`modelgate_cache_lookups_total{result="hit"}`) and those
    the cached gateway's worker answered from its own copies (`modelgate.cache.local_hits`)."""
    with urllib.request.urlopen(f"{stack.ext_proc_admin_url}/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    from_store = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                     if line.startswith("modelgate_cache_lookups_total{") and 'result="hit"' in line)
    stats_url = f"http://127.0.0.1:{envoy_admin_port}/stats?filter=modelgate.cache.local_hits"
    with urllib.request.urlopen(stats_url, timeout=10) as answer:
        stats = answer.read().decode()
    from_copies = sum(float(line.rsplit(" ", 1)[1]) for line in stats.splitlines() if line.strip())
    return from_store + from_copies


STREAM_TOKENS = 20
STREAM_ITL_MS = 10
# What asks the simulator for such a stream.
STREAM_HEADERS = {"x-sim-output-tokens": str(STREAM_TOKENS), "x-sim-itl-ms": str(STREAM_ITL_MS)}


class Run:
    def __init__(self, short: bool):
        self.short = short
        self.duration = 1.0 if short else 5.0
        self.warmup = 0.2 if short else 1.0
        # scenario -> (url, model, headers of that scenario)
        self.urls: dict[str, tuple[str, str, dict[str, str]]] = {}
        # scenario -> members its requests' bodies add
        self.body_extras: dict[str, dict] = {}
        # The cache-hit gateway's Envoy admin port, whose stats count hits answered from its copies.
        self.cached_admin_port = 0

    def load(self, scenario: str, *, rate: float | None = None, concurrency: int | None = None,
             stream: bool = False, headers: dict[str, str] | None = None, duration: float | None = None) -> dict:
        url, model, scenario_headers = self.urls[scenario]
        prompt, bound = API_FIELDS[urllib.parse.urlsplit(url).path]
        body = {"model": model, prompt: PROMPT, bound: 16, **self.body_extras.get(scenario, {})}
        if stream:
            body["stream"] = True
        argv = [*(["taskset", "-c", PINNING["loadgen"]] if PINNING else []), str(LOADGEN), "--url", url, "--body", json.dumps(body),
                "--duration", str(duration or self.duration), "--warmup", str(self.warmup)]
        argv += ["--rate", str(rate)] if rate else ["--concurrency", str(concurrency or 1)]
        for name, value in {**scenario_headers, **(headers or {})}.items():
            argv += ["--header", f"{name}: {value}"]
        result = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
        result["scenario"] = scenario
        return result


def status_kib(pid: int, field: str) -> int:
    """A memory figure of /proc/<pid>/status (VmRSS, VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    return status_kib(pid, "VmRSS")


def reset_peak_rss(pid: int) -> None:
    """Starts the process's VmHWM afresh from its RSS now (Linux's clear_refs, value 5), so the peak
    read later is this scenario's, not the open streams' before it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(stack: Stack, names: list[str], load) -> dict:
    """The result of `load()`, with the CPU µs per successful request (or stream) of each named process."""
    pids = {name: stack.pid(name) for name in names}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = load()
    served = max(result["ok"] + result["warmup_ok"], 1)
    result["cpu_us_per_request"] = {name: (cpu_seconds(pid) - before[name]) / served * 1e6 for name, pid in pids.items()}
    return result


def start_continue_ext_proc(stack: Stack) -> int:
    """Starts the continue ext_proc service (`continue-ext-proc`) the floors call; returns its port."""
    for artifact in [FLOOR_FILTER, CONTINUE_EXT_PROC]:
        if not artifact.exists():
            sys.exit(f"{artifact} is missing: run `make bench`, which builds it")
    port = free_port()
    stack.spawn("continue-ext-proc", [str(CONTINUE_EXT_PROC), "--listen", f"127.0.0.1:{port}"])
    stack.wait_for_port(port)
    return port


def floor_ports(stack: Stack, ext_proc_port: int) -> dict[int, int]:
    """A floor Envoy's ports: a listener, a second listener and admin of its own, `stack`'s backend,
    the continue ext_proc service on `ext_proc_port`, and a port for floor_relay's relay."""
    return {LISTENER_PORT: free_port(), INNER_LISTENER_PORT: free_port(), ADMIN_PORT: free_port(),
            8001: stack.ports[8001], EXT_PROC_PORT: ext_proc_port, STREAM_GUARD_PORT: free_port()}


def start_floors(stack: Stack) -> dict[str, int]:
    """Starts the continue ext_proc service and each floor's Envoy (FLOORS) in front of `stack`'s
    backend, pinned as the gateway is; returns each floor's listener port."""
    ext_proc_port = start_continue_ext_proc(stack)
    if not FLOOR_RELAY.exists():
        sys.exit(f"{FLOOR_RELAY} is missing: run `make bench`, which builds it")
    listeners = {}
    for scenario, (name, config) in FLOORS.items():
        ports = floor_ports(stack, ext_proc_port)
        if scenario == "floor_relay":
            stack.spawn("floor-relay", [str(FLOOR_RELAY), "--listen", f"127.0.0.1:{ports[STREAM_GUARD_PORT]}",
                                        "--upstream", f"127.0.0.1:{ports[INNER_LISTENER_PORT]}"])
            stack.wait_for_port(ports[STREAM_GUARD_PORT])
        stack.start_envoy(name, config, ports)
        listeners[scenario] = ports[LISTENER_PORT]
    return listeners


def start_litellm(stack: Stack, backend_url: str) -> tuple[int, str] | None:
    """LiteLLM's proxy with one worker in front of the same backend, if `make bench` installed it.
    Returns its port and the key it requires."""
    if not LITELLM.exists():
        return None
    port = free_port()
    key = f"sk-{secrets.token_hex(16)}"
    config = stack.workdir / "litellm.yaml"
    config.write_text(json.dumps({"model_list": [{"model_name": MODEL, "litellm_params": {
        "model": f"openai/{MODEL}", "api_base": f"{backend_url}/v1", "api_key": "unused"}}]}))
    # No network at start-up (local cost map), no telemetry, errors only.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(stack.workdir), "LITELLM_MASTER_KEY": key, "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    stack.spawn("litellm", [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                            "--num_workers", "1"], env=env)
    stack.wait_for_port(port, timeout=180)
    return port, key


def measure(run: Run, stack: Stack) -> dict:
    results: dict = {"short": run.short, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    scenarios = [s for s in ["direct", "bare", *FLOORS, "unaccounted", "passthrough", "cache_hit", "rate_limited", "rename",
                             "pool", "fallbacks", *TRANSLATED, "litellm"] if s in run.urls]

    # Closed loop: the most each scenario serves.
    concurrency = 4 if run.short else 16
    # Rounds interleave the scenarios so a noisy neighbour hits them alike; the median round counts.
    # CPU time per request of the processes doing the serving shows where the time goes; an
    # Envoy's is named first.
    serving = {"direct": [BACKEND], "bare": ["bare-envoy"], "unaccounted": ["quiet-envoy"],
               "floor_wasm": ["floor-wasm-envoy"], "floor_wasm_header": ["floor-wasm-header-envoy"],
               "floor_ext_proc": ["floor-ext-proc-envoy", "continue-ext-proc"],
               "floor_native_model": ["floor-native-model-envoy"], "floor_native_route": ["floor-native-route-envoy"],
               "floor_two_pass": ["floor-two-pass-envoy"], "floor_relay": ["floor-relay-envoy", "floor-relay"],
               "passthrough": ["envoy", "ext-proc"], "cache_hit": ["cached-envoy", "ext-proc"],
               "rate_limited": ["keyed-envoy", "ext-proc"],
               "rename": ["envoy", "ext-proc"], "pool": ["envoy", "ext-proc"], "fallbacks": ["envoy", "stream-guard"], "litellm": ["litellm"],
               **{dialect: ["envoy", "ext-proc"] for dialect in TRANSLATED}}
    rounds: dict[str, list[dict]] = {s: [] for s in scenarios}
    for _ in range(1 if run.short else 3):
        for s in scenarios:
            hits_before = cache_hits(stack, run.cached_admin_port) if s == "cache_hit" else 0
            rounds[s].append(with_cpu(stack, serving[s], lambda: run.load(s, concurrency=concurrency)))
            if s == "cache_hit":
                # Every request answered from the cache, or the row measures something else.
                rounds[s][-1]["cache_hits"] = cache_hits(stack, run.cached_admin_port) - hits_before
    results["throughput"] = {s: sorted(r, key=lambda x: x["throughput_rps"])[len(r) // 2] for s, r in rounds.items()}
    bare_max = results["throughput"]["bare"]["throughput_rps"]

    # Open loop: latency at fixed offered rates, scenarios interleaved so drift hits all alike.
    fractions = [0.1, 0.5] if run.short else [0.1, 0.25, 0.5, 0.75]
    rates = sorted({round(bare_max * f) for f in fractions} | ({1000} if bare_max > 1200 and not run.short else set()))
    sweep = []
    capacity = {s: r["throughput_rps"] for s, r in results["throughput"].items()}
    for rate in rates:
        for s in ["direct", "bare", *FLOORS, "unaccounted", "passthrough", "cache_hit", "rate_limited", "rename",
                  "pool"]:
            # Past its capacity a scenario only queues without bound; its latency there says nothing.
            if rate <= 0.9 * capacity[s]:
                sweep.append(run.load(s, rate=rate))
    if "litellm" in scenarios:
        peer_max = results["throughput"]["litellm"]["throughput_rps"]
        for f in [0.25, 0.5, 0.75]:
            rate = max(1, round(peer_max * f))
            for s in ["bare", "passthrough", "litellm"]:
                sweep.append(run.load(s, rate=rate))
    results["latency"] = sweep

    # Streams of STREAM_TOKENS chunks, STREAM_ITL_MS apart, at a modest fixed rate. The backend's own
    # timer jitter moves a gap's p99 by a millisecond or more from one run to the next, so the
    # scenarios are interleaved over rounds and each one's median round (by gap p99) counts.
    stream_rate = 20 if run.short else 100
    # The two-pass floor: what a guarded stream's second pass through Envoy costs alone; the relay
    # floor: that, with a process between the passes that only copies bytes.
    guarded = ["passthrough", "rename", *TRANSLATED, *CLIENT_APIS]
    streamed = ["direct", "bare", "floor_two_pass", "floor_relay", *guarded]
    stream_rounds: dict[str, list[dict]] = {s: [] for s in streamed}
    # Per stream, CPU time is steady where the gap's p99 is not: it says what a stream costs each process.
    stream_serving = {"direct": [BACKEND], "bare": ["bare-envoy"], "floor_two_pass": ["floor-two-pass-envoy"],
                      "floor_relay": ["floor-relay-envoy", "floor-relay"],
                      **{s: ["envoy", "stream-guard", "ext-proc"] for s in guarded}}
    for _ in range(1 if run.short else 5):
        for s in streamed:
            stream_rounds[s].append(with_cpu(stack, stream_serving[s], lambda: run.load(
                s, rate=stream_rate, stream=True, headers=STREAM_HEADERS)))
    results["streaming"] = {s: sorted(r, key=lambda x: x["chunk_gap"]["p99_ms"])[len(r) // 2]
                            for s, r in stream_rounds.items()}

    # Memory with many open streams through the rename route (and the stream guard).
    open_streams = 50 if run.short else 1000
    pids = {name: stack.pid(name) for name in ["envoy", "ext-proc", "stream-guard"]}
    before = {name: rss_kib(pid) for name, pid in pids.items()}
    peak = dict(before)
    sampling = True

    def sample():
        while sampling:
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss_kib(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        held = run.load("rename", concurrency=open_streams, stream=True, duration=3.0 if not run.short else 1.0,
                        headers={"x-sim-output-tokens": "20", "x-sim-itl-ms": "100"})
    finally:
        sampling = False
        sampler.join()
    results["memory"] = {"open_streams": open_streams, "stream_errors": held["errors"],
                         "rss_before_kib": before, "rss_peak_kib": peak}
    return results


def measure_batch(stack: Stack, lines: int) -> dict:
    """Uploads a JSONL of `lines` chat completions through the gateway, creates a batch of it, polls
    until it is finished, and reads its output back: lines per second from the create to the
    completed status, and ext-proc's peak memory (VmHWM) from the upload to the last result read."""
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused", timeout=120)
    source = stack.workdir / "batch-input.jsonl"
    with source.open("w") as f:
        for i in range(lines):
            f.write(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": MODEL, "messages": PROMPT, "max_tokens": 16}}) + "\n")
    pids = {name: stack.pid(name) for name in ["envoy", "ext-proc"]}
    ext_proc = pids["ext-proc"]
    rss_before = rss_kib(ext_proc)
    reset_peak_rss(ext_proc)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}

    started = time.monotonic()
    with source.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    upload_s = time.monotonic() - started
    created_at = time.monotonic()
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    in_progress_s = None
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        if time.monotonic() - created_at > BATCH_TIMEOUT_S:
            raise RuntimeError(f"batch {batch.id} still {batch.status} after {BATCH_TIMEOUT_S} s: "
                               f"{batch.request_counts}")
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
        if in_progress_s is None and batch.status != "validating":
            in_progress_s = time.monotonic() - created_at
    run_s = time.monotonic() - created_at
    cpu_run = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    if batch.status != "completed":
        raise RuntimeError(f"batch {batch.id} ended {batch.status}: {batch.errors}")

    # Every input line must be in the output or error file exactly once.
    seen: dict[str, int] = {}
    ok = 0
    for file_id in filter(None, [batch.output_file_id, batch.error_file_id]):
        for line in client.files.content(file_id).text.splitlines():
            result = json.loads(line)
            seen[result["custom_id"]] = seen.get(result["custom_id"], 0) + 1
            ok += bool(result.get("response") and result["response"]["status_code"] == 200)
    return {
        "lines": lines,
        "input_bytes": source.stat().st_size,
        "upload_s": upload_s,
        "validating_s": in_progress_s,
        "create_to_completed_s": run_s,
        "lines_per_s": lines / run_s,
        "request_counts": batch.request_counts.model_dump(),
        "lines_ok": ok,
        "lines_missing": sum(f"line-{i}" not in seen for i in range(lines)),
        "lines_repeated": sum(n - 1 for n in seen.values()),
        "cpu_us_per_line": {name: seconds / lines * 1e6 for name, seconds in cpu_run.items()},
        "ext_proc_rss_before_kib": rss_before,
        "ext_proc_peak_kib": status_kib(ext_proc, "VmHWM"),
    }


# The pool scenario: many users sharing a few long system prompts, each a multi-turn streamed chat
# resending its history, played closed loop over the demo's four replicas. The same seeded
# workload runs once per variant, each on a fresh stack (empty caches).
POOL_SEED = 16
POOL_SYSTEM_PROMPTS = 6
POOL_SYSTEM_WORDS = 3000             # the simulator counts a word as a token
POOL_QUESTION_WORDS = (20, 80)
POOL_OUTPUT_TOKENS = 24
# Each replica's engine, so that where a request goes decides what it costs, as on a GPU: prefill
# of an uncached token costs what an 8B model's does relative to a decode step (3,000 uncached
# tokens are ~0.3 s, a cached prefix nearly nothing); the KV cache (running requests' blocks
# included) holds under half of the system prompts' 18,000 tokens, so a replica that sees every
# prompt evicts them in turn, while one that sees one or two keeps them; a batch is bounded, and
# decoding slows as it grows.
POOL_ENGINE = {"--kv-cache-tokens": 8192, "--block-size": 16, "--max-num-seqs": 8, "--prefill-us-per-token": 100,
               "--itl-ms": 10, "--decode-slowdown": 0.05, "--output-tokens": POOL_OUTPUT_TOKENS}
# (conversations, turns each, closed-loop concurrency, time cap in seconds), full and short.
POOL_LOAD = {"full": (160, 4, 32, 60.0), "short": (24, 3, 16, 8.0)}


def envoy_balanced(lb_policy: str):
    """The demo with the pool's cluster balanced by Envoy alone (`lb_policy`), and its backend
    without a pool, so no request goes through ext_proc."""
    def adjust(config: dict) -> None:
        cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "vllm_pool")
        del cluster["load_balancing_policy"]
        cluster["lb_policy"] = lb_policy
        edit_filter_config(config, lambda routing: routing["backends"]["vllm-pool"].pop("pool"))
    return adjust


def picking(strategy: str):
    """The pools file with the demo pool's replicas picked by ext-proc with `strategy`."""
    return lambda pools: pools["pools"]["vllm-pool"].update(strategy=strategy)


POOL_VARIANTS = {
    "round_robin": {"adjust_config": envoy_balanced("ROUND_ROBIN")},
    "least_request": {"adjust_config": envoy_balanced("LEAST_REQUEST")},
    "prefix_cache": {"adjust_pools": picking("prefix_cache")},
    "combined": {"adjust_pools": picking("combined")},
}


def write_pool_workload(path: Path, conversations: int, turns: int) -> None:
    """The loadgen's conversations: each user's system prompt is one of a few, and each turn
    resends the history (the assistant's answers stand in as fixed text) with a new question.
    Users carry a session id, as chat front ends do."""
    rng = random.Random(POOL_SEED)

    # Three letters and a space: about the 4 bytes per token of English text, which the picker's
    # prefix index assumes when it sizes a replica's cache.
    def words(n: int) -> str:
        return " ".join("".join(rng.choices(string.ascii_lowercase, k=3)) for _ in range(n))

    prompts = [words(POOL_SYSTEM_WORDS) for _ in range(POOL_SYSTEM_PROMPTS)]
    answer = " ".join(["answer"] * POOL_OUTPUT_TOKENS)
    with path.open("w") as f:
        for user in range(conversations):
            messages = [{"role": "system", "content": rng.choice(prompts)}]
            bodies = []
            for _ in range(turns):
                messages.append({"role": "user", "content": words(rng.randint(*POOL_QUESTION_WORDS))})
                bodies.append({"model": POOLED, "messages": list(messages), "max_tokens": POOL_OUTPUT_TOKENS,
                               "stream": True})
                messages.append({"role": "assistant", "content": answer})
            f.write(json.dumps({"headers": {"x-session-id": f"user-{user}"}, "turns": bodies}) + "\n")


def replica_counters(stack: Stack) -> dict[str, dict[str, float]]:
    """Per replica: requests finished and prefix-cache block queries and hits, from its vLLM metrics."""
    names = {"vllm:request_success_total": "requests", "vllm:prefix_cache_queries_total": "prefix_queries",
             "vllm:prefix_cache_hits_total": "prefix_hits"}
    counters = {}
    for replica in POOL_REPLICAS:
        with urllib.request.urlopen(f"{stack.backend_url(replica)}/metrics", timeout=5) as r:
            text = r.read().decode()
        counts = dict.fromkeys(names.values(), 0.0)
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in names:
                counts[names[name]] += float(line.rsplit(" ", 1)[1])
        counters[replica] = counts
    return counters


def wait_until_pool_serves(stack: Stack) -> None:
    """Waits for the pool to answer a one-word request: the picker has no replica to pick until
    it has scraped them once."""
    body = json.dumps({"model": POOLED, "messages": [{"role": "user", "content": "ready"}], "max_tokens": 1}).encode()
    deadline = time.monotonic() + 30
    while True:
        request = urllib.request.Request(f"{stack.base_url}/chat/completions", data=body,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def measure_pools(short: bool) -> dict:
    """Each variant on a fresh stack, the same workload: TTFT, throughput and the replicas' counters."""
    conversations, turns, concurrency, cap = POOL_LOAD["short" if short else "full"]
    results = {"conversations": conversations, "turns": turns, "concurrency": concurrency,
               "engine": POOL_ENGINE, "variants": {}}
    engine = [str(arg) for pair in POOL_ENGINE.items() for arg in pair]
    with tempfile.TemporaryDirectory(prefix="modelgate-pools-") as workdir:
        workload = Path(workdir) / "conversations.jsonl"
        write_pool_workload(workload, conversations, turns)
        for variant, config in POOL_VARIANTS.items():
            with Stack(log_level="error", envoy_concurrency=1, cpus=PINNING,
                       simulator_args={replica: engine for replica in POOL_REPLICAS}, **config) as stack:
                wait_until_pool_serves(stack)
                before = replica_counters(stack)
                argv = [*(["taskset", "-c", PINNING["loadgen"]] if PINNING else []), str(LOADGEN),
                        "--url", f"{stack.base_url}/chat/completions", "--conversations", str(workload),
                        "--concurrency", str(concurrency), "--duration", str(cap), "--timeout", "120"]
                result = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
                after = replica_counters(stack)
            result["replicas"] = {replica: {k: after[replica][k] - before[replica][k] for k in after[replica]}
                                  for replica in POOL_REPLICAS}
            queries = sum(r["prefix_queries"] for r in result["replicas"].values())
            result["prefix_hit_rate"] = sum(r["prefix_hits"] for r in result["replicas"].values()) / queries \
                if queries else None
            results["variants"][variant] = result
    return results


def failed(result: dict) -> bool:
    """Whether a scenario got no answer at all: its figures would be empty histograms' zeros."""
    return result["ok"] == 0


def latency_at(results: dict, scenario: str, rate: float) -> dict | None:
    found = [r for r in results["latency"] if r["scenario"] == scenario and r["offered_rps"] == rate]
    return found[-1]["latency"] if found else None


def targets(results: dict) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, goal, met) rows; met is None where the run could not measure it."""
    tp = results["throughput"]
    bare = tp["bare"]["throughput_rps"]
    rows = []

    def ratio_row(name, scenario, goal):
        r = tp[scenario]["throughput_rps"] / bare
        rows.append((f"{name} throughput / bare Envoy", f"{r:.2f}x", f">= {goal}x", r >= goal))

    def envoy_cpu(result):
        return next(iter(result["cpu_us_per_request"].values()))

    # The filter's own cost: Envoy's CPU over the wasm floor's, both without accounting.
    added = envoy_cpu(tp["unaccounted"]) - envoy_cpu(tp["floor_wasm"])
    rows.append(("filter: Envoy CPU per request over the wasm floor (no accounting)", f"{added:+.1f} µs",
                 "<= 10 µs", added <= 10))
    ratio_row("passthrough without accounting", "unaccounted", 0.85)
    ratio_row("passthrough with accounting", "passthrough", 0.75)
    ratio_row("rename", "rename", 0.45)
    ratio_row("Anthropic translation (whole answers)", "anthropic", 0.35)
    cpu = {s: sum(tp[s]["cpu_us_per_request"].values()) for s in ["passthrough", "cache_hit"]}
    rows.append(("cache hit: CPU per request (Envoy + ext-proc) / passthrough's",
                 f"{cpu['cache_hit']:.1f} / {cpu['passthrough']:.1f} µs", "lower",
                 cpu["cache_hit"] < cpu["passthrough"]))
    # The ext_proc route: the pool's, whose replica ext-proc picks (a rename needs no ext_proc).
    for name, scenario, goal in [("passthrough", "passthrough", 0.5), ("ext_proc (pool)", "pool", 1.0)]:
        b, e = latency_at(results, "bare", 1000), latency_at(results, scenario, 1000)
        if b and e:
            added99 = e["p99_ms"] - b["p99_ms"]
            rows.append((f"{name} added p99 at 1000 rps", f"{added99:+.3f} ms", f"<= {goal} ms", added99 <= goal))
        else:
            rows.append((f"{name} added p99 at 1000 rps", "not measured (short run or bare < 1200 rps)",
                         f"<= {goal} ms", None))
    st = results["streaming"]
    for route in ["passthrough", "rename", *TRANSLATED, *CLIENT_APIS]:
        if failed(st[route]):
            rows.append((f"streaming {route}", f"not measured: all {st[route]['errors']} streams failed",
                         "<= 1 ms to first chunk, <= 0.2 ms gap", None))
            continue
        ttft = st[route]["first_chunk"]["p50_ms"] - st["bare"]["first_chunk"]["p50_ms"]
        gap = st[route]["chunk_gap"]["p99_ms"] - st["bare"]["chunk_gap"]["p99_ms"]
        rows.append((f"streaming {route}: added time to first chunk (p50)", f"{ttft:+.3f} ms", "<= 1 ms", ttft <= 1.0))
        rows.append((f"streaming {route}: added gap between chunks (p99)", f"{gap:+.3f} ms", "<= 0.2 ms", gap <= 0.2))
        if route in ["passthrough", "rename"]:
            r = envoy_cpu(st[route]) / envoy_cpu(st["bare"])
            rows.append((f"streaming {route}: Envoy CPU per stream / bare Envoy's", f"{r:.2f}x", "<= 1.3x", r <= 1.3))
    # What the guarded routes' two passes through Envoy cost with nothing else, and with a process
    # that only relays between them: the floors under both stream targets.
    for floor, what in [("floor_two_pass", "two passes through Envoy"),
                        ("floor_relay", "two passes through Envoy, a relay process between")]:
        if failed(st[floor]):
            continue
        r = envoy_cpu(st[floor]) / envoy_cpu(st["bare"])
        gap = st[floor]["chunk_gap"]["p99_ms"] - st["bare"]["chunk_gap"]["p99_ms"]
        rows.append((f"streaming floor, {what}: Envoy CPU per stream / bare Envoy's", f"{r:.2f}x",
                     "the floor under <= 1.3x", None))
        rows.append((f"streaming floor, {what}: added gap between chunks (p99)", f"{gap:+.3f} ms",
                     "the floor under <= 0.2 ms", None))
    if "litellm" in tp:
        r = tp["passthrough"]["throughput_rps"] / tp["litellm"]["throughput_rps"]
        rows.append(("passthrough throughput / LiteLLM", f"{r:.1f}x", ">= 20x", r >= 20))
        rate = max(1, round(tp["litellm"]["throughput_rps"] * 0.5))
        p, l = latency_at(results, "passthrough", rate), latency_at(results, "litellm", rate)
        if p and l:
            rows.append((f"p99 at {rate} rps: passthrough vs LiteLLM", f"{p['p99_ms']:.2f} vs {l['p99_ms']:.2f} ms",
                         "lower", p["p99_ms"] < l["p99_ms"]))
    else:
        rows.append(("passthrough throughput / LiteLLM", "not measured (short run, or LiteLLM not installed)",
                     ">= 20x", None))
    if "pools" in results:
        variants = results["pools"]["variants"]
        r = variants["combined"]["first_content"]["mean_ms"] / variants["round_robin"]["first_content"]["mean_ms"]
        rows.append(("pool: combined picker's mean TTFT / round robin's", f"{r:.2f}x", "<= 0.6x", r <= 0.6))
    return rows


def markdown(results: dict) -> str:
    tp = results["throughput"]
    bare = tp["bare"]["throughput_rps"]
    out = [f"# modelgate benchmark, {results['started']}{' (short run)' if results['short'] else ''}", "",
           "## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for name, measured, goal, met in targets(results):
        out.append(f"| {name} | {measured} | {goal} | {'yes' if met else 'no' if met is False else 'n/a'} |")
    out += ["", "## Throughput (closed loop, median of rounds) and CPU per request", "",
            "| scenario | req/s | vs bare Envoy | p50 ms | p99 ms | errors | CPU µs per request |",
            "|---|---|---|---|---|---|---|"]
    for s, r in tp.items():
        cpu = ", ".join(f"{name} {us:.1f}" for name, us in r.get("cpu_us_per_request", {}).items())
        out.append(f"| {s} | {r['throughput_rps']:.0f} | {r['throughput_rps'] / bare:.2f}x | "
                   f"{r['latency']['p50_ms']:.3f} | {r['latency']['p99_ms']:.3f} | {r['errors']} | {cpu} |")
    out += floors_markdown(tp)
    out += ["", "## Latency at fixed offered rates (open loop)", "",
            "| offered req/s | scenario | p50 ms | p90 ms | p99 ms | max ms | added p50 | added p99 | errors |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results["latency"]:
        b = latency_at(results, "bare", r["offered_rps"])
        l = r["latency"]
        added = (f"{l['p50_ms'] - b['p50_ms']:+.3f} | {l['p99_ms'] - b['p99_ms']:+.3f}") if b else "| "
        out.append(f"| {r['offered_rps']:.0f} | {r['scenario']} | {l['p50_ms']:.3f} | {l['p90_ms']:.3f} | "
                   f"{l['p99_ms']:.3f} | {l['max_ms']:.3f} | {added} | {r['errors']} |")
    out += ["", f"## Streaming ({STREAM_TOKENS} chunks, {STREAM_ITL_MS} ms apart)", "",
            "| scenario | first chunk p50 ms | added | chunk gap p50 ms | chunk gap p99 ms | added p99 | errors "
            "| CPU µs per stream |",
            "|---|---|---|---|---|---|---|---|"]
    st = results["streaming"]
    for s, r in st.items():
        if failed(r):
            out.append(f"| {s} | failed | | | | | {r['errors']} | |")
            continue
        cpu = ", ".join(f"{name} {us:.0f}" for name, us in r.get("cpu_us_per_request", {}).items())
        out.append(f"| {s} | {r['first_chunk']['p50_ms']:.3f} | "
                   f"{r['first_chunk']['p50_ms'] - st['bare']['first_chunk']['p50_ms']:+.3f} | "
                   f"{r['chunk_gap']['p50_ms']:.3f} | {r['chunk_gap']['p99_ms']:.3f} | "
                   f"{r['chunk_gap']['p99_ms'] - st['bare']['chunk_gap']['p99_ms']:+.3f} | {r['errors']} | {cpu} |")
    m = results["memory"]
    out += ["", f"## Memory with {m['open_streams']} open streams (rename route)", "",
            "| process | RSS before MiB | peak RSS MiB |", "|---|---|---|"]
    for name in m["rss_before_kib"]:
        out.append(f"| {name} | {m['rss_before_kib'][name] / 1024:.1f} | {m['rss_peak_kib'][name] / 1024:.1f} |")
    out.append(f"\nStreams that failed: {m['stream_errors']}.")
    if "batch" in results:
        out += batch_markdown(results["batch"])
    if "pools" in results:
        out += pools_markdown(results["pools"])
    return "\n".join(out) + "\n"


def floors_markdown(tp: dict) -> list[str]:
    """Each floor against bare Envoy, and each route's CPU per request over its floor (ROUTE_FLOORS):
    its Envoy's, and all its serving processes' together."""
    def envoy(r: dict) -> float:
        return next(iter(r["cpu_us_per_request"].values()))

    def total(r: dict) -> float:
        return sum(r["cpu_us_per_request"].values())

    bare = tp["bare"]
    out = ["", "## The floors (closed loop, CPU µs per request)", "",
           "| floor | vs bare Envoy | Envoy CPU | added Envoy CPU over bare | total CPU |", "|---|---|---|---|---|"]
    for floor in FLOORS:
        r = tp[floor]
        out.append(f"| {floor} | {r['throughput_rps'] / bare['throughput_rps']:.2f}x | {envoy(r):.1f} | "
                   f"{envoy(r) - envoy(bare):+.1f} | {total(r):.1f} |")
    out += ["", "| route | floor | vs floor's throughput | added Envoy CPU over the floor | added total CPU |",
            "|---|---|---|---|---|"]
    for route, floor in ROUTE_FLOORS.items():
        if route in tp:
            r, f = tp[route], tp[floor]
            out.append(f"| {route} | {floor} | {r['throughput_rps'] / f['throughput_rps']:.2f}x | "
                       f"{envoy(r) - envoy(f):+.1f} | {total(r) - total(f):+.1f} |")
    return out


def pools_markdown(p: dict) -> list[str]:
    engine = ", ".join(f"{flag} {value}" for flag, value in p["engine"].items())
    out = ["", f"## Pool of {len(POOL_REPLICAS)} simulated vLLM replicas: {p['conversations']} conversations of "
           f"{p['turns']} streamed turns, {POOL_SYSTEM_PROMPTS} system prompts of {POOL_SYSTEM_WORDS} tokens, "
           f"concurrency {p['concurrency']}", "", f"Engine: {engine}.", "",
           "| variant | requests | TTFT mean ms | TTFT p99 ms | vs round robin | req/s | output tok/s "
           "| prefix-cache hit rate | requests per replica | errors |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    baseline = p["variants"]["round_robin"]["first_content"]["mean_ms"]
    for variant, r in p["variants"].items():
        ttft = r["first_content"]
        hit = f"{r['prefix_hit_rate']:.0%}" if r["prefix_hit_rate"] is not None else "n/a"
        spread = " / ".join(f"{c['requests']:.0f}" for c in r["replicas"].values())
        out.append(f"| {variant} | {r['ok']} | {ttft['mean_ms']:.0f} | {ttft['p99_ms']:.0f} | "
                   f"{ttft['mean_ms'] / baseline:.2f}x | {r['throughput_rps']:.1f} | {r['output_tokens_per_s']:.0f} | "
                   f"{hit} | {spread} | {r['errors']} |")
    return out


def batch_markdown(b: dict) -> list[str]:
    out = ["", "## Batch (chat completions through the Batch API)", ""]
    if "error" in b:
        return out + [f"Not measured: {b['error']}"]
    counts = b["request_counts"]
    cpu = ", ".join(f"{name} {us:.0f}" for name, us in b["cpu_us_per_line"].items())
    return out + [
        "| lines | upload s | validating s | create to completed s | lines/s | completed | failed | missing | repeated "
        "| ext-proc RSS before MiB | ext-proc peak MiB (VmHWM) | CPU µs per line |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {b['lines']} | {b['upload_s']:.2f} | {b['validating_s'] or 0:.2f} | {b['create_to_completed_s']:.2f} | "
        f"{b['lines_per_s']:.0f} | {counts['completed']} | {counts['failed']} | {b['lines_missing']} | "
        f"{b['lines_repeated']} | {b['ext_proc_rss_before_kib'] / 1024:.1f} | {b['ext_proc_peak_kib'] / 1024:.1f} | "
        f"{cpu} |"]


def chart(results: dict) -> str:
    """p99 latency (log scale) against offered rate, one line per scenario, as SVG."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in results["latency"]:
        series.setdefault(r["scenario"], []).append((r["offered_rps"], max(r["latency"]["p99_ms"], 0.01)))
    width, height, pad = 720, 420, 60
    xs = [x for points in series.values() for x, _ in points] or [1]
    ys = [math.log10(y) for points in series.values() for _, y in points] or [0]
    x_max, y_min, y_max = max(xs) * 1.05, math.floor(min(ys)), math.ceil(max(ys)) or 1
    if y_max == y_min:
        y_max += 1

    def px(x, y):
        return (pad + x / x_max * (width - 2 * pad),
                height - pad - (math.log10(y) - y_min) / (y_max - y_min) * (height - 2 * pad))

    colours = {"direct": "#888888", "bare": "#000000", "passthrough": "#1f77b4", "rename": "#ff7f0e",
               "litellm": "#d62728"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">p99 latency against offered rate '
             f'({results["started"]})</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">offered requests/s</text>',
             f'<text x="15" y="{height / 2}" transform="rotate(-90 15 {height / 2})" text-anchor="middle">'
             f'p99 ms (log)</text>']
    for exp in range(y_min, y_max + 1):
        _, y = px(1, 10 ** exp)
        parts.append(f'<text x="{pad - 5}" y="{y + 4}" text-anchor="end">{10 ** exp:g}</text>'
                     f'<line x1="{pad}" y1="{y}" x2="{width - pad}" y2="{y}" stroke="#eeeeee"/>')
    for i in range(5):
        x_value = x_max * i / 4
        x, _ = px(x_value, 10 ** y_min)
        parts.append(f'<text x="{x}" y="{height - pad + 16}" text-anchor="middle">{x_value:.0f}</text>')
    for n, (name, points) in enumerate(sorted(series.items())):
        points.sort()
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (px(a, b) for a, b in points))
        colour = colours.get(name, "#2ca02c")
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in (px(a, b) for a, b in points))
        parts.append(f'<text x="{width - pad + 5 - 120}" y="{pad + 15 * n}" fill="{colour}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true",
                        help="a few seconds per scenario group, a batch of 1,000 lines, no LiteLLM")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = parser.parse_args()

    run = Run(short=args.short)
    with Stack(log_level="error", envoy_concurrency=1, cpus=PINNING, adjust_config=gateway()) as stack:
        bare_ports = {LISTENER_PORT: free_port(), ADMIN_PORT: free_port(), 8001: stack.ports[8001]}
        stack.start_envoy("bare-envoy", BARE_CONFIG, bare_ports)
        keyed_ports = {**stack.ports, LISTENER_PORT: free_port(), ADMIN_PORT: free_port(),
                       INNER_LISTENER_PORT: free_port()}
        stack.start_envoy("keyed-envoy", DEMO_CONFIG, keyed_ports, gateway(with_limited_key))
        quiet_ports = {**stack.ports, LISTENER_PORT: free_port(), ADMIN_PORT: free_port(),
                       INNER_LISTENER_PORT: free_port()}
        stack.start_envoy("quiet-envoy", DEMO_CONFIG, quiet_ports, gateway(without_accounting))
        cached_ports = {**stack.ports, LISTENER_PORT: free_port(), ADMIN_PORT: free_port(),
                        INNER_LISTENER_PORT: free_port()}
        stack.start_envoy("cached-envoy", DEMO_CONFIG, cached_ports, gateway(with_cached_model))
        floors = start_floors(stack)
        backend = stack.backend_url(BACKEND)
        run.urls = {
            "direct": (backend + CHAT, MODEL, {}),
            "bare": (f"http://127.0.0.1:{bare_ports[LISTENER_PORT]}{CHAT}", MODEL, {}),
            **{floor: (f"http://127.0.0.1:{port}{CHAT}", MODEL, {}) for floor, port in floors.items()},
            "unaccounted": (f"http://127.0.0.1:{quiet_ports[LISTENER_PORT]}{CHAT}", MODEL, {}),
            "passthrough": (f"http://127.0.0.1:{stack.port}{CHAT}", MODEL, {}),
            "cache_hit": (f"http://127.0.0.1:{cached_ports[LISTENER_PORT]}{CHAT}", MODEL, {}),
            "rate_limited": (f"http://127.0.0.1:{keyed_ports[LISTENER_PORT]}{CHAT}", MODEL,
                             {"authorization": f"Bearer {BENCH_KEY}"}),
            "rename": (f"http://127.0.0.1:{stack.port}{CHAT}", RENAMED, {}),
            "pool": (f"http://127.0.0.1:{stack.port}{CHAT}", POOLED, {}),
            "fallbacks": (f"http://127.0.0.1:{stack.port}{CHAT}", CHAINED, {}),
            **{dialect: (f"http://127.0.0.1:{stack.port}{CHAT}", model, {}) for dialect, model in TRANSLATED.items()},
            **{api: (f"http://127.0.0.1:{stack.port}{path}", THROUGH_CHAT, {}) for api, path in CLIENT_APIS.items()},
        }
        run.body_extras = {"cache_hit": {"temperature": 0}}
        run.cached_admin_port = cached_ports[ADMIN_PORT]
        if not args.short:
            litellm = start_litellm(stack, backend)
            if litellm:
                port, key = litellm
                run.urls["litellm"] = (f"http://127.0.0.1:{port}{CHAT}", MODEL, {"authorization": f"Bearer {key}"})
        results = measure(run, stack)
        # Last, so the batch's load does not touch the figures above.
        try:
            results["batch"] = measure_batch(stack, SHORT_BATCH_LINES if args.short else BATCH_LINES)
        except (openai.OpenAIError, RuntimeError) as e:
            results["batch"] = {"error": str(e)}
    # Each of its variants on a stack of its own, after the one above is stopped.
    results["pools"] = measure_pools(args.short)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}{'-short' if args.short else ''}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    report = markdown(results)
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".svg").write_text(chart(results))
    print(report)
    print(f"written: {stem}.json, .md, .svg")
    if "error" in results["batch"]:
        sys.exit(f"the batch scenario failed: {results['batch']['error']}")


if __name__ == "__main__":
    main()
