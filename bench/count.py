#!/usr/bin/env python3
"""`make bench-count`: instructions Envoy executes per request, counted by callgrind, for bare
Envoy, modelgate's routes and the floors beside them.

    python bench/count.py [--requests N] [--rounds R] [--only VARIANT ...] [--split] [--services] [--streams]
                          [--out DIR]

Timing on a shared 2-core machine moves by tens of percent from one run to the next; instruction
counts barely move. Each variant's Envoy runs under `valgrind --tool=callgrind` with
`--concurrency 1` and the configuration `make bench` gives it (bench/run.py's gateway edits), the
simulated backend and ext-proc outside valgrind. After a warm-up, the counters are zeroed, N
identical requests are sent one at a time and the counters dumped: instructions per request are
the total over N. Each variant is counted `--rounds` times on the same Envoy, to show the spread.
The totals are split by where the code lies: Envoy's binary, its tcmalloc, libc, and V8's JIT,
where the wasm filter runs (read_dump says how unnamed code is told apart).

Envoy is stripped and the filter runs as JIT code, so neither names a function. The filter's own
logic is counted apart, natively: the filter crate's ignored test `flow::tests::count` runs the
same requests through `Flow` under callgrind with each route's filter configuration, and its
functions are listed by inclusive instructions per request.

`--split` adds the passthrough route's split by configuration (chain_variants): modelgate's filter on
floor_wasm_header's minimal chain, the floor filter on the demo's chain with and without each of its
parts, and the floor filter making modelgate's host calls one at a time; and the body read natively
and in wasm with a longer conversation (`*_long`).

`--services` also counts, in the same rounds, what ext-proc and the continue ext_proc service
execute per request (each under callgrind too, every thread; the pools' metrics scrape slowed to
SERVICE_SCRAPE_MS, since its work grows with wall time, which callgrind stretches): modelgate's
own ext_proc work against the floor's, where Envoy's count leaves both out.

`--streams` adds streamed answers as `make bench` asks the simulator for them (STREAM_HEADERS;
stream_variants): bare Envoy, the two-pass floor, and the gateway's passthrough route through
the stream guard, with and without accounting, and with the client asking for the usage chunk
itself. Each stream is a "request" of the table.

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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

from devstack import (ADMIN_PORT, DEMO_CONFIG, EXT_PROC_PORT, INNER_LISTENER_PORT, LISTENER_PORT, Stack,  # noqa: E402
                      free_port, http_connection_manager, render_config)
from run import (BARE_CONFIG, CHAT, FLOORS, MODEL, POOLED, RENAMED, STREAM_HEADERS, TRANSLATED,  # noqa: E402
                 PROMPT, floor_ports, gateway, start_continue_ext_proc, with_cached_model, without_accounting)
import yaml  # noqa: E402

# Envoy under callgrind starts in tens of seconds, and V8 compiling the filter takes more.
START_TIMEOUT_S = 300
WARMUP_REQUESTS = 20
# The pools' metrics scrape while services are counted: every 50 ms by default, it would be counted
# per request many times over under callgrind, where a request takes tens of times longer.
SERVICE_SCRAPE_MS = 1000


@dataclass
class Route:
    """One row of the table: requests for `model` (with `extras` in the body) to one Envoy."""
    name: str
    model: str
    extras: dict = field(default_factory=dict)
    # A response header and value every counted answer must carry (a cache hit's, say).
    expect: tuple[str, str] | None = None
    # Whether the filter's part is also counted natively (not where it waits on a call's answer).
    native: bool = True
    # Request headers besides the content type (the simulator's stream length, say).
    headers: dict = field(default_factory=dict)


@dataclass
class Variant:
    """One Envoy configuration under callgrind, and the routes counted through it."""
    name: str
    template: Path
    adjust: object
    routes: list[Route]
    # On bare Envoy's listener and backend (bare Envoy and the floors), rather than the demo's.
    bare_listener: bool = False


def variants() -> list[Variant]:
    cached = Route("cache_hit", MODEL, {"temperature": 0}, ("modelgate-cache", "hit"), native=False)
    floors = [Variant(name, config, None, [Route(name, MODEL, native=False)], bare_listener=True)
              # floor_relay's Envoy is floor_two_pass's, its relay a process callgrind would not count.
              for name, (_, config) in FLOORS.items() if name != "floor_relay"]
    return [
        Variant("bare", BARE_CONFIG, None, [Route("bare", MODEL, native=False)], bare_listener=True),
        *floors,
        Variant("unaccounted", DEMO_CONFIG, gateway(without_accounting), [Route("unaccounted", MODEL)]),
        Variant("gateway", DEMO_CONFIG, gateway(), [
            Route("passthrough", MODEL), Route("rename", RENAMED), Route("pool", POOLED),
            Route("anthropic", TRANSLATED["anthropic"])]),
        Variant("cached", DEMO_CONFIG, gateway(with_cached_model), [cached]),
    ]


# The passthrough route's cost over floor_wasm_header, split between the filter and the demo's
# configuration around it: each filter on the other's chain, then the demo's chain with the floor
# filter and one of its parts taken out (what that part costs a passthrough request).
FLOOR_HEADER_CONFIG = FLOORS["floor_wasm_header"][1]
DEMO_CHAIN_PARTS = {
    # The composite filter holding ext_proc, whose matcher runs on every request.
    "composite": lambda hcm, clusters: hcm.update(
        http_filters=[f for f in hcm["http_filters"] if f["name"] != "modelgate.ext_proc"]),
    # The answer's `modelgate-backend` and `modelgate-attempts`, formatted per answer.
    "served_by": lambda hcm, clusters: [route.pop("response_headers_to_add", None)
                                        for route in hcm["route_config"]["virtual_hosts"][0]["routes"]
                                        if "route" in route],
    # The backend cluster's health checks, outlier detection and least-request balancing.
    "cluster_checks": lambda hcm, clusters: [clusters["llama_pool"].pop(key, None)
                                             for key in ("health_checks", "outlier_detection", "lb_policy")],
    # The client's address taken from the connection, no address trusted as internal.
    "remote_address": lambda hcm, clusters: [hcm.pop(key) for key in ("use_remote_address",
                                                                      "internal_address_config")],
    # The routes before the catch-all, and the internal headers each route removes.
    "routes": lambda hcm, clusters: hcm.update(
        route_config=http_connection_manager(yaml.safe_load(FLOOR_HEADER_CONFIG.read_text()))["route_config"]),
}


def http_filter(config: dict, name: str) -> dict:
    return next(f for f in http_connection_manager(config)["http_filters"] if f["name"] == name)


def swap_filter(config: dict, name: str, replacement: dict) -> None:
    """Puts `replacement` in the place of the HTTP filter called `name`."""
    filters = http_connection_manager(config)["http_filters"]
    filters[filters.index(http_filter(config, name))] = replacement


def floor_on_demo(*without: str):
    """The demo's configuration with the floor filter (setting the routing header, as
    floor_wasm_header's does) in modelgate's filter's place, and the DEMO_CHAIN_PARTS named in
    `without` taken out."""
    floor = http_filter(yaml.safe_load(FLOOR_HEADER_CONFIG.read_text()), "floor")
    def adjust(config: dict) -> None:
        swap_filter(config, "modelgate", floor)
        clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
        for part in without:
            DEMO_CHAIN_PARTS[part](http_connection_manager(config), clusters)
    return adjust


def modelgate_on_floor(config: dict) -> None:
    """floor_wasm_header's configuration with modelgate's filter, configured as the unaccounted
    gateway's, in the floor filter's place."""
    demo = yaml.safe_load(render_config(DEMO_CONFIG, {}, gateway(without_accounting)))
    swap_filter(config, "floor", http_filter(demo, "modelgate"))


# The host calls modelgate's filter makes on a passthrough request without accounting besides the
# routing header (bench/floor-filter names them): each made by the floor filter alone, then all.
FILTER_CALLS = ["now", "request_headers", "request_body", "processing_ms", "response_status"]


def floor_making(calls: list[str]):
    """floor_wasm_header's configuration with its filter also making `calls`."""
    def adjust(config: dict) -> None:
        value = http_filter(config, "floor")["typed_config"]["config"]["configuration"]
        value["value"] = "\n".join([value["value"], *calls])
    return adjust


