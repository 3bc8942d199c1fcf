#!/usr/bin/env python3
"""`make bench-count`: instructions Envoy executes per request, counted by callgrind, for bare
Envoy, modelgate's routes and the floors beside them.

    python bench/count.py [--requests N] [--rounds R] [--only VARIANT ...] [--out DIR]

Timing on a shared 2-core machine moves by tens of percent from one run to the next; instruction
counts barely move. Each variant's Envoy runs under `valgrind --tool=callgrind` with
`--concurrency 1` and the configuration `make bench` gives it (bench/run.py's gateway edits), the
simulated backend and ext-proc outside valgrind. After a warm-up, the counters are zeroed, N
identical requests are sent one at a time and the counters dumped: instructions per request are
the total over N. Each variant is counted `--rounds` times on the same Envoy, to show the spread.
The totals are split by object (Envoy's binary, libc and the rest, and code valgrind cannot place
in any object: V8's JIT, where the wasm filter runs).

Writes DIR/count-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

from devstack import (ADMIN_PORT, DEMO_CONFIG, INNER_LISTENER_PORT, LISTENER_PORT, Stack, envoy_binary,  # noqa: E402
                      free_port, render_config)
from run import (BARE_CONFIG, BACKEND, CHAT, MODEL, RENAMED, TRANSLATED, PROMPT, gateway,  # noqa: E402
                 with_cached_model, without_accounting)

# Envoy under callgrind starts in tens of seconds, and V8 compiling the filter takes more.
START_TIMEOUT_S = 300
WARMUP_REQUESTS = 20


@dataclass
class Route:
    """One row of the table: requests for `model` (with `extras` in the body) to one Envoy."""
    name: str
    model: str
    extras: dict = field(default_factory=dict)
    # A response header and value every counted answer must carry (a cache hit's, say).
    expect: tuple[str, str] | None = None


@dataclass
class Variant:
    """One Envoy configuration under callgrind, and the routes counted through it."""
    name: str
    template: Path
    adjust: object
    routes: list[Route]
    # Which of the stack's demo ports it keeps (the rest are its own).
    shared_ports: list[int] | None = None


def variants() -> list[Variant]:
    cached = Route("cache_hit", MODEL, {"temperature": 0}, ("modelgate-cache", "hit"))
    return [
        Variant("bare", BARE_CONFIG, None, [Route("bare", MODEL)], shared_ports=[8001]),
        Variant("unaccounted", DEMO_CONFIG, gateway(without_accounting), [Route("unaccounted", MODEL)]),
        Variant("gateway", DEMO_CONFIG, gateway(), [
            Route("passthrough", MODEL), Route("ext_proc", RENAMED),
            Route("anthropic", TRANSLATED["anthropic"])]),
        Variant("cached", DEMO_CONFIG, gateway(with_cached_model), [cached]),
    ]


def callgrind(name: str, workdir: Path) -> list[str]:
    """valgrind's command line for one Envoy. V8 writes the code it runs, so every store is checked
    against translated code (`--smc-check=all`); nothing is counted until `callgrind_control -i on`,
    which makes the start cheaper."""
    return ["valgrind", "--tool=callgrind", "--smc-check=all", "--instr-atstart=no",
            f"--callgrind-out-file={workdir / f'callgrind.{name}'}", "--log-file=" + str(workdir / f"valgrind.{name}.log")]


def start_counted_envoy(stack: Stack, variant: Variant) -> dict:
    """Starts the variant's Envoy under callgrind on ports of its own; returns its ports."""
    ports = {**stack.ports, LISTENER_PORT: free_port(), ADMIN_PORT: free_port(), INNER_LISTENER_PORT: free_port()}
    if variant.shared_ports is not None:
        ports = {LISTENER_PORT: ports[LISTENER_PORT], ADMIN_PORT: ports[ADMIN_PORT],
                 **{p: stack.ports[p] for p in variant.shared_ports}}
    config = stack.workdir / f"{variant.name}.yaml"
    config.write_text(render_config(variant.template, ports, variant.adjust, stack.internal_token, stack.key_dir))
    stack.spawn(variant.name, [*callgrind(variant.name, stack.workdir), envoy_binary(), "-c", str(config),
                               "--concurrency", "1", "--disable-hot-restart", "--log-level", "error"])
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[ADMIN_PORT]}/ready", timeout=5) as r:
                if r.read().strip() == b"LIVE":
                    stack.wait_for_port(ports[LISTENER_PORT])
                    return ports
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{variant.name} is not ready after {START_TIMEOUT_S}s:\n{stack.log_tail(variant.name)}")


