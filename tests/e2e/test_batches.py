"""The Files and Batch APIs through real Envoy, with the official openai SDK: a JSONL file
uploaded, a batch created and watched until it is done, its output read line by line. Every
line runs through the gateway's own routes (OpenAI-dialect, Anthropic and Ollama backends),
as the key that created the batch, which alone sees it."""

import hashlib
import time

import httpx2
import openai
import pytest

from harness import (Stack, backend_requests, chat_line, edit_filter_config, file_lines, jsonl, raw_json, results,
                     start_batch, upload, wait_for_batch)

# Keys: one that may use every model, one for llama models only, one paced at sixty requests a
# minute, and one each for tests that count what a key owns.
FULL, LLAMA_ONLY, PACED = "sk-batch-full-0001", "sk-batch-llama-0002", "sk-batch-paced-0003"
OTHER, LISTER, ACCOUNTED = "sk-batch-other-0004", "sk-batch-lister-0005", "sk-batch-accounted-0006"
MAX_LINES, MAX_FILE_BYTES = 100, 256 * 1024
# mistral-7b-instruct's backend takes this long to answer: its batches are slow enough to watch.
SLOW_MS = 200


def batch_keys(config: dict) -> None:
    def digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def edit(routing: dict) -> None:
        routing["client_keys"] = [
            {"name": "full", "sha256": digest(FULL)},
            {"name": "llama", "sha256": digest(LLAMA_ONLY), "models": ["llama-*"]},
            {"name": "paced", "sha256": digest(PACED), "limits": {"requests_per_minute": 60}},
            *[{"name": name, "sha256": digest(key)}
              for name, key in [("other", OTHER), ("lister", LISTER), ("accounted", ACCOUNTED)]],
        ]
        routing["accounting"]["flush_interval_ms"] = 100
    edit_filter_config(config, edit)


@pytest.fixture(scope="module")
def gateway():
    args = ["--batch-max-lines", str(MAX_LINES), "--files-max-bytes", str(MAX_FILE_BYTES), "--batch-concurrency", "4"]
    with Stack(adjust_config=batch_keys, ext_proc_args=args,
               simulator_args={"llamacpp-mistral": ["--ttft-ms", str(SLOW_MS)]}) as s:
        yield s


def sdk(gateway, key: str = FULL) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=30)


def test_a_chat_batch_runs_to_completion_and_its_output_holds_each_answer(gateway, spec):
    client = sdk(gateway)
    lines = [chat_line(f"request-{i}", max_tokens=1 + i % 5) for i in range(20)]
    uploaded = raw_json(client.files.with_raw_response.create,
                        file=("input.jsonl", jsonl(lines), "application/jsonl"), purpose="batch")
    spec.validate("OpenAIFile", uploaded)
    assert (uploaded["object"], uploaded["purpose"], uploaded["filename"], uploaded["bytes"]) == \
        ("file", "batch", "input.jsonl", len(jsonl(lines)))
    assert uploaded["id"].startswith("file-")
    assert client.files.content(uploaded["id"]).content == jsonl(lines)

    created = raw_json(client.batches.with_raw_response.create, input_file_id=uploaded["id"],
                       endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "nightly"})
    spec.validate("Batch", created)
    assert created["id"].startswith("batch_") and created["status"] == "validating"
    assert (created["input_file_id"], created["endpoint"], created["completion_window"], created["metadata"]) == \
        (uploaded["id"], "/v1/chat/completions", "24h", {"run": "nightly"})

    batch = wait_for_batch(client, created["id"])
    assert batch.status == "completed", batch
    spec.validate("Batch", raw_json(client.batches.with_raw_response.retrieve, batch.id))
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert batch.failed_at is None and batch.cancelled_at is None and batch.error_file_id is None

    output, errors = results(client, batch, [line["custom_id"] for line in lines])
    assert errors == {}
    for i, line in enumerate(lines):
        answer = output[line["custom_id"]]
        assert answer["error"] is None and answer["response"]["status_code"] == 200
        assert answer["response"]["request_id"]
        body = answer["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] == 1 + i % 5
        spec.validate("CreateChatCompletionResponse", body)

    written = raw_json(client.files.with_raw_response.retrieve, batch.output_file_id)
    spec.validate("OpenAIFile", written)
    assert written["purpose"] == "batch_output"


def test_one_batch_reaches_openai_dialect_anthropic_and_ollama_backends(gateway):
    client = sdk(gateway)
    before = {name: len(backend_requests(gateway, name)) for name in ["vllm-llama", "anthropic", "ollama"]}
    models = {"llama-3.1-8b-instruct": "vllm-llama", "gpt-4o-mini": "vllm-llama",
              "claude-sonnet-4-6": "anthropic", "llama3.2": "ollama"}
    lines = [chat_line(f"{model}-{i}", model, max_tokens=3) for model in models for i in range(3)]
    batch = wait_for_batch(client, start_batch(client, lines).id)
    assert batch.status == "completed", batch

    output, _ = results(client, batch, [line["custom_id"] for line in lines])
    for line in lines:
        body = output[line["custom_id"]]["response"]["body"]
        # Anthropic's and Ollama's answers come back translated into OpenAI's.
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] == 3
    after = {name: len(backend_requests(gateway, name)) for name in before}
    assert after["anthropic"] - before["anthropic"] == 3
    assert after["ollama"] - before["ollama"] == 3
    assert after["vllm-llama"] - before["vllm-llama"] == 6
    assert {r["path"] for r in backend_requests(gateway, "anthropic")[before["anthropic"]:]} == {"/v1/messages"}
    assert {r["path"] for r in backend_requests(gateway, "ollama")[before["ollama"]:]} == {"/api/chat"}


