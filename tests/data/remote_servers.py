"""Local stand-ins for the OQMD REST API and the Materials Project API, serving real records on 127.0.0.1.

Each server runs ``http.server`` in a daemon thread on an ephemeral port, logs every request (path, query,
time, the status it answered) and can be told to misbehave: bursts of 502, 429 with ``Retry-After``, a
response that hangs past the client's timeout, truncated JSON, a connection cut mid-body, or a page that
fails until the test "repairs" it. A watchdog stops every server after ``lifetime`` seconds whatever happens.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HANG_SECONDS = 1.0  # a "hang" answers after this long; clients in tests time out well before


@dataclass
class Logged:
    """One request as the server saw it."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    started: float
    status: int = 0
    fault: str | None = None


@dataclass
class Faults:
    """Scripted misbehaviour: per key (e.g. an OQMD offset, or 'summary'), a list of faults used up in order.

    Fault names: ``502``, ``503``, ``429:<seconds>`` (with Retry-After), ``hang``, ``truncated`` (half the body,
    Content-Length matching), ``cut`` (Content-Length of the whole body, connection closed after half).
    ``broken`` keys fail with 502 on every request until removed.
    """

    scripted: dict[Any, list[str]] = field(default_factory=lambda: defaultdict(list))
    broken: set[Any] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_for(self, key: Any) -> str | None:
        with self.lock:
            if key in self.broken:
                return "502"
            queue = self.scripted.get(key)
            return queue.pop(0) if queue else None


