"""The channel between `orion serve` (torchrun's agent on each node) and its node's workers.

The agent binds the HTTP port before any worker starts (so "port in use" is
an error before anything runs) and hands the listening socket to rank 0 over
a Unix socket (SCM_RIGHTS, through multiprocessing.reduction). The agent keeps
its copy open: while torchrun restarts a failed worker group, connections
wait in the kernel's backlog and are served by the next rank 0 instead of
being refused. Workers report "ready" and a summary back the same way, so the
agent prints the ready line and the exit summary.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

ADDRESS_ENV = "ORION_WORKER_CONTROL"
AUTHKEY_ENV = "ORION_WORKER_CONTROL_KEY"


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket, or OSError (EADDRINUSE, EADDRNOTAVAIL) for the caller to report."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class ControlServer:
    def __init__(self, listening: socket.socket | None, on_message: Callable[[dict[str, Any]], None]):
        self.listening = listening
        self.on_message = on_message
        self._dir = tempfile.mkdtemp(prefix="orion-serve-")
        self.scratch = Path(self._dir)  # this server's temporary files; removed by close()
        self.address = os.path.join(self._dir, "control.sock")
        self._authkey = secrets.token_bytes(16)
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self._authkey)
        self._closed = False
        threading.Thread(target=self._accept, name="orion-control", daemon=True).start()

    def env(self) -> dict[str, str]:
        return {ADDRESS_ENV: self.address, AUTHKEY_ENV: self._authkey.hex()}

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except Exception:  # noqa: BLE001 - closed listener, or a client that failed auth
                if self._closed:
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        try:
            hello = conn.recv()
            if hello.get("want_socket"):
                if self.listening is None:
                    conn.send({"socket": False})
                else:
                    conn.send({"socket": True})
                    send_handle(conn, self.listening.fileno(), hello["pid"])
            while True:
                self.on_message(conn.recv())
        except (EOFError, OSError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class ControlClient:
    """A worker's end; absent (None) when the worker was not started by `orion serve`."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def connect(cls) -> "ControlClient | None":
        address = os.environ.get(ADDRESS_ENV)
        if not address:
            return None
        return cls(Client(address, family="AF_UNIX", authkey=bytes.fromhex(os.environ[AUTHKEY_ENV])))

    def receive_listening_socket(self) -> socket.socket | None:
        self._conn.send({"event": "hello", "pid": os.getpid(), "want_socket": True})
        if not self._conn.recv().get("socket"):
            return None
        fd = recv_handle(self._conn)
        return socket.socket(fileno=fd)

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            try:
                self._conn.send(message)
            except OSError:
                log.debug("control channel closed", exc_info=True)

    def hello(self) -> None:
        self.send({"event": "hello", "pid": os.getpid(), "want_socket": False})