def test_embeddings_and_completions_batches(gateway, spec):
    client = sdk(gateway)
    embeddings = [{"custom_id": f"embed-{model}-{i}", "method": "POST", "url": "/v1/embeddings",
                   "body": {"model": model, "input": f"text {i}"}}
                  for model in ["text-embedding-3-small", "nomic-embed-text"] for i in range(3)]
    completions = [{"custom_id": f"complete-{i}", "method": "POST", "url": "/v1/completions",
                    "body": {"model": "qwen-2.5-7b-instruct", "prompt": f"count to {i}", "max_tokens": 2}}
                   for i in range(4)]
    batches = [(start_batch(client, embeddings, endpoint="/v1/embeddings"), embeddings),
               (start_batch(client, completions, endpoint="/v1/completions"), completions)]
    for created, lines in batches:
        batch = wait_for_batch(client, created.id)
        assert batch.status == "completed", batch
        output, _ = results(client, batch, [line["custom_id"] for line in lines])
        for answer in output.values():
            body = answer["response"]["body"]
            if batch.endpoint == "/v1/embeddings":
                assert body["object"] == "list" and len(body["data"][0]["embedding"]) == 16
                spec.validate("CreateEmbeddingResponse", body)
            else:
                assert body["object"] == "text_completion" and body["choices"][0]["text"]
                assert body["usage"]["completion_tokens"] == 2


def over_the_line_limit() -> list:
    return [chat_line(f"line-{i}") for i in range(MAX_LINES + 1)]


# Input files a batch must refuse while validating, and the line (counted from 1) it names.
REJECTED = {
    "not_json": ([chat_line("a"), '{"custom_id": "b", "method": "POST"', chat_line("c")], 2, "invalid_json_line"),
    "not_an_object": ([chat_line("a"), "[1, 2]"], 2, "invalid_json_line"),
    "url_is_not_the_endpoint": ([chat_line("a"), chat_line("b"), {**chat_line("c"), "url": "/v1/embeddings"}], 3,
                                "mismatched_url"),
    "duplicate_custom_id": ([chat_line("a"), chat_line("b"), chat_line("a")], 3, "duplicate_custom_id"),
    "unknown_model": ([chat_line("a"), chat_line("b", "no-such-model")], 2, "model_not_found"),
    "stream_asked": ([chat_line("a", stream=True)], 1, "unsupported_parameter"),
    "over_the_line_limit": (over_the_line_limit(), MAX_LINES + 1, "too_many_requests"),
}


@pytest.mark.parametrize("case", REJECTED)
def test_a_rejected_input_fails_the_batch_naming_the_line(gateway, spec, case):
    client = sdk(gateway)
    lines, line_number, code = REJECTED[case]
    batch = wait_for_batch(client, start_batch(client, lines).id)
    assert batch.status == "failed", batch
    spec.validate("Batch", raw_json(client.batches.with_raw_response.retrieve, batch.id))
    assert batch.failed_at and batch.in_progress_at is None and batch.output_file_id is None
    error = batch.errors.data[0]
    assert error.line == line_number, batch.errors
    assert error.message and error.code == code, batch.errors