def ext_proc_mode(**mode: str):
    """floor_ext_proc's configuration with its ext_proc processing mode changed by `mode`: the
    answer's headers and whole body sent too (as ext-proc asked for them on a translated route
    before 2026-12-03), the answer's whole body alone (as it asks for a whole answer now: the
    ext_proc floor of a translation), or the request's headers not sent (its body alone, one
    message for the request, as a design in which the filter sets what the headers need would send)."""
    def adjust(config: dict) -> None:
        for node in objects(config):
            if "processing_mode" in node:
                node["processing_mode"].update(mode)
    return adjust


# A longer conversation, 16 turns of 1,000 characters (a body of 16.6 KB against the usual 124
# bytes): what reading the body costs as it grows, natively (json_to_metadata parses all of it)
# and in wasm (the body copied into the VM; modelgate's filter reading it), for these variants.
LONG_CONVERSATION = [{"role": ("user", "assistant")[turn % 2], "content": ("word " * 200)[:1000] + str(turn)}
                     for turn in range(16)]
WITH_LONG_CONVERSATION = ["bare", "floor_calls_request_body", "floor_native_route", "unaccounted"]


def with_long_conversation(variant: Variant) -> Variant:
    name = f"{variant.name}_long"
    return replace(variant, name=name, routes=[Route(name, MODEL, {"messages": LONG_CONVERSATION}, native=False)])


