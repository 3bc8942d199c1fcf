"""A clean stop of the stream guard (SIGTERM, as a rolling update sends): streams
open at that moment finish if they can within the shutdown deadline, the others
end with OpenAI's error event after every chunk they had, and new connections
are refused at once, so that nothing is cut off silently."""

import threading
import time

import openai
import pytest

from harness import Stack, sdk

MODEL = "llama-3.1-8b-instruct"
HELLO = [{"role": "user", "content": "hello there"}]
DEADLINE_SECS = 4
# Streams of 100 ms a token: 10 tokens finish well within the deadline, 200 never do.
SHORT, LONG = 10, 200


@pytest.fixture
def gateway():
    with Stack(stream_guard_args=["--shutdown-deadline-secs", str(DEADLINE_SECS)]) as s:
        yield s


class Stream(threading.Thread):
    """A stream read by the official SDK in its own thread: its chunks' content, and the error that ended it."""

    def __init__(self, stack, tokens: int):
        super().__init__(daemon=True)
        self.stack, self.tokens = stack, tokens
        self.contents, self.finish_reason, self.error = [], None, None
        self.started = threading.Event()

    def run(self):
        try:
            for chunk in sdk(self.stack).chat.completions.create(
                    model=MODEL, messages=HELLO, stream=True, max_tokens=self.tokens,
                    extra_headers={"x-sim-itl-ms": "100", "x-sim-output-tokens": str(self.tokens)}):
                self.started.set()
                if chunk.choices:
                    self.contents.append(chunk.choices[0].delta.content)
                    self.finish_reason = chunk.choices[0].finish_reason or self.finish_reason
        except openai.APIError as e:
            self.error = e
        finally:
            self.started.set()


def test_sigterm_lets_open_streams_finish_ends_the_rest_with_an_error_event_and_refuses_new_ones(gateway):
    streams = [Stream(gateway, SHORT) for _ in range(3)] + [Stream(gateway, LONG) for _ in range(3)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.started.wait(30)
    assert all(s.error is None for s in streams), [s.error for s in streams]

    guard = gateway.terminate("stream-guard")

    # Draining: a new stream cannot reach the guard, and gets an OpenAI error at once.
    with pytest.raises(openai.APIStatusError) as refused:
        list(sdk(gateway).chat.completions.create(model=MODEL, messages=HELLO, stream=True, max_tokens=2))
    assert refused.value.status_code == 503, refused.value
    assert guard.poll() is None, "the guard left before its open streams were done"

    for stream in streams:
        stream.join(60)
    short, long = streams[:3], streams[3:]
    for stream in short:
        assert stream.error is None, stream.error
        assert stream.finish_reason in ("length", "stop") and len([c for c in stream.contents if c]) == SHORT
    for stream in long:
        # Every chunk it had, then the SDK's APIError from the guard's error event: not a dropped connection.
        assert type(stream.error) is openai.APIError, stream.error
        assert stream.error.body["code"] == "stream_interrupted"
        assert stream.error.message.startswith("The gateway is shutting down")
        assert 0 < len([c for c in stream.contents if c]) < LONG
    assert guard.wait(30) == 0


class Whole(threading.Thread):
    """A whole request to the Anthropic backend (translated by ext_proc both ways), whose
    answer takes `ttft_ms`: the completion it got, or the error."""

    def __init__(self, stack, ttft_ms: int):
        super().__init__(daemon=True)
        self.stack, self.ttft_ms = stack, ttft_ms
        self.completion, self.error = None, None

    def run(self):
        try:
            self.completion = sdk(self.stack).chat.completions.create(
                model="claude-sonnet-4-6", messages=HELLO, max_tokens=5,
                extra_headers={"x-sim-ttft-ms": str(self.ttft_ms)})
        except openai.APIError as e:
            self.error = e


@pytest.fixture
def ext_proc_gateway():
    with Stack(ext_proc_args=["--shutdown-deadline-secs", str(DEADLINE_SECS)]) as s:
        yield s


def test_sigterm_lets_ext_procs_open_exchanges_finish_then_it_exits(ext_proc_gateway):
    gateway = ext_proc_gateway
    short = [Whole(gateway, 1500) for _ in range(3)]
    long = [Whole(gateway, 30_000) for _ in range(2)]
    for request in short + long:
        request.start()
    time.sleep(0.5)  # every request is past ext_proc's rewrite and waits for its answer

    ext_proc = gateway.terminate("ext-proc")
    for request in short + long:
        request.join(60)
    for request in short:
        # Answered within the deadline: translated back from Anthropic's shape as usual.
        assert request.error is None, request.error
        assert request.completion.object == "chat.completion" and request.completion.choices[0].message.content
    for request in long:
        # Still waiting at the deadline: an OpenAI error, never an untranslated answer.
        assert isinstance(request.error, openai.APIStatusError), request.error
        assert request.error.status_code == 503 and request.error.body["code"] == "processing_failed"
    assert ext_proc.wait(30) == 0
