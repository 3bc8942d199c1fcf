"""Batches survive their runner: ext-proc killed with SIGKILL mid-batch and started again
resumes the batch, and with two replicas sharing Redis and S3-compatible storage the survivor
takes the batch over. Either way the finished output and error files hold every input line
exactly once."""

import os
import re
import shutil

import httpx2
import pytest

from harness import (S3, Redis, Stack, backend_requests, chat_line, report, results, sdk, start_batch,
                     wait_for_batch)

# A lease lapses two seconds after its holder dies, so a restarted or surviving replica
# resumes the batch soon; four lines at a time, each answered in 100 ms, keep a batch of a
# few hundred lines running for several seconds, long enough to see its progress (committed
# every second) and kill it at chosen points.
RUNNER_ARGS = ["--batch-lease-secs", "2", "--batch-concurrency", "4"]
SLOW_BACKEND = {"llamacpp-mistral": ["--ttft-ms", "100"]}
INTERNAL_TOKEN_HEADER, OWNER_HEADER = "x-modelgate-internal-token", "x-modelgate-owner"


def slow_lines(count: int, prefix: str) -> list[dict]:
    return [chat_line(f"{prefix}-{i}", "mistral-7b-instruct", max_tokens=1) for i in range(count)]


def done_at_least(count: int):
    """Until `count` lines are done, or the batch has stopped running (too fast to catch there)."""
    return lambda b: (b.request_counts.completed + b.request_counts.failed >= count
                      or b.status not in ("validating", "in_progress"))


@pytest.fixture(scope="module")
def gateway():
    with Stack(ext_proc_args=RUNNER_ARGS, simulator_args=SLOW_BACKEND) as s:
        yield s


def kill_and_restart(stack, name: str) -> None:
    stack.kill(name)
    stack.restart(name)


def sent_again(stack, lines: int, sent_before: int) -> int:
    """How many lines the backend was sent more than once (the ones in flight at a kill)."""
    return len(backend_requests(stack, "llamacpp-mistral")) - sent_before - lines


# Where ext-proc is killed: (lines done first, as a fraction of the batch), once or more.
KILL_POINTS = {"early": [0.1], "late": [0.6], "early_and_late": [0.2, 0.6]}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_batch_killed_mid_run_resumes_and_writes_every_line_once(gateway, point):
    client = sdk(gateway)
    lines = slow_lines(200, point)
    sent_before = len(backend_requests(gateway, "llamacpp-mistral"))
    created = start_batch(client, lines)
    for fraction in KILL_POINTS[point]:
        at = wait_for_batch(client, created.id, done_at_least(int(fraction * len(lines))), outage=True)
        assert at.status == "in_progress", f"the batch finished before the kill at {fraction:.0%}: {at}"
        kill_and_restart(gateway, "ext-proc")
    batch = wait_for_batch(client, created.id, within=60, outage=True)
    assert batch.status == "completed", batch
    output, errors = results(client, batch, [line["custom_id"] for line in lines])
    assert errors == {} and all(answer["response"]["status_code"] == 200 for answer in output.values())
    report(f"batch killed {point}: {sent_again(gateway, len(lines), sent_before)} lines sent again, none written twice")


def test_a_batch_killed_as_it_finishes_keeps_its_files_whole(gateway):
    client = sdk(gateway)
    # Instant answers and many lines: the kill lands while the files are written (`finalizing`,
    # which lasts milliseconds) or just after.
    lines = [chat_line(f"final-{i}", max_tokens=1) for i in range(300)]
    created = start_batch(client, lines)
    seen = wait_for_batch(client, created.id, lambda b: b.status in ("finalizing", "completed"))
    kill_and_restart(gateway, "ext-proc")
    report(f"batch killed as it finishes: caught it {seen.status}")
    batch = wait_for_batch(client, created.id, within=60, outage=True)
    assert batch.status == "completed", batch
    output, errors = results(client, batch, [line["custom_id"] for line in lines])
    assert errors == {} and len(output) == 300


@pytest.fixture(scope="module")
def replicas():
    """Two ext-procs behind one Envoy, sharing batch metadata in Redis and files in S3."""
    if not shutil.which("redis-server") and not os.environ.get("CI"):
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; .ci/run installs it)")
    with Redis() as redis, S3() as s3:
        args = [*RUNNER_ARGS, "--redis-url", redis.url, "--files-url", s3.url]
        with Stack(ext_proc_args=args, ext_proc_env=s3.env, ext_proc_replicas=2,
                   simulator_args=SLOW_BACKEND) as stack:
            yield stack, s3


def runs_of(stack, batch_id: str) -> list[str]:
    """The replicas that took the batch, once per time: each logs the batches it takes."""
    return [name for name in stack.ext_proc_names for line in stack.log_tail(name, 100_000).splitlines()
            if batch_id in line and "running a batch" in line]


def test_the_surviving_replica_takes_over_a_killed_runners_batch(replicas):
    stack, s3 = replicas
    client = sdk(stack)
    lines = slow_lines(300, "takeover")
    created = start_batch(client, lines)
    at = wait_for_batch(client, created.id, done_at_least(30))
    assert at.status == "in_progress", at
    [runner] = runs_of(stack, created.id)
    [survivor] = [name for name in stack.ext_proc_names if name != runner]
    stack.kill(runner)
    batch = wait_for_batch(client, created.id, within=60, outage=True)
    assert batch.status == "completed", batch
    assert runs_of(stack, created.id) == sorted([runner, survivor], key=stack.ext_proc_names.index)
    output, errors = results(client, batch, [line["custom_id"] for line in lines])
    assert errors == {}
    report(f"two-replica takeover: {runner} killed at {at.request_counts.completed} lines done, {survivor} finished")

    # Any replica answers for any batch: the survivor, and the killed one once it is back.
    stack.restart(runner)
    answers = []
    for name in stack.ext_proc_names:
        stack.wait_for_port(stack.ports[stack.ext_proc_ports(name)[1]])
        answer = httpx2.get(f"{stack.replica_admin_url(name)}/v1/batches/{created.id}",
                            headers={INTERNAL_TOKEN_HEADER: stack.internal_token, OWNER_HEADER: ""})
        assert answer.status_code == 200, answer.text
        answers.append(answer.json())
    assert answers[0] == answers[1] and answers[0]["status"] == "completed"
    # The files are in the shared bucket, not on either replica's disk.
    listing = httpx2.get(f"{s3.endpoint}/{S3.BUCKET}", params={"list-type": "2"}).text
    assert len(re.findall(r"<Key>", listing)) >= 2, listing