def chain_variants() -> list[Variant]:
    def named(name: str) -> Route:
        return Route(name, MODEL, native=False)
    calls = {**{f"floor_calls_{call}": [call] for call in FILTER_CALLS}, "floor_calls_all": FILTER_CALLS}
    split = [
        *[Variant(name, FLOOR_HEADER_CONFIG, floor_making(made), [named(name)], bare_listener=True)
          for name, made in calls.items()],
        Variant("modelgate_on_floor", FLOOR_HEADER_CONFIG, modelgate_on_floor, [named("modelgate_on_floor")],
                bare_listener=True),
        Variant("floor_ext_proc_answers", FLOORS["floor_ext_proc"][1],
                ext_proc_mode(response_header_mode="SEND", response_body_mode="BUFFERED"),
                [named("floor_ext_proc_answers")], bare_listener=True),
        Variant("floor_ext_proc_body_only", FLOORS["floor_ext_proc"][1], ext_proc_mode(request_header_mode="SKIP"),
                [named("floor_ext_proc_body_only")], bare_listener=True),
        Variant("floor_ext_proc_answer_body", FLOORS["floor_ext_proc"][1], ext_proc_mode(response_body_mode="BUFFERED"),
                [named("floor_ext_proc_answer_body")], bare_listener=True),
        Variant("floor_ext_proc_bodies", FLOORS["floor_ext_proc"][1],
                ext_proc_mode(request_header_mode="SKIP", response_body_mode="BUFFERED"),
                [named("floor_ext_proc_bodies")], bare_listener=True),
        Variant("floor_on_demo", DEMO_CONFIG, floor_on_demo(), [named("floor_on_demo")]),
        *[Variant(f"floor_on_demo_without_{part}", DEMO_CONFIG, floor_on_demo(part),
                  [named(f"floor_on_demo_without_{part}")]) for part in DEMO_CHAIN_PARTS],
    ]
    return [*split, *[with_long_conversation(v) for v in [*variants(), *split] if v.name in WITH_LONG_CONVERSATION]]


def stream_variants() -> list[Variant]:
    def streamed(name: str, **extras) -> Route:
        return Route(name, MODEL, {"stream": True, **extras}, native=False, headers=STREAM_HEADERS)
    return [
        Variant("bare_stream", BARE_CONFIG, None, [streamed("bare_stream")], bare_listener=True),
        Variant("floor_two_pass_stream", FLOORS["floor_two_pass"][1], None, [streamed("floor_two_pass_stream")],
                bare_listener=True),
        # The client asking for the usage chunk itself: read as it passes, nothing removed.
        Variant("guarded_stream", DEMO_CONFIG, gateway(), [
            streamed("guarded_stream"),
            streamed("guarded_stream_usage_asked", stream_options={"include_usage": True})]),
        Variant("guarded_stream_unaccounted", DEMO_CONFIG, gateway(without_accounting),
                [streamed("guarded_stream_unaccounted")]),
    ]


