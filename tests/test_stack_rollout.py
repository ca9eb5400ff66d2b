"""`bluegreen rollout` on real hosts: three network namespaces with their own dockerd, sshd and nginx behind
haproxy (tests/fleet.py), reached with the system ssh client and strict host keys."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from bluegreen import init
from bluegreen import nginx as ngx
from fleet import fleet_fixture  # noqa: F401  (the module-scoped `fleet` fixture)

HOOK = str(Path(__file__).parent / "bench" / "haproxy_hook.py")
BLUE, GREEN = 20101, 20102


class App:
    """One project on every host of the fleet, configured as `init` would (env file, upstream, server block)."""

    def __init__(self, fleet, stack) -> None:
        self.fleet, self.stack = fleet, stack
        self.name = "fa" + secrets.token_hex(3)
        for h in fleet.hosts:
            projects = Path(h.deploy_root, "projects")
            (projects / f"{self.name}.env").write_text(
                f"IMAGE={fleet.image_repo}\nBLUE_PORT={BLUE}\nGREEN_PORT={GREEN}\nHEALTH_TIMEOUT=20\n"
                f"NGINX_URL=http://{h.addr}\nSTOP_TIMEOUT=2\nDB_PASSWORD=fleet-s3cret\n")
            # init's placeholder upstream (routes nowhere yet, defines the route variable)
            Path(h.conf_d, f"{self.name}-upstream.conf").write_text(init.render_placeholder_upstream(
                project=self.name, upstream=self.name, blue_port=BLUE, token=ngx.new_token()))
            h.proxy_app(self.name, extra=f"add_header X-Bluegreen-Upstream $bluegreen_route_{self.name} always;")

    def rollout(self, tag: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        hosts = ",".join(h.name for h in self.fleet.hosts)
        argv = [sys.executable, self.stack.pyz, "rollout", self.name, tag, "--hosts", hosts,
                "--ssh-config", self.fleet.ssh_config, *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)

    def versions(self) -> list:
        return [h.get("/version")[1] if h.get("/version")[0] == 200 else None for h in self.fleet.hosts]

    def journal(self, h) -> list:
        path = Path(h.deploy_root, "projects", f"{self.name}.journal")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def remove(self) -> None:
        for h in self.fleet.hosts:
            h.docker("rm", "-f", f"{self.name}-blue", f"{self.name}-green", check=False)
            h.remove_site("default", reload=False)
            for f in Path(h.deploy_root, "projects").glob(f"{self.name}.*"):
                f.unlink()
            Path(h.conf_d, f"{self.name}-upstream.conf").unlink(missing_ok=True)
            h.nginx.reload()


@pytest.fixture
def app(fleet, stack):
    a = App(fleet, stack)
    try:
        yield a
    finally:
        a.remove()


def test_a_three_host_rollout_deploys_everywhere_between_the_load_balancer_hooks(app):
    first = app.rollout("v1", "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    assert app.versions() == ["v1", "v1", "v1"]
    # The tool itself went to every host; the secret never reached the controller's output.
    for h in app.fleet.hosts:
        assert Path(h.deploy_root, "bluegreen.pyz").read_bytes() == Path(app.stack.pyz).read_bytes()
    assert "fleet-s3cret" not in first.stdout + first.stderr
    sock = app.fleet.lb.socket
    second = app.rollout("v2", "--before-host", f"{sys.executable} {HOOK} {sock} app out",
                         "--after-host", f"{sys.executable} {HOOK} {sock} app in", "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    assert app.versions() == ["v2", "v2", "v2"]
    table = json.loads(second.stdout)
    assert [(r["target"], r["result"], r["before"], r["after"]) for r in table["hosts"]] == [
        (h.name, "deployed", "v1", "v2") for h in app.fleet.hosts]
    for h in app.fleet.hosts:
        assert [e["tag"] for e in app.journal(h) if e["result"] == "deployed"] == ["v1", "v2"]
        assert app.fleet.lb.status(h).startswith("UP")
    # Live output, each line with its host; the hooks ran around each host, in order.
    err = second.stderr
    assert "[h1] [1/6] pull" in err or "[h1] " in err
    order = [err.index(f"[{h.name}] before-host") for h in app.fleet.hosts]
    assert order == sorted(order) and all(f"[{h.name}] after-host" in err for h in app.fleet.hosts)