def test_a_key_may_batch_only_its_models(gateway):
    client = sdk(gateway, LLAMA_ONLY)
    batch = wait_for_batch(client, start_batch(client, [chat_line("a"), chat_line("b", "claude-sonnet-4-6")]).id)
    assert batch.status == "failed", batch
    assert (batch.errors.data[0].line, batch.errors.data[0].code) == (2, "model_not_found")


def test_a_line_the_gateway_refuses_goes_to_the_error_file(gateway):
    client = sdk(gateway)
    # `stream` must be a boolean: the gateway answers 400, which no retry would change.
    lines = [chat_line("good-1"), chat_line("refused", stream="yes"), chat_line("good-2")]
    batch = wait_for_batch(client, start_batch(client, lines).id)
    assert batch.status == "completed", batch
    output, errors = results(client, batch, ["good-1", "refused", "good-2"])
    assert set(output) == {"good-1", "good-2"}
    refused = errors["refused"]
    assert refused["response"]["status_code"] == 400
    assert refused["response"]["body"]["error"]["param"] == "stream"


def test_a_batch_refuses_a_wrong_purpose(gateway, spec):
    client = sdk(gateway)
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("input.jsonl", jsonl([chat_line("a")])), purpose="homework")
    assert (err.value.body["param"], err.value.body["code"]) == ("purpose", "invalid_value")
    spec.validate("ErrorResponse", err.value.response.json())
    stored = upload(client, [chat_line("a")], purpose="user_data")
    assert stored.purpose == "user_data"
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=stored.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert (err.value.body["param"], err.value.body["code"]) == ("input_file_id", "invalid_value")
    spec.validate("ErrorResponse", err.value.response.json())


def test_cancel_keeps_the_finished_lines_and_files_the_rest_as_errors(gateway, spec):
    client = sdk(gateway)
    # Four seconds of work: progress shows after a second, and the cancel is seen within another.
    lines = [chat_line(f"slow-{i}", "mistral-7b-instruct", max_tokens=2) for i in range(80)]
    created = start_batch(client, lines)
    # Progress shows while the batch runs: some lines done, not all.
    running = wait_for_batch(client, created.id, lambda b: b.request_counts.completed >= 4)
    assert running.status == "in_progress" and running.request_counts.total == 80
    assert running.request_counts.completed < 80

    # Its input file is in use: it cannot be deleted.
    with pytest.raises(openai.ConflictError) as err:
        client.files.delete(created.input_file_id)
    assert err.value.body["code"] == "file_in_use" and created.id in err.value.body["message"]
    spec.validate("ErrorResponse", err.value.response.json())

    cancelling = client.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait_for_batch(client, created.id)
    assert batch.status == "cancelled", batch
    assert batch.cancelling_at <= batch.cancelled_at and batch.completed_at is None
    output, errors = results(client, batch, [line["custom_id"] for line in lines])
    assert len(output) >= 4 and errors, batch.request_counts
    assert all(answer["response"]["status_code"] == 200 for answer in output.values())
    assert all(line["error"]["code"] == "batch_cancelled" and line["response"] is None for line in errors.values())

    # A finished batch cannot be cancelled, and stays as it was.
    with pytest.raises(openai.ConflictError) as err:
        client.batches.cancel(created.id)
    assert err.value.body["code"] == "batch_finished"
    spec.validate("ErrorResponse", err.value.response.json())
    assert client.batches.retrieve(created.id) == batch
    # Nor does its input file stay in use.
    deleted = raw_json(client.files.with_raw_response.delete, created.input_file_id)
    spec.validate("DeleteFileResponse", deleted)
    assert (deleted["id"], deleted["deleted"]) == (created.input_file_id, True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.input_file_id)


