"""The local stack binds only loopback, reports its state, and stops without leftovers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from camoe.stack.kafka import broker_ready
from camoe.stack.process import pid_alive
from camoe.stack.stack import Stack


def listening_addresses(pid: int) -> set[str]:
    """Local addresses of the TCP sockets that ``pid`` and its children listen on."""
    pids = {pid}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            pids.add(int(path.parent.name))
    inodes = set()
    for p in pids:
        for fd in Path(f"/proc/{p}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                addresses.add(decode_address(cols[1].split(":")[0]))
    return addresses


def decode_address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
    full = b"".join(words)
    if full[:12] == b"\x00" * 10 + b"\xff\xff":  # IPv4-mapped IPv6
        return ".".join(str(b) for b in full[12:])
    return full.hex()


def test_every_started_service_listens_on_loopback_only(services):
    settings, endpoints = services
    assert endpoints.pids, "the session stack started services"
    for name, pid in endpoints.pids.items():
        addresses = listening_addresses(pid)
        assert addresses, f"{name} listens on nothing?"
        assert addresses == {"127.0.0.1"}, f"{name} listens on {addresses}"
    status = Stack(settings).status()
    for name in endpoints.pids:
        assert status[name].startswith("up at 127.0.0.1") or "redis://127.0.0.1" in status[name]


def test_down_leaves_nothing_running(services, tmp_path):
    settings, _ = services
    own = settings.model_copy(
        update={"stack": settings.stack.model_copy(update={"state_dir": tmp_path})}
    )
    # Only Redis: this test is about the lifecycle, and Redis starts in milliseconds.
    own = own.model_copy(update={"redis": own.redis.model_copy(update={"url": None})})
    stack = Stack(own)
    endpoints = stack.up(("redis",))
    pid = endpoints.pids["redis"]
    assert pid_alive(pid)
    assert stack.up(("redis",)).pids["redis"] == pid  # up again reuses the running one
    assert stack.down() == ["redis"]
    assert not pid_alive(pid)
    assert stack.status()["redis"] == "down"


def test_up_after_a_broker_died_without_down_starts_a_fresh_one(services, tmp_path):
    settings, _ = services
    own = settings.model_copy(
        update={
            "stack": settings.stack.model_copy(update={"state_dir": tmp_path}),
            "kafka": settings.kafka.model_copy(update={"bootstrap_servers": None}),
        }
    )
    stack = Stack(own)
    try:
        first = stack.up(("kafka",)).pids["kafka"]
        os.kill(first, signal.SIGKILL)  # a crash: its log folder (and cluster id) stay
        os.waitpid(first, 0)  # this process started it: reap it
        endpoints = stack.up(("kafka",))
        assert endpoints.pids["kafka"] != first
        assert broker_ready(endpoints.kafka or "")
    finally:
        stack.down()