def callgrind(name: str, workdir: Path) -> list[str]:
    """valgrind's command line for one Envoy. V8 writes the code it runs, so every store is checked
    against translated code (`--smc-check=all`); nothing is counted until `callgrind_control -i on`,
    which makes the start cheaper."""
    return ["valgrind", "--tool=callgrind", "--smc-check=all", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={workdir / f'callgrind.{name}'}", "--log-file=" + str(workdir / f"valgrind.{name}.log")]


def start_counted_envoy(stack: Stack, variant: Variant, floor_ext_proc: int) -> dict:
    """Starts the variant's Envoy under callgrind on ports of its own (a floor's calling the continue
    ext_proc service on `floor_ext_proc`); returns its ports."""
    ports = (floor_ports(stack, floor_ext_proc) if variant.bare_listener else
             {**stack.ports, LISTENER_PORT: free_port(), ADMIN_PORT: free_port(), INNER_LISTENER_PORT: free_port()})
    def adjust(config: dict) -> None:
        if variant.adjust:
            variant.adjust(config)
        patient(config)
    stack.start_envoy(variant.name, variant.template, ports, adjust,
                      wrapper=callgrind(variant.name, stack.workdir), timeout=START_TIMEOUT_S)
    return ports


def objects(node):
    """Every mapping in a parsed configuration, `node` itself included, outermost first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from objects(value)
    elif isinstance(node, list):
        for item in node:
            yield from objects(item)


def patient(config: dict) -> None:
    """Lengthens every ext_proc message timeout in an Envoy configuration: under callgrind Envoy
    runs tens of times slower, and on a loaded machine an exchange can outlast the usual 2 s. A
    timer that never fires costs no instructions, so the counts are those of the usual setting."""
    for node in objects(config):
        if "message_timeout" in node:
            node["message_timeout"] = "60s"


class Client:
    """One keep-alive connection sending the same chat completion again and again."""

    def __init__(self, port: int, route: Route):
        self.port = port
        self.route = route
        self.body = json.dumps({"model": route.model, "messages": PROMPT, "max_tokens": 16, **route.extras})
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send(self, count: int, warming: bool = False) -> None:
        """Sends the request `count` times; while `warming`, answers need not carry `expect` (the
        first request to a cached route fills the cache)."""
        for _ in range(count):
            self.connection.request("POST", CHAT, self.body, {"content-type": "application/json", **self.route.headers})
            answer = self.connection.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{self.route.name}: status {answer.status}")
            if self.route.expect and not warming and answer.getheader(self.route.expect[0]) != self.route.expect[1]:
                raise RuntimeError(f"{self.route.name}: no {self.route.expect[0]}: {self.route.expect[1]}")


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=300)


# Code valgrind places in no object: below 4 GiB it lies in Envoy's own image, in the section
# holding tcmalloc (`google_malloc`, which valgrind does not map to the binary); above, in memory
# V8 compiled the wasm filter into.
UNNAMED_BELOW_4GIB = "tcmalloc"
UNNAMED = "???"


def read_dump(path: Path) -> dict[str, int]:
    """Instructions (Ir) by object in a callgrind dump, unnamed code split as UNNAMED_BELOW_4GIB
    says: cost lines count toward the object and function they follow (callgrind's `ob=` and
    `fn=`, names compressed as `(id) name`, each kind numbered apart); calls' inclusive costs (the
    line after `calls=`) are skipped, so each instruction is counted once."""
    names: dict[tuple[str, str], str] = {}
    by_object: dict[str, int] = {}
    current = {"ob": UNNAMED, "fn": ""}
    skip_next = False
    for line in path.read_text(errors="replace").splitlines():
        if skip_next:
            skip_next = False
            continue
        key, _, name = line.partition("=")
        if key in ("ob", "cob", "fn", "cfn"):
            kind = key.removeprefix("c")
            match = re.match(r"\((\d+)\)(?: (.*))?", name)
            if match:
                if match.group(2) is not None:
                    names[kind, match.group(1)] = match.group(2)
                name = names[kind, match.group(1)]
            if key == kind:
                current[kind] = name
        elif key == "calls":
            skip_next = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2:
                where = current["ob"]
                # An unnamed function is named by its address (`0x...`, then `'2` and so on if recursive).
                address = re.match(r"0x([0-9a-f]+)", current["fn"])
                if where == UNNAMED and address and int(address.group(1), 16) < 1 << 32:
                    where = UNNAMED_BELOW_4GIB
                by_object[where] = by_object.get(where, 0) + int(parts[1])
    return by_object


@dataclass
class Counted:
    """A process under callgrind, and where its dumps go (one file per thread)."""
    pid: int
    dump: Path
    # The files of the last dump.
    last: list[Path] = field(default_factory=list)

    def zero(self) -> None:
        control(self.pid, "--zero")

    def threads(self) -> list[dict[str, int]]:
        """Dumps the counters: Ir by object, for each thread (the files are kept in `last`)."""
        before = set(self.dump.parent.glob(self.dump.name + "*"))
        control(self.pid, "--dump")
        self.last = sorted(set(self.dump.parent.glob(self.dump.name + "*")) - before)
        return [read_dump(path) for path in self.last]


def count(envoy: Counted, port: int, route: Route, requests: int,
          services: dict[str, Counted]) -> tuple[dict[str, int], int, dict[str, int]]:
    """Ir by object for `requests` requests of `route`, every thread's, the worker thread's Ir, and
    each of `services`' Ir, every thread's. callgrind dumps each thread apart
    (`--separate-threads`); Envoy's worker is the thread that executed the most. Its count leaves
    out the main thread's timers (health checks, stats), whose work grows with wall time, not
    requests, and so with how busy the machine is."""
    client = Client(port, route)
    client.send(WARMUP_REQUESTS, warming=True)
    for counted in [envoy, *services.values()]:
        counted.zero()
    client.send(requests)
    threads = envoy.threads()
    by_object: dict[str, int] = {}
    for thread in threads:
        for obj, ir in thread.items():
            by_object[obj] = by_object.get(obj, 0) + ir
    served = {name: sum(sum(thread.values()) for thread in counted.threads()) for name, counted in services.items()}
    return by_object, max(sum(thread.values()) for thread in threads), served


def count_services(stack: Stack, floor_ext_proc: int) -> dict[str, Counted]:
    """Starts ext-proc and the continue ext_proc service again under callgrind, counting from
    now on; returns them by name."""
    services = {}
    for name, port in [("ext-proc", stack.ports[EXT_PROC_PORT]), ("continue-ext-proc", floor_ext_proc)]:
        argv, env = stack.commands[name]
        stack.kill(name)
        stack.spawn(name, [*callgrind(name, stack.workdir), *argv], env)
        stack.wait_for_port(port, timeout=START_TIMEOUT_S)
        services[name] = Counted(stack.pid(name), stack.workdir / f"callgrind.{name}")
        # What a process does once, after it listens (ext-proc's scrapers build their HTTP clients,
        # loading the system's certificates), is no request's.
        wait_until_idle(services[name].pid)
        control(services[name].pid, "--instr=on")
    return services


def wait_until_idle(pid: int, timeout: float = START_TIMEOUT_S) -> None:
    """Waits until the process has used under a tenth of a CPU for two seconds on end."""
    def cpu_ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    deadline = time.monotonic() + timeout
    quiet, last = 0, cpu_ticks()
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(1)
        now = cpu_ticks()
        quiet = quiet + 1 if now - last < os.sysconf("SC_CLK_TCK") // 10 else 0
        last = now


def slow_scrape(pools: dict) -> None:
    for pool in pools["pools"].values():
        pool.update(scrape_interval_ms=SERVICE_SCRAPE_MS, stale_after_ms=60 * SERVICE_SCRAPE_MS)


def filter_tests() -> str:
    """Builds the filter crate's test binary (release, as the filter ships) and returns its path."""
    built = subprocess.run(["cargo", "test", "--release", "-p", "modelgate-filter", "--lib", "--no-run",
                            "--message-format=json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for line in built.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable") \
                and message["target"]["name"] == "modelgate_filter":
            return message["executable"]
    raise RuntimeError("cargo built no test binary for modelgate-filter")


def filter_configuration(variant: Variant) -> str:
    """The modelgate filter's JSON configuration in the variant's Envoy configuration."""
    config = yaml.safe_load(render_config(variant.template, {}, variant.adjust))
    plugin = next(f for f in http_connection_manager(config)["http_filters"] if f["name"] == "modelgate")
    return plugin["typed_config"]["config"]["configuration"]["value"]


ANNOTATED = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(?:\S*?:)?(.+?) \[(.*)\]$")


def by_function(dumps: list[Path], requests: int) -> list[tuple[str, float]]:
    """Inclusive instructions per request of every function in callgrind dumps (a process's
    threads, added up), the most first."""
    functions: dict[str, float] = {}
    for dump in dumps:
        annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=99", str(dump)],
                                   capture_output=True, text=True, check=True).stdout
        for match in map(ANNOTATED.match, annotated.splitlines()):
            if match:
                name = match.group(2)
                functions[name] = functions.get(name, 0) + int(match.group(1).replace(",", "")) / requests
    return sorted(functions.items(), key=lambda item: -item[1])


