"""Issue 11, on the real stack: a host set up with the guide's own commands and files (its env file, the
hand-written upstream file and server block, the sed that adds the include, the crontab line, v1 started by
the guide's deploy.sh), taken over by bluegreen under steady traffic: setup, adopt (twice), status, deploy v2,
rollback to v1, status clean; not one request fails through the whole migration."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

import stack as stacklib
from bluegreen import nginx as ngx
from test_stack_keepalive import serve_init_block
from test_stack_setup import bare  # noqa: F401  (the fixture, shared with the setup tests)

DEPLOY_SH = Path(__file__).parent / "bench" / "deploy.sh"
SEED_CRON = '0 2 * * * find /app/logs -name "app-*.log" -mtime +1 -exec gzip {} \\; -exec mv {}.gz /app/backup/ \\;'
CRON_USER = "nobody"  # whose crontab holds the guide's line for the test (the cron daemon never runs here)


def guide_server_block(project, upstream: str) -> str:
    """The guide's user-api.conf as a user would have it: a plain proxy to the upstream, no bluegreen lines."""
    return (f"server {{\n    listen 127.0.0.1:{project.nginx_port};\n    server_name _;\n\n    location / {{\n"
            f"        proxy_pass http://{upstream};\n        proxy_set_header Host $host;\n"
            f"        proxy_set_header X-Real-IP $remote_addr;\n"
            f"        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n}}\n")


class Traffic:
    """GETs through nginx, one new connection each (a client that never reuses an idle one), counted."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url, self.ok, self.failures = url, 0, []
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body = stacklib.http_get(self.url, timeout=10)
            if status == 200:
                self.ok += 1
                self.seen.add(body.strip())
            else:
                self.failures.append(f"{status} {body[:80]}")
            time.sleep(0.01)

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


@pytest.fixture
def guide_host(stack, project, bare):  # noqa: F811
    """The guide's section 3 on the bare host, then `deploy.sh PROJECT v1`; the crontab line removed after."""
    if shutil.which("crontab") is None:
        pytest.fail("crontab is missing: .ci/install-deps installs cron (the guide's hosts keep their backup there)")
    root = bare.root
    (root / "projects").mkdir(parents=True)
    (root / "nginx" / "conf.d").mkdir(parents=True)
    env = root / "projects" / f"{project.name}.env"
    # The guide's env file, with this test's ports; no log volume on the test machine.
    env.write_text(f"IMAGE={stack.image_repo}\nSPRING_PROFILES=prod\nBLUE_PORT={project.blue_port}\n"
                   f"GREEN_PORT={project.green_port}\nHEALTH_TIMEOUT=20\nLOG_DIR=\nDB_PASSWORD=guide-s3cret\n")
    upstream = root / "nginx" / "conf.d" / f"{project.name}-upstream.conf"
    upstream.write_text(f"upstream {project.name} {{ server 127.0.0.1:{project.blue_port}; }}\n")
    (bare.conf_dir / f"{project.name}.conf").write_text(guide_server_block(project, project.name))
    # Step 7, the guide's own sed.
    subprocess.run(["sed", "-i", f"/http {{/a\\    include {root}/nginx/conf.d/*.conf;", str(bare.conf)], check=True)
    bare.nginx.reload()
    subprocess.run(["crontab", "-u", CRON_USER, "-"], input=SEED_CRON + "\n", text=True, check=True)
    nginx_cmd = " ".join(shlex.quote(w) for w in bare.nginx.cmd)
    try:
        proc = subprocess.run(["bash", str(DEPLOY_SH), project.name, "v1"], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, DEPLOY_ROOT=str(root), NGINX=nginx_cmd, PUBLISH_HOST=""))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert project.get("/version") == (200, "v1")
        yield bare
    finally:
        subprocess.run(["crontab", "-u", CRON_USER, "-r"], capture_output=True)


def snapshot(*paths: Path) -> dict:
    return {str(p): (p.read_bytes(), p.stat().st_mode, p.stat().st_uid) for p in paths if p.exists()}


