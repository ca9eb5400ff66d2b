"""bluegreen/ports.py: the kernel's ephemeral range and ports held by outgoing connections (real sockets)."""

from __future__ import annotations

import os
import socket

from bluegreen import ports

TCP_TEXT = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    "   0: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n"
    "   1: 0100007F:9C41 0100007F:1F91 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n"
    "   2: 0100007F:9C41 0100007F:1F92 06 00000000:00000000 00:00000000 00000000     0        0 0 1 0 100 0 0 10 0\n"
    "garbage \xff line\n"
)


def test_parse_range_accepts_only_two_ordered_ports():
    assert ports.parse_range("32768\t60999\n") == (32768, 60999)
    for bad in ("", "1", "60999 32768", "0 10", "1 70000", "a b", "1 2 3", "١ ٢"):
        assert ports.parse_range(bad) is None, bad


def test_ephemeral_range_reads_the_proc_file_and_falls_back(tmp_path):
    good = tmp_path / "range"
    good.write_text("20000\t29999\n")
    assert ports.ephemeral_range(str(good)) == (20000, 29999)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\xff" * 10000)
    assert ports.ephemeral_range(str(bad)) == ports.DEFAULT_RANGE
    assert ports.ephemeral_range(str(tmp_path / "missing")) == ports.DEFAULT_RANGE
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # never blocks
    assert ports.ephemeral_range(str(fifo)) == ports.DEFAULT_RANGE
    # The real file of this machine.
    low, high = ports.ephemeral_range()
    assert 1 <= low <= high <= 65535
    assert ports.in_ephemeral_range(low) and not ports.in_ephemeral_range(8081, (32768, 60999))


def test_ephemeral_warning_names_the_ports_and_both_fixes():
    assert ports.ephemeral_warning([("BLUE_PORT", 8081), ("GREEN_PORT", 8082)], (32768, 60999), "a.env") is None
    text = ports.ephemeral_warning([("BLUE_PORT", 8081), ("GREEN_PORT", 47082)], (32768, 60999), "a.env")
    assert text.startswith("GREEN_PORT=47082 in a.env is inside the kernel's ephemeral port range 32768-60999")
    assert "ports below 32768" in text and "net.ipv4.ip_local_reserved_ports=47082" in text


def test_local_holders_parses_proc_net_tcp():
    assert ports.local_holders(TCP_TEXT, 0x1F91) == ["LISTEN"]
    assert ports.local_holders(TCP_TEXT, 0x9C41) == ["ESTABLISHED", "TIME_WAIT"]
    assert ports.local_holders(TCP_TEXT, 1) == []


def test_outgoing_states_sees_a_real_outgoing_connection_and_not_a_listener(tmp_path):
    listener, client = socket.socket(), socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listen_port = listener.getsockname()[1]
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        client.bind(("127.0.0.1", port))  # the local end of an outgoing connection, on a chosen port
        client.connect(("127.0.0.1", listen_port))
        assert ports.outgoing_states(port) == ["ESTABLISHED"]
        # A listener's port (with its accepted connection sharing the local port) is not "outgoing".
        accepted, _ = listener.accept()
        try:
            assert ports.outgoing_states(listen_port) == []
        finally:
            accepted.close()
        note = ports.outgoing_note(port, ["ESTABLISHED"], (port, port))
        assert "the local end of 1 outgoing TCP connection(s) (ESTABLISHED; nothing listens on it" in note
        assert f"inside the kernel's ephemeral range {port}-{port}" in note
        assert "ephemeral" not in ports.outgoing_note(port, ["ESTABLISHED"], (1, 2))
    finally:
        client.close()
        listener.close()
    # Unreadable or planted files: nothing, never an error.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert ports.outgoing_states(port, files=(str(fifo), str(tmp_path / "missing"))) == []
