"""The day-2 commands on a fleet (`status`, `history`, `rollback`, `lock`/`unlock`, `prune` with `--hosts`) on
real hosts: three network namespaces with their own dockerd, sshd and nginx (tests/fleet.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleet import fleet_fixture  # noqa: F401  (the module-scoped `fleet` fixture)
from test_stack_rollout import app, break_image_on, table_of  # noqa: F401  (`app`: one project on every host, removed after)


def bg(app, *args: str, hosts: str | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`bluegreen ARGS --hosts h1,h2,h3 --ssh-config CFG` from the controller (this machine)."""
    hosts = hosts or ",".join(h.name for h in app.fleet.hosts)
    argv = [sys.executable, app.stack.pyz, *args, "--hosts", hosts, "--ssh-config", app.fleet.ssh_config]
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if not k.startswith("BLUEGREEN_")}
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)


def test_fleet_status_healthy_then_skew_then_an_unreachable_host(app):
    assert app.rollout("v1").returncode == 0
    healthy = bg(app, "status", app.name)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "fleet: ok, 3 host(s) serve v1" in healthy.stdout
    rows = [line.split() for line in healthy.stdout.splitlines()[1:4]]
    assert [r[:4] for r in rows] == [[h.name, "v1", f"({r[2][1:-1]})", "ok"] for h, r in zip(app.fleet.hosts, rows)]

    # Skew: h2 alone deploys v2 (by hand, on the host).
    h2 = app.fleet.hosts[1]
    assert app.fleet.ssh("h2", f'python3 "$BLUEGREEN_ROOT/bluegreen.pyz" deploy {app.name} v2').returncode == 0
    skew = bg(app, "status", app.name, "--json")
    assert skew.returncode == 1, skew.stdout + skew.stderr
    found = json.loads(skew.stdout)
    assert found["ok"] is False and [(h["target"], h["tag"], h["verdict"]) for h in found["hosts"]] == [
        ("h1", "v1", "ok"), ("h2", "v2", "ok"), ("h3", "v1", "ok")]
    assert found["problems"] == ["version skew: v1 on h1, h3; v2 on h2"]
    assert h2.get("/version")[1] == "v2"

    # An unreachable host (nothing listens there) is named, and the others still answer.
    hosts = f"h1,h2,root@{app.fleet.gateway}:1"
    gone = bg(app, "status", app.name, "--ssh-option", "StrictHostKeyChecking=no", hosts=hosts)
    assert gone.returncode == 1
    lines = gone.stdout.splitlines()
    assert lines[3].split()[:3] == [f"root@{app.fleet.gateway}:1", "?", "unknown"] and "cannot reach" in lines[3]
    assert f"unreachable or unknown: root@{app.fleet.gateway}:1" in gone.stdout and "version skew: v1 on h1; v2 on h2" in gone.stdout