class StubServer:
    """A threaded HTTP server with a request log and a fault script, stopped by ``close`` or its watchdog."""

    def __init__(self, route: Callable[[Logged], tuple[int, Any, dict[str, str]]], lifetime: float = 120.0) -> None:
        self.route = route
        self.log: list[Logged] = []
        self.faults = Faults()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                return

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                parsed = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
                entry = Logged(parsed.path, query, {k.lower(): v for k, v in self.headers.items()}, time.monotonic())
                server.log.append(entry)
                status, payload, headers = server.route(entry)
                fault = None
                if status == 200:
                    fault = server.faults.next_for(server.fault_key(entry))
                body = json.dumps(payload).encode()
                entry.fault = fault
                if fault == "hang":
                    entry.status = status
                    time.sleep(HANG_SECONDS)
                elif fault in ("502", "503"):
                    status, body, headers = int(fault), b'{"detail": "Bad Gateway"}', {}
                elif fault and fault.startswith("429"):
                    status, body = 429, b'{"detail": "Too Many Requests"}'
                    headers = {"Retry-After": fault.split(":", 1)[1]}
                entry.status = status
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    for key, value in headers.items():
                        self.send_header(key, value)
                    if fault == "truncated":
                        body = body[: len(body) // 2]
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if fault == "cut":
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client gave up (a timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.watchdog = threading.Timer(lifetime, self.close)
        self.watchdog.daemon = True
        self.watchdog.start()

    def fault_key(self, entry: Logged) -> Any:
        """Which fault queue a request draws from (overridden per protocol)."""
        return entry.path

    def close(self) -> None:
        """Stop serving and release the port."""
        self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests_to(self, path: str) -> list[Logged]:
        """Logged requests whose path is ``path``."""
        return [entry for entry in self.log if entry.path == path]


# --- OQMD ------------------------------------------------------------------------------------------------

_COMPARISON = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|!=|<|>|=)\s*(-?[\d.]+)\s*$")


def _filter(expression: str) -> Callable[[dict[str, Any]], bool]:
    """OQMD's ``filter=`` for numeric fields joined by AND (what the tests use), e.g. 'ntypes<=2 AND natoms<10'."""
    tests = []
    for clause in filter(None, re.split(r"\s+AND\s+", expression.strip())):
        match = _COMPARISON.match(clause)
        if not match:
            raise ValueError(f"unsupported filter clause {clause!r}")
        name, op, value = match.group(1), match.group(2), float(match.group(3))
        tests.append((name, op, value))
    ops = {
        "<": lambda a, b: a < b,
        ">": lambda a, b: a > b,
        "<=": lambda a, b: a <= b,
        ">=": lambda a, b: a >= b,
        "=": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
    }
    return lambda record: all(
        record.get(name) is not None and ops[op](float(record[name]), value) for name, op, value in tests
    )


class OqmdServer(StubServer):
    """``/oqmdapi/formationenergy`` with limit/offset paging, fields= and filter=, in either response shape."""

    PATH = "/oqmdapi/formationenergy"

    def __init__(self, records: list[dict[str, Any]], shape: str = "data", lifetime: float = 120.0) -> None:
        self.records = records
        self.shape = shape
        super().__init__(self._route, lifetime)

    def fault_key(self, entry: Logged) -> Any:
        return int(entry.query.get("offset", 0))

    def offsets(self) -> list[int]:
        """Offsets of every page request, in order."""
        return [int(entry.query.get("offset", 0)) for entry in self.requests_to(self.PATH)]

    def _route(self, entry: Logged) -> tuple[int, Any, dict[str, str]]:
        if entry.path != self.PATH:
            return 404, {"detail": "not found"}, {}
        try:
            selected = [r for r in self.records if _filter(entry.query.get("filter", ""))(r)]
        except ValueError as exc:
            return 400, {"detail": str(exc)}, {}
        limit = int(entry.query.get("limit", 50))
        offset = int(entry.query.get("offset", 0))
        fields = [f for f in entry.query.get("fields", "").split(",") if f]
        page = [{k: v for k, v in r.items() if not fields or k in fields} for r in selected[offset : offset + limit]]
        more = offset + limit < len(selected)
        following = dict(entry.query, offset=str(offset + limit))
        next_url = f"{self.url}{self.PATH}?{urllib.parse.urlencode(following)}" if more else None
        if self.shape == "data":
            payload = {
                "links": {"next": next_url, "base_url": self.url},
                "data": page,
                "meta": {"more_data_available": more, "data_returned": len(page), "data_available": len(selected)},
            }
        else:
            payload = {"count": len(selected), "next": next_url, "previous": None, "results": page}
        return 200, payload, {}


# --- Materials Project -----------------------------------------------------------------------------------


class MpServer(StubServer):
    """``/heartbeat`` and ``/materials/summary/`` (formula / chemsys lists, _fields, _limit, _skip) of the MP API.

    Requests without the expected ``x-api-key`` header are answered 403, as the real service does.
    """

    SUMMARY = "/materials/summary/"

    def __init__(self, documents: list[dict[str, Any]], api_key: str, lifetime: float = 120.0) -> None:
        self.documents = documents
        self.api_key = api_key
        super().__init__(self._route, lifetime)

    def fault_key(self, entry: Logged) -> Any:
        return "summary" if entry.path == self.SUMMARY else entry.path

    def _route(self, entry: Logged) -> tuple[int, Any, dict[str, str]]:
        if entry.path == "/heartbeat":
            return 200, {"db_version": "2018_legacy_stub", "access_controlled_batch_ids": [], "version": "0.87.0"}, {}
        if entry.path != self.SUMMARY:
            return 404, {"detail": "Not Found"}, {}
        if entry.headers.get("x-api-key") != self.api_key:
            return 403, {"detail": "Invalid API key"}, {}
        from pymatgen.core import Composition

        formulas = {Composition(f).reduced_formula for f in entry.query.get("formula", "").split(",") if f}
        systems = {"-".join(sorted(s.split("-"))) for s in entry.query.get("chemsys", "").split(",") if s}
        selected = [
            d
            for d in self.documents
            if (formulas and d["formula_pretty"] in formulas) or (systems and d["chemsys"] in systems)
        ]
        skip = int(entry.query.get("_skip", 0))
        limit = int(entry.query.get("_limit", 1000))
        fields = [f for f in entry.query.get("_fields", "").split(",") if f]
        page = [{k: v for k, v in d.items() if not fields or k in fields} for d in selected[skip : skip + limit]]
        return 200, {"data": page, "meta": {"total_doc": len(selected), "max_limit": 1000}}, {}
