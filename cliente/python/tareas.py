#!/usr/bin/env python3
"""Tareas from Python: one file, standard library only (Python 3.9+).

Two clients for a Tareas distribuidor:

- ``Client``: the socket protocol (docs/protocol.md), JSON objects over TCP,
  optionally with a token and TLS. ``submit`` returns the ack, ``results()``
  iterates over the results pushed back, ``submit_many`` pipelines.
- ``HttpClient``: the HTTP API (docs/http.md): ``submit``, ``get``, ``wait``.

Every error the distribuidor answers becomes ``TareasError`` with its
``code`` (``unavailable``, ``conflict``, …) and ``message``.

Run as a script, ``python3 tareas.py demo`` sends one task of each built-in
type, as ``cargo run -p cliente`` does::

    python3 cliente/python/tareas.py demo [--addr HOST:PORT] [--token T] [--tls] [--ca FILE]
    python3 cliente/python/tareas.py http-demo [--url http://127.0.0.1:8080] [--token T]
"""

import argparse
import collections
import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

__all__ = ["Client", "HttpClient", "TareasError", "SAMPLES"]

#: One sample payload per built-in task type, in the demo's order.
SAMPLES = collections.OrderedDict(
    [
        ("hash", {"text": "hola"}),
        ("fibonacci", {"n": 100}),
        ("reverse", {"text": "¡Hola, mundo!"}),
        ("sum", {"numbers": [1, 2, 3, 4.5]}),
        ("compute", {"iterations": 1000000}),
        ("sleep", {"ms": 200}),
        ("echo", {"text": "Renderizar escena"}),
    ]
)


class TareasError(Exception):
    """An error reply: ``code`` is the protocol's error code."""

    def __init__(self, code, message, task_id=None, status=None):
        super().__init__("{}: {}".format(code, message))
        self.code = code
        self.message = message
        self.task_id = task_id
        #: The HTTP status, for errors of the HTTP API.
        self.status = status


def _tls_context(cafile):
    """A context that verifies the server: against ``cafile`` if given,
    else the system's roots."""
    return ssl.create_default_context(cafile=cafile)


class Client:
    """One connection to a distribuidor's socket.

    Replies come in request order; results are pushed whenever their task
    finishes (after its ack), so the client keeps those that arrive while
    it waits for a reply and ``results()`` hands them out.
    """

    def __init__(self, host="127.0.0.1", port=8888, token=None, tls=False,
                 cafile=None, timeout=60.0):
        raw = socket.create_connection((host, port), timeout=timeout)
        if tls or cafile:
            raw = _tls_context(cafile).wrap_socket(raw, server_hostname=host)
        self._sock = raw
        self._lines = raw.makefile("r", encoding="utf-8", newline="\n")
        self._results = collections.deque()
        self.client = "anonymous"
        if token is not None:
            reply = self.request({"type": "auth", "token": token})
            self.client = reply["client"]

    def close(self):
        self._lines.close()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()

    def send(self, message):
        """Sends one request without waiting for its reply (pipelining)."""
        self._sock.sendall(json.dumps(message).encode("utf-8") + b"\n")

    def _read(self):
        line = self._lines.readline()
        if not line:
            raise TareasError("closed", "the distribuidor closed the connection")
        return json.loads(line)

    def reply(self):
        """The next reply to a request, keeping results that come first."""
        while True:
            message = self._read()
            if message.get("type") == "result":
                self._results.append(message)
                continue
            if message.get("type") == "error":
                raise TareasError(message.get("code"), message.get("message"),
                                  message.get("task_id"))
            return message

    def request(self, message):
        """Sends one request and returns its reply."""
        self.send(message)
        return self.reply()

    def submit(self, task_type, payload, task_id=None, notify=True):
        """Submits a task; returns the ack once RabbitMQ confirmed it."""
        return self.request(_task(task_type, payload, task_id, notify))

    def submit_many(self, tasks):
        """Pipelines ``(task_type, payload)`` pairs; returns one ack or
        ``TareasError`` per task, in order."""
        for task_type, payload in tasks:
            self.send(_task(task_type, payload, None, True))
        answers = []
        for _ in tasks:
            try:
                answers.append(self.reply())
            except TareasError as error:
                answers.append(error)
        return answers

    def results(self):
        """Iterates over pushed results, waiting for each."""
        while True:
            if self._results:
                yield self._results.popleft()
            else:
                message = self._read()
                if message.get("type") == "result":
                    yield message

    def status(self, task_id):
        return self.request({"type": "status", "task_id": task_id})

    def ping(self):
        return self.request({"type": "ping"})