def count_native(binary: str, variant: Variant, route: Route, requests: int, workdir: Path) -> dict:
    """The filter's own instructions per request for `route`, run natively on a quiet host: the
    total, host calls, and the functions with the most inclusive instructions (callgrind's
    `--toggle-collect` counts only inside one request's callbacks)."""
    config = workdir / f"filter-{route.name}.json"
    config.write_text(filter_configuration(variant))
    dump = workdir / f"callgrind.native-{route.name}"
    env = {**os.environ, "MODELGATE_COUNT_CONFIG": str(config), "MODELGATE_COUNT_MODEL": route.model,
           "MODELGATE_COUNT_REQUESTS": str(requests)}
    ran = subprocess.run(["valgrind", "--tool=callgrind", "--toggle-collect=*one_request*",
                          f"--callgrind-out-file={dump}", binary, "--ignored", "--exact", "--nocapture",
                          "--test-threads=1", "flow::tests::count::counted_requests"],
                         env=env, capture_output=True, text=True, check=True)
    calls = float(re.search(r"host calls per request: ([\d.]+)", ran.stdout).group(1))
    total = sum(read_dump(dump).values())
    functions = by_function([dump], requests)
    # The filter's and its libraries' functions; the request's callers (the test harness) and the
    # host's calls are not the filter's logic.
    top = [(name, ir) for name, ir in functions if ("modelgate_" in name or "serde" in name)
           and "tests::count" not in name]
    return {"ir_per_request": total / requests, "host_calls_per_request": calls,
            "host_ir_per_request": sum(ir for name, ir in functions if "count::Quiet as" in name),
            "allocator_ir_per_request": sum(ir for name, ir in functions if name in ("malloc", "free", "realloc")),
            "top": top[:15]}


