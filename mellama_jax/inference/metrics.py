"""The server's Prometheus metrics, as text exposition format 0.0.4 (no client library needed).

vLLM's and JetStream's names, under `mellama_`: requests by finish reason, time to first token, time per output
token and end-to-end latency as histograms (seconds), prompt and generated token counters, queue depth, slots in
use, and generated tokens per second over the last 10 s.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WINDOW = 10.0  # seconds over which tokens/s is measured


class Histogram:
    def __init__(self, name: str, help_: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts, self.sum, self.total = [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum, self.total = self.sum + value, self.total + 1

    def lines(self) -> list[str]:
        out, running = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"], 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            out.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        out += [f'{self.name}_bucket{{le="+Inf"}} {self.total}', f"{self.name}_sum {self.sum}",
                f"{self.name}_count {self.total}"]  # fmt: skip
        return out


class Metrics:
    def __init__(self, slots: int):
        self.lock, self.slots = threading.Lock(), slots
        self.ttft = Histogram("mellama_time_to_first_token_seconds", "Time from request to first output token.")
        self.tpot = Histogram("mellama_time_per_output_token_seconds", "Time per output token after the first.")
        self.e2e = Histogram("mellama_e2e_request_latency_seconds", "Time from request to its last token.")
        self.finished: collections.Counter = collections.Counter()  # finish reason -> requests
        self.errors: collections.Counter = collections.Counter()  # HTTP status -> responses
        self.prompt_tokens = self.generated_tokens = 0
        self.recent: collections.deque = collections.deque()  # (time, tokens) of the last WINDOW seconds

    def request_done(self, reason: str, prompt: int, generated: int, began: float, first: float | None) -> None:
        now = time.monotonic()
        with self.lock:
            self.finished[reason] += 1
            self.prompt_tokens += prompt
            self.e2e.observe(now - began)
            if first is not None:
                self.ttft.observe(first - began)
                if generated > 1:
                    self.tpot.observe((now - first) / (generated - 1))

    def tokens(self, n: int) -> None:
        with self.lock:
            self.generated_tokens += n
            self.recent.append((time.monotonic(), n))

    def error(self, status: int) -> None:
        with self.lock:
            self.errors[status] += 1

    def render(self, queued: int, busy: int) -> str:
        with self.lock:
            now = time.monotonic()
            while self.recent and self.recent[0][0] < now - WINDOW:
                self.recent.popleft()
            rate = sum(n for _, n in self.recent) / WINDOW
            lines = ["# HELP mellama_requests_total Finished requests by finish reason.",
                     "# TYPE mellama_requests_total counter"]  # fmt: skip
            lines += [f'mellama_requests_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
            lines += ["# HELP mellama_request_errors_total Refused requests by HTTP status.",
                      "# TYPE mellama_request_errors_total counter"]  # fmt: skip
            lines += [f'mellama_request_errors_total{{status="{s}"}} {n}' for s, n in sorted(self.errors.items())]
            for name, kind, value, help_ in (
                ("mellama_prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens of finished requests."),
                ("mellama_generation_tokens_total", "counter", self.generated_tokens, "Generated tokens."),
                ("mellama_queue_depth", "gauge", queued, "Requests waiting for a slot."),
                ("mellama_slots_in_use", "gauge", busy, "Slots decoding a request."),
                ("mellama_slots_total", "gauge", self.slots, "Slots of the engine."),
                ("mellama_generation_tokens_per_second", "gauge", rate, f"Generated tokens/s over {WINDOW:g} s."),
            ):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
            for histogram in (self.ttft, self.tpot, self.e2e):
                lines += histogram.lines()
        return "\n".join(lines) + "\n"
