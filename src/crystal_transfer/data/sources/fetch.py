"""Polite, resumable HTTP for the remote sources: retries with backoff, a request rate, an on-disk cache.

Only the standard library is used (``urllib``). A :class:`RetryPolicy` says how long to wait for a response,
how often to retry and how long to back off; :class:`PoliteClient` applies it to GET requests that return
JSON, retrying on 429 and 5xx responses, timeouts, dropped connections and truncated JSON, and honouring
``Retry-After``. Cached results are written atomically, so an interrupted fetch resumes where it stopped.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crystal_transfer import __version__
from crystal_transfer.data.sources.base import SourceError

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
USER_AGENT = f"crystal_transfer/{__version__} (research pipeline; polite paging with cache)"


class FetchError(SourceError):
    """A remote request failed for good (retries exhausted, or an error that retrying cannot fix)."""


class RetryableError(Exception):
    """A failure worth retrying, with the server's Retry-After in seconds when it sent one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """Timeouts, retries and pacing of remote requests (the ``http`` section of a remote source's config)."""

    timeout: float = 60.0
    retries: int = 8
    backoff: float = 2.0
    backoff_max: float = 300.0
    jitter: float = 0.5
    min_interval: float = 1.0
    max_retry_after: float = 900.0

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> RetryPolicy:
        """Build a policy from a config section; missing keys keep their defaults."""
        options = options or {}
        return cls(**{key: float(value) if key != "retries" else int(value) for key, value in options.items()})

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based): exponential backoff with jitter.

        A server's ``Retry-After`` is a lower bound (capped at ``max_retry_after``).
        """
        base = min(self.backoff_max, self.backoff * (2.0**attempt))
        wait = base * (1.0 + self.jitter * (rng or random).random())
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def with_retries(
    action: Callable[[], Any],
    policy: RetryPolicy,
    what: str,
    log: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Run ``action`` until it succeeds; retry on :class:`RetryableError` with backoff, up to ``policy.retries``."""
    last: RetryableError | None = None
    for attempt in range(policy.retries + 1):
        try:
            return action()
        except RetryableError as exc:
            last = exc
            if attempt == policy.retries:
                break
            wait = policy.delay(attempt, exc.retry_after)
            log(f"{what}: {exc}; retry {attempt + 1}/{policy.retries} in {wait:.2f} s")
            sleep(wait)
    raise FetchError(f"{what}: giving up after {policy.retries + 1} attempts; last error: {last}")


class PoliteClient:
    """GET JSON documents with a minimum interval between requests and the retries of a :class:`RetryPolicy`."""

    def __init__(self, policy: RetryPolicy, log: Callable[[str], None] = print) -> None:
        self.policy = policy
        self.log = log
        self.requests = 0
        self._last_request = 0.0

    def _pace(self) -> None:
        wait = self._last_request + self.policy.min_interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_request = time.monotonic()

    def _get_once(self, url: str) -> Any:
        self._pace()
        self.requests += 1
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.policy.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in RETRY_STATUS:
                raise RetryableError(
                    f"HTTP {exc.code} {exc.reason}", parse_retry_after(exc.headers.get("Retry-After"))
                ) from None
            raise FetchError(f"GET {url}: HTTP {exc.code} {exc.reason} (not retried)") from None
        except TimeoutError as exc:
            raise RetryableError(f"timed out after {self.policy.timeout:g} s ({exc})") from None
        except urllib.error.URLError as exc:
            raise RetryableError(f"connection failed: {exc.reason}") from None
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            # IncompleteRead (body shorter than Content-Length), RemoteDisconnected, resets.
            raise RetryableError(f"connection broken: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RetryableError(f"invalid or truncated JSON ({len(body)} bytes): {exc}") from None

    def get_json(self, url: str, validate: Callable[[Any], None] | None = None) -> Any:
        """GET ``url`` and decode JSON, retrying transient failures; ``validate`` may raise RetryableError."""

        def attempt() -> Any:
            document = self._get_once(url)
            if validate is not None:
                validate(document)
            return document

        return with_retries(attempt, self.policy, f"GET {url}", self.log)


def query_digest(query: dict[str, Any]) -> str:
    """A stable sha256 of a query description (sorted JSON): names the cache folder of that query."""
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()


def read_manifest(options: dict[str, Any], kind: str) -> dict[str, Any]:
    """The manifest of a finished fetch, checked against the query in ``options``; SourceError if unusable."""
    path = options.get("manifest")
    if not path or not Path(path).is_file():
        raise SourceError(
            f"{kind} data not fetched yet (no manifest at {path}); run 'python -m crystal_transfer fetch-{kind} ...' "
            f"or the workflow's fetch rule"
        )
    manifest = json.loads(Path(path).read_text())
    if not manifest.get("complete"):
        raise SourceError(f"{kind} manifest {path} describes an unfinished fetch; rerun the fetch")
    return manifest
