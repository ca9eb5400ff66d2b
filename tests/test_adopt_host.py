"""`adopt` on a host in a temp directory: the deploy root, a private nginx prefix whose configuration real nginx
checks (`nginx -T`, `nginx -t`; no nginx master runs: the reload is recorded, and the master's pid file names a
shell whose one child, started after the files were written, stands for its worker), docker answered by a fake (deploy.sh's container). The doing side: files under the deploy root that
are not what they should be, modes and owners, the server block behind a symlink, an interrupt half-way, a
file changed since nginx loaded it, what reaches the output."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from bluegreen import adopt, cli, health
from bluegreen import nginx as ngx
from bluegreen.config import load_settings
from bluegreen.errors import BluegreenError, Interrupted
from bluegreen.runner import Result, Runner, SubprocessRunner

SECRET = "s3cret-guide-password"
GUIDE_SERVER = """\
server {
    listen 127.0.0.1:1;
    server_name _;

    location / {
        proxy_pass http://user-api;
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
    }
}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found is None:
        pytest.fail("nginx is missing: `bash .ci/install-deps` installs it (these tests check adopt's files with it)")
    return found


class HostRunner(Runner):
    """Real nginx -T/-t; the reload recorded (and `on_reload` run); docker answered with `containers`."""

    def __init__(self, containers: list, on_reload=None) -> None:
        self.real = SubprocessRunner()
        self.containers = containers
        self.on_reload = on_reload
        self.calls: list[list[str]] = []

    def run(self, argv, *, check=True, timeout=None, mutates=True, env=None, input=None, new_session=False,
            output_limit=None):
        argv = [str(a) for a in argv]
        self.calls.append(argv)
        if argv[0] == "docker":
            return Result(tuple(argv), 0, json.dumps(self.containers), "")
        if argv[-2:] == ["-s", "reload"]:
            if self.on_reload is not None:
                self.on_reload()
            return Result(tuple(argv), 0, "", "")
        return self.real.run(argv, check=check, timeout=timeout, mutates=mutates)

    def reloads(self) -> int:
        return sum(1 for a in self.calls if a[-2:] == ["-s", "reload"])


def deploy_sh_container(port: int = 8081) -> dict:
    return {"Name": "/user-api-blue", "Id": "abc", "State": {"Status": "running", "ExitCode": 0},
            "Config": {"Image": "ghcr.io/acme/user-api:v1", "Labels": {}},
            "NetworkSettings": {"Ports": {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]}}}