def kind(obj: str) -> str:
    """The column a callgrind object's instructions go to."""
    name = Path(obj).name
    return ("envoy" if name == "envoy" else "jit" if obj == UNNAMED else obj if obj == UNNAMED_BELOW_4GIB else
            "libc" if name.startswith(("libc.", "libm.")) else "other")


def summary(results: dict) -> dict:
    """Per route: instructions per request in each round, their median (of two, the mean), the
    spread, the split by object of the first round, and the worker thread's mean."""
    rows = {}
    for name, rounds in results["routes"].items():
        totals = sorted(sum(r.values()) for r in rounds)
        split: dict[str, float] = {}
        for obj, ir in rounds[0].items():
            split[kind(obj)] = split.get(kind(obj), 0) + ir
        worker = results["worker"][name]
        rows[name] = {"rounds": totals, "ir": sum(totals) / len(totals),
                      "spread": (totals[-1] - totals[0]) / totals[0], "split": split,
                      "worker": sum(worker) / len(worker)}
    return rows


def markdown(results: dict) -> str:
    rows = summary(results)
    bare = rows.get("bare", {}).get("ir")
    out = [f"# Envoy instructions per request, {results['started']}", "",
           f"{results['requests']} requests a round, {results['rounds']} rounds; Envoy `--concurrency 1` under "
           "callgrind. Split by where the code lies: Envoy's binary, its tcmalloc, libc, V8's JIT (the "
           "wasm filter's code and V8's stubs), anything else; and the worker thread's instructions alone "
           "(without the main thread's timers, which grow with wall time).", "",
           "| route | instructions per request | over bare Envoy | spread of rounds | envoy | tcmalloc | libc | jit "
           "| other | worker thread |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        over = f"{row['ir'] - bare:+,.0f} ({row['ir'] / bare:.2f}x)" if bare else "n/a"
        split = " | ".join(f"{row['split'].get(k, 0):,.0f}" for k in ["envoy", UNNAMED_BELOW_4GIB, "libc", "jit", "other"])
        out.append(f"| {name} | {row['ir']:,.0f} | {over} | {row['spread']:.2%} | {split} | {row['worker']:,.0f} |")
    services = results.get("services", {})
    if services:
        names = list(next(iter(services.values()))[0])
        out += ["", "## What the ext_proc services execute per request", "",
                f"Every thread's instructions, the mean of the rounds; the pools' metrics scrape every "
                f"{SERVICE_SCRAPE_MS} ms (a route that calls neither shows what they do idle).", "",
                "| route | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for route, rounds in services.items():
            out.append(f"| {route} | " + " | ".join(f"{sum(r[n] for r in rounds) / len(rounds):,.0f}" for n in names)
                       + " |")
        for route, top in results.get("ext_proc_top", {}).items():
            out += ["", f"### {route}: ext-proc's own functions by inclusive instructions per request (last round)", "",
                    "| function | instructions per request |", "|---|---|"]
            out += [f"| `{function}` | {ir:,.0f} |" for function, ir in top]
    native = results.get("native", {})
    if native:
        out += ["", "## The filter's own logic, natively (quiet host)", "",
                "| route | instructions per request | of which the host's side | of which malloc, realloc, free "
                "| host calls per request |", "|---|---|---|---|---|"]
        for name, n in native.items():
            out.append(f"| {name} | {n['ir_per_request']:,.0f} | {n['host_ir_per_request']:,.0f} | "
                       f"{n['allocator_ir_per_request']:,.0f} | {n['host_calls_per_request']:.0f} |")
        for name, n in native.items():
            out += ["", f"### {name}: functions by inclusive instructions per request", "",
                    "| function | instructions per request |", "|---|---|"]
            out += [f"| `{function}` | {ir:,.0f} |" for function, ir in n["top"]]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="requests counted per round (default 300)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per route (default 2)")
    parser.add_argument("--only", nargs="*", help="variants to count, by name (default all but the split's)")
    parser.add_argument("--split", action="store_true",
                        help="also the passthrough route's split: chain_variants() (about 10 minutes more)")
    parser.add_argument("--services", action="store_true",
                        help="also what ext-proc and the continue ext_proc service execute per request")
    parser.add_argument("--streams", action="store_true",
                        help="also streamed answers: stream_variants() (about 5 minutes more at 100 requests)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = parser.parse_args()

    headline = variants()
    optional = [*(chain_variants() if args.split else []), *(stream_variants() if args.streams else [])]
    chosen = [v for v in [*headline, *chain_variants(), *stream_variants()]
              if v.name in args.only] if args.only else [*headline, *optional]
    binary = filter_tests() if any(r.native for v in chosen for r in v.routes) else None
    results: dict = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "requests": args.requests,
                     "rounds": args.rounds, "routes": {}, "worker": {}, "native": {}, "services": {},
                     "ext_proc_top": {}}
    with Stack(log_level="error", envoy_concurrency=1, adjust_config=gateway(),
               adjust_pools=slow_scrape if args.services else None) as stack:
        floor_ext_proc = start_continue_ext_proc(stack)
        services = count_services(stack, floor_ext_proc) if args.services else {}
        for variant in chosen:
            print(f"counting {variant.name} under callgrind...", flush=True)
            ports = start_counted_envoy(stack, variant, floor_ext_proc)
            envoy = Counted(stack.pid(variant.name), stack.workdir / f"callgrind.{variant.name}")
            control(envoy.pid, "--instr=on")
            for route in variant.routes:
                rounds = [count(envoy, ports[LISTENER_PORT], route, args.requests, services)
                          for _ in range(args.rounds)]
                results["routes"][route.name] = [{obj: ir / args.requests for obj, ir in r.items()} for r, _, _ in rounds]
                results["worker"][route.name] = [worker / args.requests for _, worker, _ in rounds]
                if services:
                    results["services"][route.name] = [{name: ir / args.requests for name, ir in served.items()}
                                                       for _, _, served in rounds]
                    results["ext_proc_top"][route.name] = [
                        (name, ir) for name, ir in by_function(services["ext-proc"].last, args.requests)
                        if name.lstrip("<").startswith("modelgate_")][:12]
                if route.native:
                    results["native"][route.name] = count_native(binary, variant, route, args.requests, stack.workdir)
            stack.kill(variant.name)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"count-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    report = markdown(results)
    stem.with_suffix(".md").write_text(report)
    print(report)
    print(f"written: {stem}.json, .md")


if __name__ == "__main__":
    main()
