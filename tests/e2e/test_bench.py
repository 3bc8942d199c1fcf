"""`make bench` in its short mode, so the benchmark harness cannot rot.

Speed is judged by `make bench`, not here: this checks that every scenario ran,
every request succeeded, and the reports were written."""

import json
import subprocess
import sys

from harness import ROOT


def test_short_benchmark_runs_every_scenario(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--short", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=420)
    [result_file] = tmp_path.glob("bench-*-short.json")
    results = json.loads(result_file.read_text())

    floors = {"floor_wasm", "floor_wasm_header", "floor_ext_proc", "floor_native_model", "floor_native_route",
              "floor_two_pass", "floor_relay"}
    assert set(results["throughput"]) == {"direct", "bare", *floors, "unaccounted", "passthrough", "cache_hit",
                                          "rate_limited", "rename", "pool", "fallbacks", "anthropic", "ollama"}
    assert set(results["streaming"]) == {"direct", "bare", "floor_two_pass", "floor_relay", "passthrough", "rename",
                                         "anthropic", "ollama", "responses", "messages"}
    runs = [*results["throughput"].values(), *results["latency"], *results["streaming"].values()]
    for run in runs:
        assert run["errors"] == 0, run
        assert run["ok"] > 0, run
    # at 0.1x bare Envoy's capacity every scenario is measured; at 0.5x, those that can serve it
    assert {r["scenario"] for r in results["latency"]} == {"direct", "bare", *floors, "unaccounted", "passthrough",
                                                           "cache_hit", "rate_limited", "rename", "pool"}
    # the cache-hit row measured hits: ext-proc and the worker's copies counted one for every request after the warm-up
    cached = results["throughput"]["cache_hit"]
    assert cached["cache_hits"] >= cached["ok"], cached
    for scenario in results["streaming"].values():
        # 1 role chunk + 20 tokens + finish + [DONE] arrive as separate chunks, so gaps were measured
        assert scenario["chunk_gap"]["count"] > 0
        assert scenario["first_chunk"]["count"] == scenario["ok"]
    memory = results["memory"]
    assert memory["stream_errors"] == 0
    assert memory["rss_peak_kib"]["envoy"] >= memory["rss_before_kib"]["envoy"] > 0

    # the pool: every variant played the whole workload, every turn streamed text, and the replicas' own
    # counters saw every request
    pools = results["pools"]
    assert set(pools["variants"]) == {"round_robin", "least_request", "prefix_cache", "combined"}
    for variant in pools["variants"].values():
        assert variant["errors"] == 0, variant
        assert variant["conversations_finished"] == pools["conversations"], variant
        assert variant["ok"] == pools["conversations"] * pools["turns"]
        assert variant["first_content"]["count"] == variant["ok"]
        assert variant["output_tokens"] == variant["ok"] * pools["engine"]["--output-tokens"]
        assert sum(replica["requests"] for replica in variant["replicas"].values()) == variant["ok"]

    report = result_file.with_suffix(".md").read_text()
    assert "| passthrough with accounting throughput / bare Envoy |" in report
    assert "| cache hit: CPU per request (Envoy + ext-proc) / passthrough's |" in report
    assert "| pool: combined picker's mean TTFT / round robin's |" in report
    assert result_file.with_suffix(".svg").read_text().startswith("<svg")
