"""A GCS JSON API server on loopback for the tests: gcp-storage-emulator, in memory, in its own process.

    python tests/gcs_server.py [--bucket NAME]...

Prints ``READY <port>`` once it serves. Buckets named on the command line exist from the start. The
bucket ``forbidden`` exists but answers every request with HTTP 403, as GCS does for an account that
lacks the permission: the emulator has no access control of its own.

Object generations behave as on GCS, which the emulator leaves out: reads carry ``x-goog-generation``
and the ``ifGenerationMatch`` / ``ifGenerationNotMatch`` preconditions are answered (412 / 304).
tensorstore (orbax's OCDBT checkpoints) relies on both: it commits a checkpoint's manifest with a
conditional write on the generation it last read, and without the header it reads generation 0 and
fails with "Malformed StorageGeneration".

Deleting an empty bucket succeeds while upload sessions into it are still open, as on GCS, where an
unfinished upload is not an object (the emulator answers 409 until every session ends, which a paused
client never does).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from functools import partial
from http.server import HTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers.buckets import create_bucket
from gcp_storage_emulator.server import RequestHandler
from gcp_storage_emulator.storage import Storage

FORBIDDEN_BUCKET = "forbidden"
_OBJECT = re.compile(r"^(?:/download)?(?:/storage/v1)?/b/(?P<bucket>[^/]+)/o/(?P<name>.+)$")
_UPLOAD = re.compile(r"^/upload/storage/v1/b/(?P<bucket>[^/]+)/o$")
_BUCKET = re.compile(r"^(?:/storage/v1)?/b/(?P<bucket>[^/]+)/?$")


class Handler(RequestHandler):
    # The server answers one request at a time: a client that stops mid-request (a test pauses a run with
    # SIGSTOP) must not block every other client, so its connection is dropped after this many seconds of
    # silence (the client retries when it resumes).
    timeout = 10

    def _forbidden(self) -> bool:
        path = self.path.split("?", 1)[0]
        if f"/b/{FORBIDDEN_BUCKET}" not in path and not path.startswith(f"/{FORBIDDEN_BUCKET}/"):
            return False
        body = json.dumps({"error": {"code": 403, "message": "caller does not have storage.objects.get access",
                                     "errors": [{"reason": "forbidden"}]}}).encode()
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return True

    def _send_status(self, code: int) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _generation_refused(self, match, query, *, reading: bool) -> bool:
        """Answer a failed generation precondition (412, or 304 for a read): True if answered."""
        try:
            obj = self.storage.get_file_obj(match["bucket"], unquote(match["name"]) if reading else query["name"][0])
        except NotFound:  # GCS counts a missing object as generation 0
            obj = None
        generation = obj["generation"] if obj else "0"
        self._generation_headers = {"x-goog-generation": generation, "x-goog-metageneration": obj["metageneration"]} \
            if obj and reading else {}
        if "ifGenerationMatch" in query and query["ifGenerationMatch"][0] != generation:
            self._send_status(412)
            return True
        if reading and obj and "ifGenerationNotMatch" in query and query["ifGenerationNotMatch"][0] == generation:
            self._send_status(304)
            return True
        return False

    def end_headers(self):
        for key, value in getattr(self, "_generation_headers", {}).items():
            self.send_header(key, value)
        self._generation_headers = {}
        super().end_headers()

    def do_GET(self):
        if self._forbidden():
            return
        url = urlsplit(self.path)
        match = _OBJECT.match(url.path)
        if match and self._generation_refused(match, parse_qs(url.query), reading=True):
            return
        super().do_GET()

    def do_POST(self):
        if self._forbidden():
            return
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        match = _UPLOAD.match(url.path)
        if match and "name" in query and self._generation_refused(match, query, reading=False):
            return
        super().do_POST()

    def do_PUT(self):
        if not self._forbidden():
            super().do_PUT()

    def do_DELETE(self):
        if self._forbidden():
            return
        match = _BUCKET.match(urlsplit(self.path).path)
        if match and not self.storage.objects.get(match["bucket"]):
            for upload_id, upload in list(self.storage.resumable.items()):
                if upload.get("bucket") == match["bucket"]:
                    self.storage.delete_resumable_file_obj(upload_id)
        super().do_DELETE()

    def do_PATCH(self):
        if not self._forbidden():
            super().do_PATCH()

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class Server(HTTPServer):
    # Clients open many connections at once (tensorstore, parallel downloads); with the default listen
    # backlog of 5 the kernel drops the excess connection attempts and each waits out a 1 s SYN retry.
    request_queue_size = 128

    def handle_error(self, request, client_address):
        # A client that closes its connection early (a cancelled read) or falls silent is not a server failure.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, TimeoutError)):
            super().handle_error(request, client_address)


def start(*buckets: str) -> tuple[subprocess.Popen, str]:
    """Run this server in a child process (the tests' fixture, the storage benchmarks): the process and the
    server's URL, once it serves."""
    args = [a for b in buckets for a in ("--bucket", b)]
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise RuntimeError(f"the GCS emulator did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bucket", action="append", default=[])
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the emulator logs every 404 as an error
    storage = Storage(use_memory_fs=True)
    for name in [*args.bucket, FORBIDDEN_BUCKET]:
        create_bucket(name, storage)
    server = Server((args.host, args.port), partial(Handler, storage))
    print(f"READY {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