def test_fleet_rollback_after_a_split_rollout_brings_every_host_to_one_tag(app):
    assert app.rollout("v1").returncode == 0
    good_env = Path(app.fleet.hosts[1].deploy_root, "projects", f"{app.name}.env").read_text()
    break_image_on(app, app.fleet.hosts[1])
    split = app.rollout("v2", "--json")
    assert split.returncode == 1 and app.versions() == ["v2", "v1", "v1"], split.stdout + split.stderr
    Path(app.fleet.hosts[1].deploy_root, "projects", f"{app.name}.env").write_text(good_env)

    summary = Path(app.fleet.workdir, f"{app.name}-summary.md")
    back = bg(app, "rollback", app.name, "--json", env={"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)})
    assert back.returncode == 0, back.stdout + back.stderr
    assert table_of(back) == [("h1", "deployed", "v2", "v1"), ("h2", "unchanged", "v1", "v1"), ("h3", "unchanged", "v1", "v1")]
    assert json.loads(back.stdout)["tag"] == "v1" and json.loads(back.stdout)["action"] == "rollback"
    assert "rolling" in back.stderr and "back to v1" in back.stderr
    # h1 still has v1's container, retained (stopped) by the split rollout: its rollback is instant, so the pull
    # phase fetched nothing there (`pull --rollback` says why) and the rollback started that container again. h2
    # and h3, already on v1, pulled nothing.
    pulls = [line for line in back.stderr.splitlines() if "[1/6] pull" in line]
    assert len(pulls) == 1 and re.fullmatch(rf"\[h1\] \[1/6\] pull    nothing to pull: {app.name}-blue keeps v1's image "
                                            r"sha256:[0-9a-f]{12} on this host \(instant rollback\)", pulls[0]), pulls
    assert any(line.startswith("[h1] ") and "/bg/app@sha256:" in line and "needs no pull: the rollback to v1 is instant"
               in line for line in back.stderr.splitlines()), back.stderr
    assert f"instant rollback: started the retained {app.name}-blue (v1)" in back.stderr
    assert app.versions() == ["v1", "v1", "v1"]
    assert [e["action"] for e in app.journal(app.fleet.hosts[0])][-1] == "rollback"
    assert [e["tag"] for e in app.journal(app.fleet.hosts[2])] == ["v1"]  # h3 was left alone
    text = summary.read_text()
    assert "| h1 | deployed | v2 → v1 |" in text and "| h2 | unchanged | v1 → v1 |" in text

    # Nothing left to go back to that every host has: refused, nothing changed.
    again = bg(app, "rollback", app.name, hosts="h2,h3")
    assert again.returncode == 2, again.stdout + again.stderr
    assert "Nothing to roll back to" in again.stderr and app.versions() == ["v1", "v1", "v1"]


def test_fleet_freeze_stops_a_rollout_and_unlock_lifts_it(app):
    assert app.rollout("v1").returncode == 0
    frozen = bg(app, "lock", app.name, "-m", "incident 7")
    assert frozen.returncode == 0, frozen.stdout + frozen.stderr
    assert [line.split()[:2] for line in frozen.stdout.splitlines()] == [[h.name, "ok"] for h in app.fleet.hosts]
    for h in app.fleet.hosts:
        assert "incident 7" in Path(h.deploy_root, "projects", f"{app.name}.freeze").read_text()
    status = bg(app, "status", app.name)
    assert status.returncode == 0 and status.stdout.count("FROZEN") == 3, status.stdout

    refused = app.rollout("v2", "--json")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert app.versions() == ["v1", "v1", "v1"]
    assert "incident 7" in refused.stdout

    twice = bg(app, "lock", app.name, "-m", "again")
    assert twice.returncode == 2 and "already frozen" in twice.stdout and "did not succeed on h1, h2, h3" in twice.stderr
    lifted = bg(app, "unlock", app.name)
    assert lifted.returncode == 0 and lifted.stdout.count("unfrozen") == 3, lifted.stdout + lifted.stderr
    assert app.rollout("v2").returncode == 0 and app.versions() == ["v2", "v2", "v2"]


def test_fleet_history_merges_the_journals_newest_first_and_prune_runs_everywhere(app):
    assert app.rollout("v1").returncode == 0
    assert app.rollout("v2").returncode == 0
    merged = bg(app, "history", app.name, "--json")
    assert merged.returncode == 0, merged.stderr
    entries = [json.loads(line) for line in merged.stdout.splitlines()]
    assert [(e["target"], e["tag"]) for e in entries] == [
        ("h3", "v2"), ("h2", "v2"), ("h1", "v2"), ("h3", "v1"), ("h2", "v1"), ("h1", "v1")]
    times = [e["time"] for e in entries]
    assert times == sorted(times, reverse=True)
    text = bg(app, "history", app.name, "-n", "2")
    assert text.returncode == 0 and [line.split()[0] for line in text.stdout.splitlines()] == ["h3", "h2"]

    pruned = bg(app, "prune", app.name, "--dry-run")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert [line.split()[:2] for line in pruned.stdout.splitlines()] == [[h.name, "ok"] for h in app.fleet.hosts]