def test_bad_requests_are_refused_with_openai_errors_and_change_nothing(gateway, spec):
    client = sdk(gateway, OTHER)
    done = wait_for_batch(client, start_batch(client, [chat_line("a")]).id)
    before = ([f.id for f in client.files.list()], [b.id for b in client.batches.list()])

    refusals = []
    for call, message in [(lambda: client.files.retrieve("file-unknown"), "No such File object: file-unknown"),
                          (lambda: client.files.content("file-unknown"), "No such File object: file-unknown"),
                          (lambda: client.files.delete("file-unknown"), "No such File object: file-unknown"),
                          (lambda: client.batches.retrieve("batch_unknown"), "No such Batch object: batch_unknown"),
                          (lambda: client.batches.cancel("batch_unknown"), "No such Batch object: batch_unknown")]:
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.body["message"] == message
        refusals.append(err.value.response)
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id="file-unknown", endpoint="/v1/chat/completions", completion_window="24h")
    assert err.value.body["param"] == "input_file_id" and "file-unknown" in err.value.body["message"]
    refusals.append(err.value.response)
    with pytest.raises(openai.ConflictError) as err:
        client.batches.cancel(done.id)
    assert err.value.body["code"] == "batch_finished"
    refusals.append(err.value.response)
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=done.input_file_id, endpoint="/v1/chat/completions",
                              completion_window="1h")
    assert err.value.body["param"] == "completion_window"
    refusals.append(err.value.response)

    headers = {"authorization": f"Bearer {OTHER}"}
    with httpx2.Client(base_url=gateway.base_url, headers=headers, timeout=30) as http:
        # Multipart bodies that are not: a broken one, one without its file, one not multipart at all.
        refusals += [
            http.post("/files", content=b"--x\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbat",
                      headers={"content-type": "multipart/form-data; boundary=x"}),
            http.post("/files", files={"purpose": (None, "batch")}),
            http.post("/files", json={"purpose": "batch"}),
        ]
        assert [(r.status_code, r.json()["error"]["code"]) for r in refusals[-3:]] == \
            [(400, None), (400, "missing_required_parameter"), (415, "unsupported_media_type")]
        assert refusals[-2].json()["error"]["param"] == "file"
        too_large = http.post("/files", data={"purpose": "batch"},
                              files={"file": ("big.jsonl", b"x" * (MAX_FILE_BYTES + 1))})
        assert (too_large.status_code, too_large.json()["error"]["code"]) == (413, "request_too_large")
        refusals.append(too_large)
    for refusal in refusals:
        assert 400 <= refusal.status_code < 500 and refusal.headers["x-request-id"]
        spec.validate("ErrorResponse", refusal.json())
    assert ([f.id for f in client.files.list()], [b.id for b in client.batches.list()]) == before


def test_files_and_batches_are_listed_page_by_page(gateway, spec):
    client = sdk(gateway, LISTER)
    files = [upload(client, [chat_line(f"listed-{i}")]).id for i in range(5)]
    page = raw_json(client.files.with_raw_response.list, limit=2)
    spec.validate("ListFilesResponse", page)
    # Newest first, by default.
    assert ([f["id"] for f in page["data"]], page["has_more"]) == (files[:-3:-1], True)
    assert (page["first_id"], page["last_id"]) == (files[-1], files[-2])
    following = client.files.list(limit=2, after=page["last_id"])
    assert [f.id for f in following.data] == files[-3:-5:-1] and following.has_more
    assert [f.id for f in client.files.list(limit=10, order="asc")] == files
    # The SDK pages on by itself.
    assert [f.id for f in client.files.list(limit=2)] == files[::-1]

    batches = [client.batches.create(input_file_id=file, endpoint="/v1/chat/completions",
                                     completion_window="24h").id for file in files[:3]]
    for batch in batches:
        wait_for_batch(client, batch)
    page = raw_json(client.batches.with_raw_response.list, limit=2)
    spec.validate("ListBatchesResponse", page)
    assert ([b["id"] for b in page["data"]], page["has_more"]) == (batches[:-3:-1], True)
    last = client.batches.list(limit=2, after=page["last_id"])
    assert [b.id for b in last.data] == [batches[0]] and not last.has_more
    assert [b.id for b in client.batches.list(limit=1)] == batches[::-1]
    # The batches' output files are listed too, and can be told apart by purpose.
    assert [f.id for f in client.files.list(purpose="batch")] == files[::-1]
    assert len(list(client.files.list(purpose="batch_output"))) == 3
    empty = raw_json(client.batches.with_raw_response.list, after=batches[0])
    assert (empty["data"], empty["has_more"]) == ([], False)


