"""What runs in a `serve run` session, seen from outside: its processes, what they listen on, its HAProxy."""

from __future__ import annotations

import os
import time

import psutil


def listeners(pid: int) -> list[tuple[str, int]]:
    return [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]


def session_processes(session_id: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            if os.getsid(process.pid) == session_id:
                found.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def named(processes: list[psutil.Process], marker: str) -> list[psutil.Process]:
    return [p for p in processes if marker in " ".join(p.info["cmdline"] or [p.info["name"] or ""])]


def session_of_haproxy_on(port: int) -> list[psutil.Process]:
    """The processes of the `serve run` session whose HAProxy listens on 127.0.0.1:`port`. Each HAProxy
    reload hands the socket to a new process and ends the old one, so a process may vanish mid-look."""
    for _ in range(20):
        for process in psutil.process_iter(["name"]):
            try:
                if process.info["name"] == "haproxy" and ("127.0.0.1", port) in listeners(
                    process.pid
                ):
                    return session_processes(os.getsid(process.pid))
            except (psutil.Error, ProcessLookupError):
                continue
        time.sleep(0.5)
    raise AssertionError(f"no HAProxy process listens on 127.0.0.1:{port}")