def test_a_guide_host_is_taken_over_without_one_failed_request(stack, project, guide_host):
    bare = guide_host
    env = bare.env()
    name = project.name
    env_file = bare.root / "projects" / f"{name}.env"
    upstream = bare.root / "nginx" / "conf.d" / f"{name}-upstream.conf"
    server = bare.conf_dir / f"{name}.conf"
    files = (env_file, upstream, server, bare.conf)
    assert stacklib.docker("inspect", "--format", "{{json .Config.Labels}}", f"{name}-blue").stdout.strip() in ("null", "{}")

    with Traffic(project.url("/version")) as traffic:
        # init refuses a guide host and points at adopt.
        init = project.run("init", name, "--image", stack.image_repo, "--force", env=env)
        assert init.returncode == 2 and f"adopt {name}" in init.stderr, init.stdout + init.stderr

        # setup: the include is there already (the guide's sed), so nginx.conf is untouched; it names the crontab line.
        conf_before = bare.conf.read_bytes()
        setup = project.run(*bare.setup_args("--owner", CRON_USER), env=env, check=True)
        assert bare.conf.read_bytes() == conf_before
        assert f"{CRON_USER}'s crontab still has the seed's line" in setup.stderr, setup.stderr
        assert f"Next: {bare.bin / 'bluegreen'} adopt {name} --dry-run" in setup.stdout, setup.stdout

        # doctor says what adoption would change.
        doctor = project.run("doctor", name, env=env)
        assert re.search(r"WARN\s+adoption\s+set up by the guide's deploy.sh; `adopt --force` would: upstream", doctor.stdout), doctor.stdout

        before = snapshot(*files)
        dry = project.run("adopt", name, "--force", "--dry-run", env=env, check=True)
        assert "would    " in dry.stdout and "nothing was changed" in dry.stdout, dry.stdout
        assert snapshot(*files) == before

        first = project.run("adopt", name, "--force", env=env, check=True)
        out = first.stdout
        assert f"upstream {name} as bluegreen's managed file, still routing to 127.0.0.1:{project.blue_port}" in out, out
        assert f"seen through nginx: it routes {name} to 127.0.0.1:{project.blue_port}, as before" in out, out
        assert f"{name}-blue ({stack.image_repo}:v1) was not started by bluegreen" in first.stderr
        managed = ngx.parse_upstream(upstream.read_text())
        assert (managed.name, managed.port, len(managed.token)) == (name, project.blue_port, 32)
        assert ngx.add_header_line(name) in server.read_text() and "proxy_http_version 1.1;" in server.read_text()
        text = env_file.read_text()
        assert text.startswith(before[str(env_file)][0].decode()) and "#PULL=always\n" in text
        assert "guide-s3cret" not in out + first.stderr
        backups = bare.root / "adopt-backup" / name
        assert (backups / "upstream.conf").read_bytes() == before[str(upstream)][0]
        assert sorted(p.name for p in backups.iterdir()) == ["server-" + server.name, "upstream.conf"]  # no env copy
        assert (backups / ("server-" + server.name)).read_bytes() == before[str(server)][0]

        # Twice: nothing changes.
        settled = snapshot(*files, *backups.iterdir())
        again = project.run("adopt", name, "--force", env=env, check=True)
        assert f"Nothing to change: {name} is adopted already." in again.stdout, again.stdout
        assert snapshot(*files, *backups.iterdir()) == settled
        doctor = project.run("doctor", name, env=env)
        assert re.search(r"WARN\s+adoption\s+\S+ is adopted, but: \S+-blue publishes its port on every address",
                         doctor.stdout), doctor.stdout

        status = project.run("status", name, env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert re.search(rf"blue\s.*v1", status.stdout), status.stdout

        deploy = project.run(name, "v2", env=env, check=True)
        assert f"(was v1 in {name}-blue)" in deploy.stderr + deploy.stdout, deploy.stderr
        assert project.get("/version") == (200, "v2")
        state = stacklib.docker("inspect", "--format", "{{.State.Status}}", f"{name}-blue").stdout.strip()
        assert state == "exited"  # retired as usual (kept, stopped)

        rollback = project.run("rollback", name, env=env, check=True)
        assert "to v1" in rollback.stderr + rollback.stdout, rollback.stderr
        assert project.get("/version") == (200, "v1")
        time.sleep(1.0)

    final = project.run("status", name, env=env)
    assert final.returncode == 0 and "verdict     OK" in final.stdout and "no drift:" in final.stdout, final.stdout
    assert "0.0.0.0" not in final.stdout + final.stderr  # the deploy.sh container is gone from the route
    assert traffic.failures == [], f"{len(traffic.failures)} failed of {traffic.ok + len(traffic.failures)}: {traffic.failures[:5]}"
    assert traffic.ok > 200 and traffic.seen == {"v1", "v2"}, (traffic.ok, traffic.seen)
    assert pwd.getpwnam(CRON_USER)


def test_adopt_on_a_project_bluegreen_manages_changes_nothing(project):
    """As init and deploys leave a project (init's server block): adopt, with --force even, changes nothing."""
    project.write_env()
    project.run(project.name, "v1", check=True)
    serve_init_block(project)
    files = [Path(project.upstream_file), Path(project.stack.projects_dir) / f"{project.name}.env",
             Path(project.stack.nginx.site_path(project.name))]
    before = snapshot(*files)
    proc = project.run("adopt", project.name, "--force", check=True)
    assert f"Nothing to change: {project.name} is adopted already." in proc.stdout, proc.stdout
    assert "is bluegreen's already" in proc.stdout and snapshot(*files) == before


def test_adopt_puts_every_file_back_when_nginx_refuses_them(project, tmp_path):
    """A guide project on the session's nginx; an nginx that refuses the adopted files. FAKE BINARY, on purpose:
    this nginx 1.22 accepts everything adopt writes, so a wrapper makes `nginx -t` refuse once the route line is
    in the server block (as an nginx without `keepalive_timeout` in upstreams, before 1.15.3, would refuse)."""
    project.write_env()
    upstream = Path(project.upstream_file)
    upstream.write_text(f"upstream {project.name} {{ server 127.0.0.1:{project.blue_port}; }}\n")
    Path(project.stack.projects_dir, f"{project.name}.active").write_text("blue\n")
    stacklib.docker("run", "-d", "--name", f"{project.name}-blue", "-p", f"127.0.0.1:{project.blue_port}:8080",
                    project.stack.images["v1"])
    project.serve(probe=False)
    deadline = time.monotonic() + 20
    while project.get("/version") != (200, "v1"):
        assert time.monotonic() < deadline, project.get("/version")
        time.sleep(0.2)
    site = Path(project.stack.nginx.site_path(project.name))
    wrapper = tmp_path / "nginx"
    wrapper.write_text("#!/bin/sh\n"
                       "for a in \"$@\"; do [ \"$a\" = -t ] && grep -q X-Bluegreen-Upstream " + shlex.quote(str(site)) +
                       " && { echo 'nginx: [emerg] unknown directive \"keepalive_timeout\" in " + str(upstream) +
                       ":6' >&2; exit 1; }; done\nexec " + " ".join(shlex.quote(w) for w in project.stack.nginx.cmd) +
                       " \"$@\"\n")
    wrapper.chmod(0o755)
    files = [upstream, Path(project.stack.projects_dir) / f"{project.name}.env", site]
    before = snapshot(*files)
    proc = project.run("adopt", project.name, "--force", env={"BLUEGREEN_NGINX": str(wrapper)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'unknown directive "keepalive_timeout"' in proc.stderr and "put back as it was" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(*files) == before
    backups = Path(project.stack.root) / "adopt-backup" / project.name
    assert not backups.exists() or list(backups.iterdir()) == []
    assert project.get("/version") == (200, "v1")
