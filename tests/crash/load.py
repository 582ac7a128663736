"""Load for the crash suite: streaming chat completions through the gateway(s), each outcome recorded as
the client saw it, and the ledger check that every response received in full was billed exactly once.

A response is *complete* when the client read its usage chunk and the `data: [DONE]` line with no error
event: that is a response the tenant was served in full, and it must be on the ledger exactly once,
whatever crashed around it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import httpx

from inference.settings import WorkerSettings
from ledger.pricing import usage_amount

MODEL = "tollgate-tiny"
PRICE = WorkerSettings().models[MODEL].price
REQUEST_TIMEOUT_S = 60
ENTRIES_PAGE = 500


@dataclass
class Outcome:
    request_id: str | None  # x-request-id, when the response head arrived
    complete: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def stream_once(client: httpx.Client, base_url: str, key: str, max_tokens: int, prompt: str) -> Outcome:
    outcome = Outcome(request_id=None)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage = None
    try:
        with client.stream(
            "POST", f"{base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            outcome.request_id = response.headers.get("x-request-id")
            if response.status_code != 200:
                outcome.error = f"status {response.status_code}"
                return outcome
            done = False
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    outcome.error = str(chunk["error"])
                elif chunk.get("usage"):
                    usage = chunk["usage"]
            if done and usage is not None and outcome.error is None:
                outcome.complete = True
                outcome.prompt_tokens = usage["prompt_tokens"]
                outcome.completion_tokens = usage["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        outcome.error = repr(error)
    return outcome


class Load:
    """`clients` threads sending streaming requests round-robin over `base_urls` until stopped."""

    def __init__(self, base_urls: list[str], key: str, clients: int, max_tokens: int) -> None:
        self.base_urls = base_urls
        self.key = key
        self.max_tokens = max_tokens
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 5)
            assert not thread.is_alive(), "a load thread did not stop"

    def _run(self, number: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=2)) as client:
            sent = 0
            while not self._stop.is_set():
                base_url = self.base_urls[(number + sent) % len(self.base_urls)]
                outcome = stream_once(
                    client, base_url, self.key, self.max_tokens, f"Story {number}-{sent}: once"
                )
                sent += 1
                with self._lock:
                    self.outcomes.append(outcome)
                if outcome.error is not None and outcome.request_id is None:
                    time.sleep(0.1)  # the gateway is down: do not spin

    def complete_count(self) -> int:
        with self._lock:
            return sum(outcome.complete for outcome in self.outcomes)


def all_entries(admin: httpx.Client, tenant_id: str) -> list[dict]:
    entries, since = [], 0
    while True:
        response = admin.get(
            f"/admin/v1/tenants/{tenant_id}/entries", params={"since": since, "limit": ENTRIES_PAGE}
        )
        assert response.status_code == 200, response.text
        page = response.json()
        entries += page["entries"]
        since = page["next_since"]
        if not page["has_more"]:
            return entries


def attempt_of(request_id: str) -> str:
    """The request id an attempt id belongs to (the gateway's retries are `<request id>.<n>`)."""
    return request_id.split(".", 1)[0]


def check_ledger(admin: httpx.Client, tenant_id: str, granted: int, outcomes: list[Outcome]) -> dict:
    """Every complete response billed exactly once with its tokens; nothing billed twice or for a request
    never sent; the balance is the grant minus what was billed. Returns figures for the message."""
    entries = all_entries(admin, tenant_id)
    usage = [entry for entry in entries if entry["type"] == "usage_allocated"]
    by_event = defaultdict(list)
    for entry in usage:
        by_event[entry["request_id"]].append(entry)
    duplicated = {event_id: len(found) for event_id, found in by_event.items() if len(found) > 1}
    assert not duplicated, f"usage billed more than once: {duplicated}"
    entry_ids = [entry["entry_id"] for entry in entries]
    assert len(entry_ids) == len(set(entry_ids)), "an entry id appears twice"

    by_request = defaultdict(list)
    for event_id, (entry,) in by_event.items():
        by_request[attempt_of(event_id)].append(entry)
    sent = {outcome.request_id for outcome in outcomes if outcome.request_id}
    complete = [outcome for outcome in outcomes if outcome.complete]
    unbilled, wrong = [], []
    for outcome in complete:
        billed = by_request.get(outcome.request_id, [])
        served = [
            e
            for e in billed
            if (e["prompt_tokens"], e["completion_tokens"])
            == (outcome.prompt_tokens, outcome.completion_tokens)
        ]
        if not served:
            unbilled.append(outcome.request_id)
            continue
        entry = served[0]
        expected = usage_amount(PRICE, outcome.prompt_tokens, outcome.completion_tokens)
        if entry["amount"] != expected:
            wrong.append((outcome.request_id, entry, expected))
    assert not unbilled, (
        f"{len(unbilled)} of {len(complete)} complete responses were never billed: {unbilled[:10]}"
    )
    assert not wrong, f"complete responses billed with other tokens or amounts: {wrong[:5]}"
    phantom = set(by_request) - sent
    # A response whose head never reached the client (the gateway died first) has no x-request-id here.
    headless = sum(1 for outcome in outcomes if outcome.request_id is None)
    assert len(phantom) <= headless, (
        f"usage billed for {len(phantom)} requests never seen by a client: {sorted(phantom)[:10]}"
    )

    billed = sum(entry["amount"] for entry in usage)
    overage = sum(entry.get("overage", 0) for entry in usage)
    balance = admin.get(f"/admin/v1/tenants/{tenant_id}/balance").json()["balance"]
    assert overage == 0, f"{overage} credits billed as overage with ample credit"
    assert balance == granted - billed, f"balance {balance} != granted {granted} - billed {billed}"
    return {
        "complete": len(complete),
        "requests": len(outcomes),
        "billed": billed,
        "usage_entries": len(usage),
    }


def wait_ledger_settled(
    admin: httpx.Client, tenant_id: str, granted: int, outcomes: list[Outcome], timeout_s: float
) -> dict:
    """Until the projection holds every complete response and the balance agrees (the fold and the
    projector catch up after restarts); the last failure when it never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check_ledger(admin, tenant_id, granted, outcomes)
        except (AssertionError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