def _task(task_type, payload, task_id, notify):
    message = {"type": "task", "task_type": task_type, "payload": payload}
    if task_id is not None:
        message["task_id"] = task_id
    if not notify:
        message["notify"] = False
    return message


class HttpClient:
    """The distribuidor's HTTP API."""

    def __init__(self, base_url="http://127.0.0.1:8080", token=None, cafile=None,
                 timeout=90.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._context = _tls_context(cafile) if base_url.startswith("https") else None

    def _call(self, method, path, body=None, headers=None):
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token is not None:
            request.add_header("Authorization", "Bearer " + self.token)
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self._context) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as failed:
            answer = json.loads(failed.read() or b"null")
            if isinstance(answer, dict) and "error" in answer:
                error = answer["error"]
                raise TareasError(error.get("code"), error.get("message"),
                                  error.get("task_id"), failed.code) from None
            return failed.code, answer

    def submit(self, task_type, payload, task_id=None, idempotency_key=None):
        """Submits a task; returns ``{"task_id", "status": "queued"}``."""
        body = {"task_type": task_type, "payload": payload}
        if task_id is not None:
            body["task_id"] = task_id
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._call("POST", "/tasks", body, headers)[1]

    def get(self, task_id, wait=0):
        """The task; ``{"task_id", "state": "unknown"}`` if never acked."""
        path = "/tasks/" + urllib.parse.quote(task_id, safe="")
        if wait:
            path += "?wait={}".format(int(wait))
        return self._call("GET", path)[1]

    def wait(self, task_id, timeout=60.0):
        """The task once it finished, or as it is after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            task = self.get(task_id, wait=max(1, min(60, int(left))))
            if task.get("state") in ("succeeded", "failed") or left <= 1:
                return task

    def list(self, state=None, task_type=None, limit=50, after=None):
        query = {k: v for k, v in (("state", state), ("task_type", task_type),
                                    ("limit", limit), ("after", after)) if v is not None}
        return self._call("GET", "/tasks?" + urllib.parse.urlencode(query))[1]


def _demo(args):
    host, _, port = args.addr.rpartition(":")
    started = time.monotonic()
    with Client(host, int(port), token=args.token, tls=args.tls, cafile=args.ca) as client:
        types = {}
        for task_type, answer in zip(SAMPLES, client.submit_many(list(SAMPLES.items()))):
            if isinstance(answer, TareasError):
                print("error   {} {}".format(answer.code, answer.message))
                continue
            types[answer["task_id"]] = task_type
            print("ack     {:<10} {}".format(task_type, answer["task_id"]))
        outcomes = collections.Counter()
        for result in client.results():
            if result["task_id"] not in types:
                continue
            shown = json.dumps(result["result"]) if result["result"] is not None else result["error"]
            print("result  {:<10} {} {} by {} in {} ms: {}".format(
                types.pop(result["task_id"]), result["task_id"], result["status"],
                result.get("worker_id"), result.get("duration_ms"), shown[:100]))
            outcomes[result["status"]] += 1
            if not types:
                break
    print("\n{} sent, {} succeeded, {} failed in {:.2f}s".format(
        len(SAMPLES), outcomes["succeeded"], outcomes["failed"], time.monotonic() - started))
    return 0 if outcomes["failed"] == 0 else 1


def _http_demo(args):
    client = HttpClient(args.url, token=args.token, cafile=args.ca)
    accepted = [(task_type, client.submit(task_type, payload)["task_id"])
                for task_type, payload in SAMPLES.items()]
    failed = 0
    for task_type, task_id in accepted:
        task = client.wait(task_id)
        failed += task["state"] != "succeeded"
        print("{:<10} {} {} {}".format(task_type, task_id, task["state"],
                                       json.dumps(task["result"])[:80]))
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tareas from Python")
    parser.add_argument("command", choices=["demo", "http-demo"], nargs="?", default="demo")
    parser.add_argument("--addr", default=os.environ.get("DISTRIBUIDOR_ADDR", "127.0.0.1:8888"))
    parser.add_argument("--url", default=os.environ.get("TAREAS_HTTP_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--token", default=os.environ.get("TAREAS_TOKEN") or None)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--ca", default=os.environ.get("TAREAS_CA") or None)
    args = parser.parse_args(argv)
    try:
        return _demo(args) if args.command == "demo" else _http_demo(args)
    except (OSError, TareasError) as error:
        print("tareas: {}".format(error), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
