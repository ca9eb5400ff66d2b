"""A fleet rollout with the watch window on every host (tests/fleet.py's three hosts): the first host is a
canary for the rest, so a release that passes its health check and fails real traffic stops the rollout
there, switched back, before host 2 is touched."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fleet import fleet_fixture  # noqa: F401  (the module-scoped `fleet` fixture)
from test_stack_rollout import app, table_of  # noqa: F401  (`app`: one project on every host, removed after)


def test_a_failed_watch_on_the_first_host_stops_the_rollout_before_the_second(app, tmp_path):
    assert app.rollout("v1").returncode == 0
    fmt = f"bluegreen_watch_{app.name}"
    for h in app.fleet.hosts:
        log = tmp_path / f"{h.name}-watch.log"
        site = h.default_site(app.name, extra=f"add_header X-Bluegreen-Upstream $bluegreen_route_{app.name} always;\n"
                                              f"    access_log {log} {fmt};")
        # The format init wrote before $request_time was added: such server blocks are still judged.
        h.write_site("default", f"log_format {fmt} '$msec $status \"$upstream_addr\"';\n" + site)
        env = Path(h.deploy_root, "projects", f"{app.name}.env")
        env.write_text(env.read_text() + "WATCH_SECONDS=30\nWATCH_MIN_REQUESTS=10\n")
    h1 = app.fleet.hosts[0]
    stop, answers = threading.Event(), []

    def traffic() -> None:  # real clients of host 1 while its watch runs
        while not stop.is_set():
            answers.append(h1.get("/version", timeout=5)[0])
            time.sleep(0.02)

    client = threading.Thread(target=traffic, daemon=True)
    client.start()
    try:
        proc = app.rollout("failing", "--json")
    finally:
        stop.set()
        client.join(10)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert table_of(proc) == [("h1", "failed", "v1", "v1"), ("h2", "not started", "v1", "v1"),
                              ("h3", "not started", "v1", "v1")]
    assert "[h1] [4/6] watch" in proc.stderr and "switching back to v1" in proc.stderr
    assert app.versions() == ["v1", "v1", "v1"]
    assert 500 in answers  # host 1's clients met the bad release before its watch switched back
    assert app.journal(h1)[-1]["failed_step"] == "watch"
    for h in app.fleet.hosts[1:]:
        assert [e["tag"] for e in app.journal(h)] == ["v1"]  # never deployed there