class Host:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "deploy"
        self.prefix = base / "nginx"
        self.env_file = self.root / "projects" / "user-api.env"
        self.upstream = self.root / "nginx" / "conf.d" / "user-api-upstream.conf"
        self.sites = self.prefix / "sites-enabled"
        self.server = self.sites / "user-api.conf"
        for d in (self.root / "projects", self.root / "nginx" / "conf.d", self.sites, self.prefix / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        self.env_file.write_text(f"IMAGE=ghcr.io/acme/user-api\nSPRING_PROFILES=prod\nDB_PASSWORD={SECRET}\n")
        self.env_file.chmod(0o600)
        self.upstream.write_text("upstream user-api { server 127.0.0.1:8081; }\n")
        self.server.write_text(GUIDE_SERVER)
        tmp = self.prefix / "tmp"
        (self.prefix / "nginx.conf").write_text(
            f"pid {self.prefix}/nginx.pid;\nerror_log {self.prefix}/error.log;\nevents {{}}\nhttp {{\n"
            f"    access_log off;\n    client_body_temp_path {tmp}/body;\n    proxy_temp_path {tmp}/proxy;\n"
            f"    fastcgi_temp_path {tmp}/fastcgi;\n    uwsgi_temp_path {tmp}/uwsgi;\n    scgi_temp_path {tmp}/scgi;\n"
            f"    include {self.root}/nginx/conf.d/*.conf;\n    include {self.sites}/*;\n}}\n")
        # The "master": a shell with one child, started now (after the files): nginx loaded them at this moment.
        self.master = subprocess.Popen(["sh", "-c", "sleep 600 & wait"], start_new_session=True)
        self.pid_file = base / "master.pid"
        self.pid_file.write_text(f"{self.master.pid}\n")
        nginx = nginx_binary()
        self.environ = {
            "BLUEGREEN_NGINX": f"{nginx} -p {self.prefix} -c {self.prefix / 'nginx.conf'} -e {self.prefix / 'error.log'}",
            "BLUEGREEN_NGINX_PID_FILE": str(self.pid_file), "BLUEGREEN_DOCKER": "docker",
        }
        self.settings = load_settings(str(self.root), self.environ)

    def adopt(self, *, force=True, dry_run=False, runner=None, probe=None):
        """(exit code, stdout, stderr) as the CLI gives them (errors turned into messages and codes)."""
        runner = runner or HostRunner([deploy_sh_container()])
        out, err = io.StringIO(), io.StringIO()
        try:
            code = adopt.adopt_project(settings=self.settings, runner=runner, project="user-api", force=force,
                                       dry_run=dry_run, environ=self.environ, stdout=out, stderr=err,
                                       probe=probe or no_route)
        except BluegreenError as exc:
            err.write(f"bluegreen: {exc.message}\n")
            code = exc.exit_code
        except Interrupted as exc:  # what cli.main says for any command that does not say more itself
            err.write(f"bluegreen: interrupted by {exc.signame}; the lines above say what was done before it.\n")
            code = 1
        return code, out.getvalue(), err.getvalue()

    def snapshot(self) -> dict:
        out = {}
        for p in (self.env_file, self.upstream, self.server):
            st = os.lstat(p)
            out[str(p)] = (p.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, stat.S_IFMT(st.st_mode))
        return out


def no_route(url, *, timeout, host="", headers=None):
    return health.Probe(None, "connection refused")


@pytest.fixture
def host(tmp_path, monkeypatch):
    monkeypatch.setattr(adopt, "VERIFY_SECONDS", 0.0)  # the fake probe never sees the route: do not wait for it
    made = Host(tmp_path)
    deadline = time.monotonic() + 5
    while not ngx.children(made.master.pid) and time.monotonic() < deadline:  # its worker has started
        time.sleep(0.01)
    try:
        yield made
    finally:
        os.killpg(made.master.pid, signal.SIGKILL)
        made.master.wait()


def test_the_harness_adopts_the_guide_host(host):
    code, out, err = host.adopt()
    assert code == 0, out + err
    assert ngx.add_header_line("user-api") in host.server.read_text()
    assert ngx.parse_upstream(host.upstream.read_text()).token
    assert SECRET not in out + err


# -- the env file -------------------------------------------------------------------------------------------

def test_the_env_file_keeps_its_own_mode_and_owner(host):
    """The env file's mode and owner are its own, not those of the server block adopt also edits."""
    host.server.chmod(0o644)
    host.env_file.chmod(0o600)
    if os.geteuid() == 0:
        for path in (host.root, host.env_file.parent, host.env_file):  # the deploy user's, as setup makes them
            os.chown(path, 1234, 1234)
    code, out, err = host.adopt()
    assert code == 0, out + err
    st = os.stat(host.env_file)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (1234, 1234)


# -- a file changed since nginx loaded it -------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["upstream", "server"])
def test_a_file_changed_after_nginx_loaded_it_is_not_put_live_by_adopt(host, which):
    """deploy.sh's sed ran but its reload did not (or the block was edited and not reloaded): nginx routes by
    what it loaded, so the file says nothing about where traffic goes now, and adopt's reload would put the
    change live. adopt refuses, changing nothing; --dry-run says the same."""
    path = host.upstream if which == "upstream" else host.server
    if which == "upstream":
        path.write_text("upstream user-api { server 127.0.0.1:8082; }\n")  # green: not started yet
    later = os.stat(path).st_mtime + 30
    os.utime(path, (later, later))
    before = host.snapshot()
    runner = HostRunner([deploy_sh_container()])
    code, out, err = host.adopt(runner=runner)
    assert code == 2, out + err
    assert f"{path} changed" in err and "after nginx last loaded" in err and "Nothing was changed" in err, err
    assert "nginx -s reload" in err and "Traceback" not in err
    assert host.snapshot() == before and runner.reloads() == 0
    code, out, err = host.adopt(dry_run=True)
    assert code == 0 and f"{path} changed" in err, out + err


# -- the upstream file --------------------------------------------------------------------------------------------

def test_what_else_the_hand_written_upstream_file_holds_is_never_dropped(host):
    """The managed file replaces the whole upstream file: a server block of another site kept there, a second
    upstream or a `keepalive 32;` would silently vanish (nginx -t passes: the other site just stops existing).
    adopt refuses, naming each line and the setting that keeps it; nothing changes."""
    host.upstream.write_text("upstream user-api {\n    server 127.0.0.1:8081;\n    keepalive 32;\n}\n"
                             "upstream legacy { server 127.0.0.1:9000; }\n"
                             "server {\n    listen 127.0.0.1:2;\n    location / { proxy_pass http://legacy; }\n}\n")
    before = host.snapshot()
    runner = HostRunner([deploy_sh_container()])
    code, out, err = host.adopt(runner=runner)
    assert code == 2, out + err
    assert "`keepalive 32;`" in err and "UPSTREAM_KEEPALIVE=32" in err, err
    assert "`upstream legacy { ... }`" in err and "`server { ... }`" in err, err
    assert "Nothing was changed" in err and host.snapshot() == before and runner.reloads() == 0
    # With the setting in the env file and the rest moved to a file of its own, adopt goes ahead.
    host.env_file.write_text(host.env_file.read_text() + "UPSTREAM_KEEPALIVE=32\n")
    host.upstream.write_text("upstream user-api {\n    server 127.0.0.1:8081;\n    keepalive 32;\n}\n")
    code, out, err = host.adopt()
    assert code == 0, out + err
    assert "keepalive 32;" in host.upstream.read_text()


# -- an interrupt half-way ----------------------------------------------------------------------------------------

class InterruptingRunner(HostRunner):
    """SIGTERM (as cli's handler raises it) arrives while `argv` runs, after it did its work."""

    def __init__(self, when: list[str]) -> None:
        super().__init__([deploy_sh_container()])
        self.when = when
        self.fired = False

    def run(self, argv, **kwargs):
        result = super().run(argv, **kwargs)
        if not self.fired and [str(a) for a in argv][-len(self.when):] == self.when:
            self.fired = True
            raise Interrupted("SIGTERM")
        return result


@pytest.mark.parametrize("when,reloads", [(["-t"], 0), (["-s", "reload"], 2)])
def test_an_interrupt_while_adopt_writes_puts_every_file_back_and_says_so(host, when, reloads):
    """SIGTERM during `nginx -t`: every file back, no reload. During the reload (nginx may have taken the signal
    and loaded the adopted files): every file back, and nginx reloaded once more, with them."""
    before = host.snapshot()
    runner = InterruptingRunner(when)
    code, out, err = host.adopt(runner=runner)
    assert code == 1, out + err
    assert host.snapshot() == before
    assert not (host.root / "adopt-backup" / "user-api").exists() or not any((host.root / "adopt-backup" / "user-api").iterdir())
    assert runner.reloads() == reloads
    assert "interrupted (SIGTERM)" in err and "put back as it was" in err and "Run adopt again" in err, err
    if reloads:
        assert "reloaded nginx again with them" in err, err
    else:
        assert "nginx was not reloaded" in err, err
    assert err.strip().splitlines()[-1].startswith("bluegreen: ") and err.count("bluegreen: ") == 1, err


def test_a_file_that_cannot_be_put_back_needs_attention(host):
    """nginx -t refuses, and putting the server block back fails (its directory went away meanwhile): exit 4,
    naming what failed, as docs/exit-codes.md says of a failed undo."""

    class Refusing(HostRunner):
        def run(self, argv, **kwargs):
            if [str(a) for a in argv][-1:] == ["-t"]:
                host.sites.rename(host.prefix / "moved")
                return super().run(["false"], **kwargs)
            return super().run(argv, **kwargs)

    runner = Refusing([deploy_sh_container()])
    code, out, err = host.adopt(runner=runner)
    assert code == 4, out + err
    assert "Putting the files back failed too" in err and str(host.server) in err, err
    assert runner.reloads() == 0


# -- what is planted under the deploy root ------------------------------------------------------------------------

def plant(path: Path, kind: str, target: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "symlink":
        path.symlink_to(target)
    else:
        os.mkfifo(path)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
@pytest.mark.parametrize("which", ["env", "upstream"])
def test_a_planted_env_or_upstream_file_is_refused_without_blocking(host, tmp_path, kind, which):
    victim = tmp_path / "victim"
    victim.write_text("upstream user-api { server 127.0.0.1:8081; }\n" if which == "upstream" else
                      "IMAGE=ghcr.io/acme/user-api\n")
    path = host.env_file if which == "env" else host.upstream
    plant(path, kind, victim)
    code, out, err = host.adopt()
    assert code == 2, out + err
    assert str(path) in err and ("symlink" in err or "FIFO" in err) and "Traceback" not in err, err
    assert victim.read_text().startswith(("upstream", "IMAGE")) and len(victim.read_text().splitlines()) == 1
    assert host.server.read_text() == GUIDE_SERVER


@pytest.mark.parametrize("planted", ["dir", "file"])
def test_a_planted_backup_is_refused_before_anything_is_written(host, tmp_path, planted):
    """ROOT/adopt-backup (or the copy in it) planted as a symlink: refused (exit 2) before adopt writes
    anything, never written through, never taken for the copy of the original."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "upstream.conf").write_text("root's\n")
    if planted == "dir":
        (host.root / "adopt-backup").symlink_to(victim)
    else:
        (host.root / "adopt-backup" / "user-api").mkdir(parents=True)
        (host.root / "adopt-backup" / "user-api" / "upstream.conf").symlink_to(victim / "upstream.conf")
    before = host.snapshot()
    runner = HostRunner([deploy_sh_container()])
    code, out, err = host.adopt(runner=runner)
    assert code == 2, out + err
    assert "adopt-backup" in err and "symlink" in err and "Nothing was changed" in err.replace("nothing was changed", "Nothing was changed"), err
    assert host.snapshot() == before and runner.reloads() == 0
    assert sorted(p.name for p in victim.iterdir()) == ["upstream.conf"] and (victim / "upstream.conf").read_text() == "root's\n"


def test_a_server_block_behind_a_symlink_is_edited_where_it_is_and_the_link_stays(host):
    """Debian: sites-enabled/X -> ../sites-available/X. The file is edited; the link stays a link."""
    available = host.prefix / "sites-available"
    available.mkdir()
    host.server.rename(available / "user-api.conf")
    host.server.symlink_to(Path("..") / "sites-available" / "user-api.conf")
    (available / "user-api.conf").chmod(0o640)
    code, out, err = host.adopt()
    assert code == 0, out + err
    assert host.server.is_symlink() and os.readlink(host.server) == "../sites-available/user-api.conf"
    assert ngx.add_header_line("user-api") in (available / "user-api.conf").read_text()
    assert stat.S_IMODE(os.stat(available / "user-api.conf").st_mode) == 0o640
    assert (host.root / "adopt-backup" / "user-api" / "server-user-api.conf").read_text() == GUIDE_SERVER


def test_a_server_block_under_the_deploy_root_is_never_followed_through_a_symlink(host, tmp_path):
    """A server block nginx loads from ROOT/nginx/conf.d, planted there as a symlink to a root-owned file:
    adopt neither reads nor writes through it (every byte under the deploy root is untrusted)."""
    victim = tmp_path / "root-only.conf"
    victim.write_text(GUIDE_SERVER)
    host.server.unlink()
    (host.root / "nginx" / "conf.d" / "user-api-server.conf").symlink_to(victim)
    runner = HostRunner([deploy_sh_container()])
    code, out, err = host.adopt(runner=runner)
    assert victim.read_text() == GUIDE_SERVER, out + err
    assert code == 2 and "user-api-server.conf is a symlink" in err, out + err
    assert runner.reloads() == 0


def test_bytes_that_are_not_utf8_survive_the_backup_and_the_undo(host):
    raw = b"# caf\xe9 (latin-1)\nupstream user-api { server 127.0.0.1:8081; }\n"
    host.upstream.write_bytes(raw)

    class Refusing(HostRunner):
        def run(self, argv, **kwargs):
            if [str(a) for a in argv][-1:] == ["-t"]:
                return super().run(["false"], **kwargs)
            return super().run(argv, **kwargs)

    code, out, err = host.adopt(runner=Refusing([deploy_sh_container()]))
    assert code == 1 and "put back as it was" in err, out + err
    assert host.upstream.read_bytes() == raw
    code, out, err = host.adopt()
    assert code == 0, out + err
    assert (host.root / "adopt-backup" / "user-api" / "upstream.conf").read_bytes() == raw


def test_a_crlf_env_file_keeps_every_byte_and_still_loads(host):
    original = f"IMAGE=ghcr.io/acme/user-api\r\nDB_PASSWORD={SECRET}\r\n".encode()
    host.env_file.write_bytes(original)
    code, out, err = host.adopt()
    assert code == 0, out + err
    assert host.env_file.read_bytes().startswith(original)
    assert SECRET not in out + err
    from bluegreen.config import load_project
    assert load_project(host.settings, "user-api").nginx_url == "http://127.0.0.1:1"


def test_two_server_blocks_named_alike_get_a_copy_each(host):
    other = host.prefix / "sites-enabled-2"
    other.mkdir()
    second = GUIDE_SERVER.replace("127.0.0.1:1;", "127.0.0.1:2;")
    (other / "user-api.conf").write_text(second)
    conf = host.prefix / "nginx.conf"
    conf.write_text(conf.read_text().replace("    include " + str(host.sites), f"    include {other}/*;\n    include {host.sites}"))
    code, out, err = host.adopt()
    assert code == 0, out + err
    copies = {p.read_text() for p in (host.root / "adopt-backup" / "user-api").iterdir() if p.name.startswith("server-")}
    assert copies == {GUIDE_SERVER, second}


def test_a_dangling_symlink_for_the_env_file_is_named_as_such(host, tmp_path):
    host.env_file.unlink()
    host.env_file.symlink_to(tmp_path / "nowhere")
    code, out, err = host.adopt()
    assert code == 2 and "is a symlink" in err and "does not exist" not in err, err


@pytest.mark.skipif(os.geteuid() != 0, reason="the owner check runs as root only")
def test_a_strangers_projects_directory_is_named_for_what_it_is(host):
    """Refused on the way to the lock file: the advice is about the directory, not `rm` it as a planted lock."""
    os.chown(host.env_file.parent, 4321, 4321)
    code, out, err = host.adopt()
    assert code == 2, out + err
    assert "owned by uid 4321" in err and f"rm {host.env_file.parent}`" not in err and "deploy lock" not in err, err


def test_a_forged_file_header_in_nginx_T_output_edits_nothing_nginx_does_not_load(host, tmp_path):
    """`nginx -T` prints each file after a `# configuration file PATH:` line; a file below the deploy root can
    hold such a line itself. adopt edits only a file whose text on disk is what nginx -T showed for it."""
    unloaded = tmp_path / "not-loaded.conf"  # root's, with a server block, never included by nginx
    unloaded.write_text(GUIDE_SERVER)
    (host.root / "nginx" / "conf.d" / "zz-forged.conf").write_text(
        f"# configuration file {unloaded}:\n" + GUIDE_SERVER.replace("127.0.0.1:1;", "127.0.0.1:3;"))
    code, out, err = host.adopt()
    assert code == 0, out + err
    assert unloaded.read_text() == GUIDE_SERVER
    assert f"{unloaded}: " in out and "differs from the file on disk" in out, out
    assert ngx.add_header_line("user-api") in host.server.read_text()


def test_a_file_adopt_may_not_write_says_what_to_do(host, monkeypatch):
    """Run as the deploy user, --force cannot write root's server block: every file is put back, and the
    message says what happened, what serves and what to do (one paragraph)."""
    real = adopt.safefs.atomic_write

    def refusing(path, data, **kwargs):
        if Path(path) == host.server:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, data, **kwargs)

    monkeypatch.setattr(adopt.safefs, "atomic_write", refusing)
    before = host.snapshot()
    runner = HostRunner([deploy_sh_container()])
    code, out, err = host.adopt(runner=runner)
    assert code == 1, out + err
    assert host.snapshot() == before and runner.reloads() == 0
    message = err.strip().splitlines()[-1]
    assert f"Permission denied: {host.server}." in message and "put back as it was" in message, err
    assert "sudo" in message and "run adopt again" in message, err


def test_a_failed_reload_is_not_called_a_rejected_configuration(host):
    class NoReload(HostRunner):
        def run(self, argv, **kwargs):
            if [str(a) for a in argv][-2:] == ["-s", "reload"]:
                self.calls.append([str(a) for a in argv])
                from bluegreen.errors import CommandError
                raise CommandError([str(a) for a in argv], 1, "", 'nginx: [error] invalid PID number "" in "/run/nginx.pid"')
            return super().run(argv, **kwargs)

    before = host.snapshot()
    code, out, err = host.adopt(runner=NoReload([deploy_sh_container()]))
    assert code == 1 and host.snapshot() == before, out + err
    assert "rejected" not in err and "nginx -s reload" in err and "invalid PID number" in err, err
    assert "put back as it was" in err and "nginx -t passed" in err, err


def test_a_wrong_nginx_url_costs_seconds_and_is_said(host, monkeypatch):
    """NGINX_URL reaching nothing (a black-holed address): the probe through nginx gives up within its deadline,
    adopt is done (the files are right, nginx reloaded) and says that it could not see the route, and where."""


    monkeypatch.setattr(adopt, "VERIFY_SECONDS", 1.0)
    host.env_file.write_text(host.env_file.read_text() + "NGINX_URL=http://192.0.2.1:80\n")
    started = time.monotonic()
    code, out, err = host.adopt(probe=health.http_probe)
    assert time.monotonic() - started < 15
    assert code == 0, out + err
    assert "the route could not be seen through nginx at http://192.0.2.1:80" in out, out
    assert SECRET not in out + err


def test_a_proxy_pass_in_a_snippet_included_into_the_server_block_is_named(host):
    """`location / { proxy_pass ...; }` in a snippet that the server block includes: adopt does not edit what
    it cannot place, and says where the proxy_pass is (not that no server block proxies to the upstream)."""
    snippet = host.prefix / "app-locations.conf"
    snippet.write_text("location / {\n    proxy_pass http://user-api;\n}\n")
    host.server.write_text(f"server {{\n    listen 127.0.0.1:1;\n    include {snippet};\n}}\n")
    code, out, err = host.adopt()
    assert code == 0, out + err
    assert f"{snippet}: " in out and "no server block that nginx loads" not in out, out
    assert snippet.read_text() == "location / {\n    proxy_pass http://user-api;\n}\n"


def test_adopt_while_a_deploy_holds_the_lock_says_what_adopt_can_do(host):
    from bluegreen.lock import Holder, project_lock

    deploying = Holder(pid=os.getpid(), user="ci", host="h", tag="v2", since="2026-01-01T00:00:00Z")
    with project_lock(host.settings.lock_file("user-api"), deploying, root=host.root):
        code, out, err = host.adopt()
    assert code == 3, out + err
    assert "--wait" not in err and "run adopt again" in err and "Nothing was changed" in err, err


def test_a_pid_file_that_is_a_fifo_never_blocks(tmp_path):
    """The master's pid file is named by the `pid` line nginx -T shows (the first in the dump, wherever it is):
    a FIFO there must not hang adopt, deploy or status."""
    import threading

    fifo = tmp_path / "nginx.pid"
    os.mkfifo(fifo)
    found = []
    reader = threading.Thread(target=lambda: found.append(ngx.read_pid(fifo)), daemon=True)
    reader.start()
    reader.join(5)
    blocked = reader.is_alive()
    if blocked:  # let the stuck open return
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        reader.join(5)
    assert not blocked and found == [None]


def test_done_names_the_copies_only_when_there_are_copies(host):
    """Upstream already managed, deploy.sh's container still serving, the env file lacking settings: adopt
    appends to the env file only, which it never copies; it does not point at copies that do not exist."""
    host.upstream.write_text(ngx.render_upstream(name="user-api", port=8081, project="user-api", colour="blue",
                                                 tag="v1", token=ngx.new_token()))
    later = time.time() - 60
    os.utime(host.upstream, (later, later))
    code, out, err = host.adopt(force=False)
    assert code == 0, out + err
    assert "changed  user-api.env" in out and "adopt-backup" not in out, out
    assert not (host.root / "adopt-backup").exists()


def test_an_env_file_that_is_not_utf8_is_refused_without_showing_it(host):
    host.env_file.write_bytes(b"IMAGE=ghcr.io/acme/user-api\nDB_PASSWORD=caf\xe9-" + SECRET.encode() + b"\n")
    before = host.snapshot()
    code, out, err = host.adopt()
    assert code == 2 and "not UTF-8" in err and ":2:" in err, out + err
    assert SECRET not in out + err and host.snapshot() == before