def test_another_key_sees_none_of_a_keys_files_and_batches(gateway):
    owner, stranger = sdk(gateway, FULL), sdk(gateway, OTHER)
    batch = wait_for_batch(owner, start_batch(owner, [chat_line("private")]).id)
    for call in [lambda: stranger.files.retrieve(batch.input_file_id),
                 lambda: stranger.files.content(batch.output_file_id),
                 lambda: stranger.files.delete(batch.input_file_id),
                 lambda: stranger.batches.retrieve(batch.id), lambda: stranger.batches.cancel(batch.id)]:
        with pytest.raises(openai.NotFoundError):
            call()
    # Nor can it batch the key's file: to it, there is no such file.
    with pytest.raises(openai.BadRequestError) as err:
        stranger.batches.create(input_file_id=batch.input_file_id, endpoint="/v1/chat/completions",
                                completion_window="24h")
    assert err.value.body["param"] == "input_file_id" and "No such File object" in err.value.body["message"]
    assert batch.id not in [b.id for b in stranger.batches.list()]
    assert not {batch.input_file_id, batch.output_file_id} & {f.id for f in stranger.files.list()}
    assert owner.files.retrieve(batch.input_file_id).id == batch.input_file_id


def test_a_keys_rate_limit_paces_its_batch_which_still_completes(gateway):
    client = sdk(gateway, PACED)
    # Sixty requests a minute: sixty at once, then one a second.
    lines = [chat_line(f"paced-{i}", max_tokens=1) for i in range(63)]
    start = time.monotonic()
    batch = wait_for_batch(client, start_batch(client, lines).id, within=60)
    elapsed = time.monotonic() - start
    assert batch.status == "completed", batch
    output, errors = results(client, batch, [line["custom_id"] for line in lines])
    assert errors == {} and len(output) == 63
    assert elapsed >= 2, f"63 lines in {elapsed:.1f}s: the key's limit did not pace them"


def test_the_usage_report_shows_each_line_as_batch_traffic(gateway):
    client = sdk(gateway, ACCOUNTED)
    start = int(time.time()) // 60 * 60
    lines = [chat_line(f"counted-{i}", "claude-sonnet-4-6", max_tokens=4) for i in range(5)]
    batch = wait_for_batch(client, start_batch(client, lines).id)
    assert batch.status == "completed", batch
    client.chat.completions.create(model="claude-sonnet-4-6", messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=4)

    def rows() -> list[dict]:
        answer = httpx2.get(f"{gateway.ext_proc_admin_url}/v1/usage/report", params={"start": start})
        assert answer.status_code == 200, answer.text
        return [r for r in answer.json()["data"] if r["key"] == "accounted"]

    deadline = time.monotonic() + 10
    while sum(r["requests"] for r in rows()) < 6:
        assert time.monotonic() < deadline, rows()
        time.sleep(0.1)
    by_traffic = {r.get("traffic"): r for r in rows()}
    batched = by_traffic["batch"]
    assert (batched["model"], batched["requests"], batched["completion_tokens"]) == ("claude-sonnet-4-6", 5, 20)
    assert batched["cost_usd"] > 0
    assert by_traffic[next(t for t in by_traffic if t != "batch")]["requests"] == 1


@pytest.fixture(scope="module")
def short_window():
    """A gateway whose batches expire after two seconds, with a backend too slow to finish them."""
    args = ["--batch-window-secs", "2", "--batch-concurrency", "2"]
    with Stack(ext_proc_args=args, simulator_args={"llamacpp-mistral": ["--ttft-ms", "300"]}) as s:
        yield s


def test_a_batch_past_its_window_expires_keeping_its_results(short_window, spec):
    client = sdk(short_window, "unused")
    lines = [chat_line(f"late-{i}", "mistral-7b-instruct", max_tokens=1) for i in range(30)]
    created = start_batch(client, lines)
    assert created.expires_at == created.created_at + 2
    batch = wait_for_batch(client, created.id, within=20)
    assert batch.status == "expired", batch
    spec.validate("Batch", raw_json(client.batches.with_raw_response.retrieve, batch.id))
    assert batch.expired_at >= batch.expires_at and batch.completed_at is None
    output, errors = results(client, batch, [line["custom_id"] for line in lines])
    assert output and errors, batch.request_counts
    assert all(answer["response"]["status_code"] == 200 for answer in output.values())
    assert all(line["error"]["code"] == "batch_expired" and line["response"] is None for line in errors.values())
    assert file_lines(client, batch.output_file_id)