class Client:
    """One keep-alive connection sending the same chat completion again and again."""

    def __init__(self, port: int, route: Route):
        self.port = port
        self.route = route
        self.body = json.dumps({"model": route.model, "messages": PROMPT, "max_tokens": 16, **route.extras})
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send(self, count: int) -> None:
        for _ in range(count):
            self.connection.request("POST", CHAT, self.body, {"content-type": "application/json"})
            answer = self.connection.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{self.route.name}: status {answer.status}")
            if self.route.expect and answer.getheader(self.route.expect[0]) != self.route.expect[1]:
                raise RuntimeError(f"{self.route.name}: no {self.route.expect[0]}: {self.route.expect[1]}")


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=300)


def read_dump(path: Path) -> dict[str, int]:
    """Instructions (Ir) by object in a callgrind dump: cost lines count toward the object of the
    function they follow (callgrind's `ob=`, names compressed as `(id) name`); calls' inclusive
    costs (the line after `calls=`) are skipped, so each instruction is counted once."""
    names: dict[str, str] = {}
    by_object: dict[str, int] = {}
    current = "???"
    skip_next = False
    for line in path.read_text(errors="replace").splitlines():
        if skip_next:
            skip_next = False
            continue
        if line.startswith(("ob=", "cob=")):
            name = line.split("=", 1)[1]
            match = re.match(r"\((\d+)\)(?: (.*))?", name)
            if match:
                if match.group(2) is not None:
                    names[match.group(1)] = match.group(2)
                name = names[match.group(1)]
            if line.startswith("ob="):
                current = name
        elif line.startswith("calls="):
            skip_next = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2:
                by_object[current] = by_object.get(current, 0) + int(parts[1])
    return by_object


def count(stack: Stack, pid: int, port: int, route: Route, requests: int, dump: Path) -> dict[str, int]:
    """Ir by object for `requests` requests of `route`."""
    client = Client(port, route)
    client.send(WARMUP_REQUESTS)
    control(pid, "--zero")
    client.send(requests)
    before = set(dump.parent.glob(dump.name + "*"))
    control(pid, "--dump")
    fresh = sorted(set(dump.parent.glob(dump.name + "*")) - before, key=lambda p: p.stat().st_mtime)
    return read_dump(fresh[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="requests counted per round (default 300)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per route (default 2)")
    parser.add_argument("--only", nargs="*", help="variants to count (default all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = parser.parse_args()

    results: dict = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "requests": args.requests,
                     "rounds": args.rounds, "routes": {}}
    with Stack(log_level="error", envoy_concurrency=1, adjust_config=gateway()) as stack:
        for variant in variants():
            if args.only and variant.name not in args.only:
                continue
            print(f"starting {variant.name} under callgrind...", flush=True)
            ports = start_counted_envoy(stack, variant)
            pid = stack.pid(variant.name)
            control(pid, "--instr=on")
            for route in variant.routes:
                rounds = [count(stack, pid, ports[LISTENER_PORT], route, args.requests,
                                stack.workdir / f"callgrind.{variant.name}") for _ in range(args.rounds)]
                results["routes"][route.name] = [{obj: ir / args.requests for obj, ir in r.items()} for r in rounds]
                print(route.name, [round(sum(r.values()) / args.requests) for r in rounds], flush=True)
            stack.kill(variant.name)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
