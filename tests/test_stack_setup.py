"""`bluegreen setup` (and init) on a bare host: a private nginx whose nginx.conf lacks the include, an
empty root, a private cron directory. Pure tests of the plan first, then the real thing."""

from __future__ import annotations

import os
import pwd
import shlex
import sys
from pathlib import Path

import pytest

import stack as stacklib
from bluegreen import setup
from bluegreen.config import load_settings
from bluegreen.errors import BluegreenError, UsageError
from bluegreen.host import add_include, includes_dir

OWNER = setup.Owner("ec2-user", 1000, 1000)


# -- pure ---------------------------------------------------------------------------------------------------

def test_include_detection_ignores_comments_and_other_directories():
    assert includes_dir("http {\n    include /opt/deploy/nginx/conf.d/*.conf;\n}", "/opt/deploy/nginx/conf.d")
    assert includes_dir('http { include "/opt/deploy/nginx/conf.d/*-upstream.conf"; }', "/opt/deploy/nginx/conf.d/")
    assert not includes_dir("http {\n  # include /opt/deploy/nginx/conf.d/*.conf;\n}", "/opt/deploy/nginx/conf.d")
    assert not includes_dir("include /opt/deploy/nginx/conf.d.old/*.conf;", "/opt/deploy/nginx/conf.d")


def test_include_goes_first_into_the_http_block_once():
    conf = "user nginx;\n# http { in a comment\nhttp {\n    sendfile on;\n}\n"
    out = add_include(conf, "include /x/*.conf;", "nginx.conf")
    assert out == "user nginx;\n# http { in a comment\nhttp {\n    include /x/*.conf;\n    sendfile on;\n}\n"
    with pytest.raises(BluegreenError, match="no `http {` block"):
        add_include("events {}\n", "include /x/*.conf;", "nginx.conf")


def test_schedule_is_cron_where_the_host_has_it_else_a_systemd_timer():
    assert setup.choose_schedule("auto", cron_dir_exists=True, systemd_running=True) == "cron"
    assert setup.choose_schedule("auto", cron_dir_exists=False, systemd_running=True) == "systemd"
    assert setup.choose_schedule("systemd", cron_dir_exists=True, systemd_running=True) == "systemd"
    assert setup.choose_schedule("none", cron_dir_exists=False, systemd_running=False) == "none"
    for requested in ("auto", "systemd"):
        with pytest.raises(UsageError, match="cronie"):
            setup.choose_schedule(requested, cron_dir_exists=False, systemd_running=False)


def _facts(**kw) -> setup.Facts:
    base = dict(owner=OWNER, dirs=(setup.DirFact(Path("/opt/deploy"), True, 1000, 1000),), files=(), nginx_conf=Path("/etc/nginx/nginx.conf"),
                nginx_conf_text="http {\n}\n", include_in_dump=False, schedule="cron", schedule_files=(), timer_enabled=False)
    base.update(kw)
    return setup.Facts(**base)


def test_plan_lists_only_what_differs():
    wanted = setup.Wanted(include="include /opt/deploy/nginx/conf.d/*.conf;", upstream_dir="/opt/deploy/nginx/conf.d",
                          schedule_files={Path("/etc/cron.d/bluegreen"): "x\n"})
    facts = _facts(dirs=(setup.DirFact(Path("/opt/deploy"), True, 0, 0), setup.DirFact(Path("/app/logs"), False)),
                   files=(setup.DirFact(Path("/opt/deploy/projects/a.env"), True, 0, 0), setup.DirFact(Path("/opt/deploy/projects/b.env"), True, 1000, 1000)),
                   schedule_files=((Path("/etc/cron.d/bluegreen"), "old\n"),))
    kinds = [(s.kind, str(s.path)) for s in setup.plan_setup(facts, wanted)[0]]
    assert kinds == [("chown", "/opt/deploy"), ("mkdir", "/app/logs"), ("chown", "/opt/deploy/projects/a.env"),
                     ("include", "/etc/nginx/nginx.conf"), ("write", "/etc/cron.d/bluegreen")]
    done = _facts(nginx_conf_text="http {\n include /opt/deploy/nginx/conf.d/*.conf;\n}\n",
                  schedule_files=((Path("/etc/cron.d/bluegreen"), "x\n"),))
    steps, ok = setup.plan_setup(done, wanted)
    assert steps == [] and len(ok) == 3


def test_systemd_plan_reloads_units_and_enables_the_timer_once():
    unit = Path("/etc/systemd/system") / setup.TIMER_UNIT
    wanted = setup.Wanted(include="include /d/*.conf;", upstream_dir="/d", schedule_files={unit: "t\n"})
    facts = _facts(nginx_conf_text="http { include /d/*.conf; }", schedule="systemd", schedule_files=((unit, None),))
    argvs = [s.argv for s in setup.plan_setup(facts, wanted)[0] if s.kind == "systemctl"]
    assert argvs == [("systemctl", "daemon-reload"), ("systemctl", "enable", "--now", setup.TIMER_UNIT)]
    settled = _facts(nginx_conf_text="http { include /d/*.conf; }", schedule="systemd", schedule_files=((unit, "t\n"),), timer_enabled=True)
    assert setup.plan_setup(settled, wanted)[0] == []


def test_cron_file_runs_the_pyz_as_the_owner_once_a_day(tmp_path):
    settings = load_settings(None, {"BLUEGREEN_ROOT": "/opt/deploy", "BLUEGREEN_CRON_DIR": str(tmp_path)}, euid=0)
    texts = setup.schedule_texts(settings, "cron", owner=OWNER, command=["/usr/bin/python3", "/opt/deploy/bluegreen.pyz", "backup-logs"],
                                 logs="/app/logs", backup="/app/backup", older_than=1, keep_days=90)
    text = texts[tmp_path / "bluegreen"]
    jobs = [ln for ln in text.splitlines() if ln and not ln.startswith("#") and "=" not in ln.split()[0]]
    assert jobs == ["0 2 * * * ec2-user /usr/bin/python3 /opt/deploy/bluegreen.pyz backup-logs"]


# -- real: a bare host ------------------------------------------------------------------------------------------

class BareHost:
    """An empty deploy root, a cron dir, and a private nginx whose nginx.conf includes only its server-block
    directory (like Amazon Linux's /etc/nginx/conf.d), not bluegreen's upstream directory."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.root = work / "root"
        self.cron_dir = work / "cron.d"
        self.logs = work / "logs"
        self.backup = work / "backup"
        self.cron_dir.mkdir()
        self.nginx = stacklib.Nginx(str(work / "nginx"), includes=[])
        self.nginx.start()
        self.conf = Path(self.nginx.conf)
        self.conf_dir = Path(self.nginx.sites_dir)

    def env(self) -> dict:
        return {
            "BLUEGREEN_ROOT": str(self.root),
            "BLUEGREEN_NGINX": shlex.join(self.nginx.cmd),
            "BLUEGREEN_NGINX_CONF_DIR": str(self.conf_dir),
            "BLUEGREEN_CRON_DIR": str(self.cron_dir),
        }

    def setup_args(self, *extra: str) -> list[str]:
        return ["setup", "--logs", str(self.logs), "--backup", str(self.backup), *extra]

    def snapshot(self) -> dict:
        """Every file and directory under the work dir (but nginx's own logs and pid) with content, mode and owner."""
        found = {}
        for path in sorted(self.work.rglob("*")):
            if path.parent == Path(self.nginx.workdir) and path.suffix in (".log", ".pid"):
                continue
            st = path.lstat()
            found[str(path)] = (path.read_bytes() if path.is_file() else None, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
        return found


@pytest.fixture
def bare(tmp_path):
    tmp_path.chmod(0o755)  # nginx workers run as nobody
    host = BareHost(tmp_path)
    try:
        yield host
    finally:
        host.nginx.stop()


def test_init_setup_deploy_on_an_empty_root_works_first_time_and_setup_twice_changes_nothing(stack, project, bare):
    env = bare.env()
    listen = f"127.0.0.1:{project.nginx_port}"
    init = project.run("init", project.name, "--image", stack.image_repo, "--ports", f"{project.blue_port},{project.green_port}",
                       "--listen", listen, env=env, check=True)
    env_file = bare.root / "projects" / f"{project.name}.env"
    assert f"wrote    {env_file}" in init.stdout and f"wrote    {bare.conf_dir / (project.name + '.conf')}" in init.stdout
    assert "`setup` adds that include" in init.stdout and f"setup   (then: python3 {stack.pyz} deploy {project.name} TAG)" in init.stdout
    # What a user edits after init: no log volume on the test machine, a shorter health timeout.
    with env_file.open("a") as fh:
        fh.write("LOG_DIR=\nHEALTH_TIMEOUT=20\n")

    before = bare.snapshot()
    dry = project.run(*bare.setup_args("--owner", "nobody", "--dry-run"), env=env, check=True)
    assert "would    add `include" in dry.stdout and "nothing was changed" in dry.stdout
    assert bare.snapshot() == before

    first = project.run(*bare.setup_args("--owner", "nobody"), env=env, check=True)
    assert f"changed  add `include {bare.root}/nginx/conf.d/*.conf;`" in first.stdout and "nginx -t ok" in first.stdout
    nobody = pwd.getpwnam("nobody").pw_uid
    for d in (bare.root, bare.root / "projects", bare.root / "nginx" / "conf.d", bare.logs, bare.backup):
        assert d.is_dir() and d.stat().st_uid == nobody, d
    # init ran as root before the directories had their owner: its files are given to the owner too.
    assert env_file.stat().st_uid == nobody and (bare.root / "nginx" / "conf.d" / f"{project.name}-upstream.conf").stat().st_uid == nobody
    assert bare.conf.read_text().count(f"include {bare.root}/nginx/conf.d/*.conf;") == 1
    cron = (bare.cron_dir / "bluegreen").read_text()
    assert f" nobody {sys.executable} {stack.pyz} backup-logs --logs {bare.logs} --backup {bare.backup} --older-than 1 --keep-days 90\n" in cron

    settled = bare.snapshot()
    again = project.run(*bare.setup_args("--owner", "nobody"), env=env, check=True)
    assert "Nothing to change: this host is already set up." in again.stdout and "changed" not in again.stdout
    assert bare.snapshot() == settled

    deploy = project.run(project.name, "v1", env=env, check=True)
    assert f"routed to 127.0.0.1:{project.blue_port}" in deploy.stderr, deploy.stderr
    assert project.get("/version") == (200, "v1")
    doctor = project.run("doctor", project.name, env=env)
    assert doctor.returncode == 0 and "Ready to deploy" in doctor.stdout, doctor.stdout + doctor.stderr


def test_an_include_nginx_refuses_is_taken_out_again(stack, project, bare):
    env = bare.env()
    broken = bare.root / "nginx" / "conf.d" / "zz-broken.conf"
    broken.parent.mkdir(parents=True)
    broken.write_text("this_is_not_a_directive on;\n")
    original = bare.conf.read_bytes()
    proc = project.run(*bare.setup_args(), env=env, check=1)
    assert 'unknown directive "this_is_not_a_directive"' in proc.stderr
    assert f"{bare.conf} was put back as it was; nginx -t passes again without the line" in proc.stderr
    assert "Already done: create" in proc.stderr and "Traceback" not in proc.stderr
    assert bare.conf.read_bytes() == original
    bare.nginx.reload()  # the running nginx is unharmed and reloads fine

    broken.unlink()
    fixed = project.run(*bare.setup_args(), env=env, check=True)
    assert "changed  add `include" in fixed.stdout and "create" not in fixed.stdout  # the directories were done before


def test_a_config_that_was_already_broken_is_blamed_correctly(stack, project, bare):
    env = bare.env()
    (bare.conf_dir / "broken.conf").write_text("server { listen 127.0.0.1:1; bogus_directive; }\n")
    original = bare.conf.read_bytes()
    proc = project.run(*bare.setup_args(), env=env, check=1)
    assert "nginx -t fails without the line too, so the problem is elsewhere" in proc.stderr
    assert bare.conf.read_bytes() == original


def test_setup_without_cron_or_systemd_says_what_to_install(stack, project, bare):
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("this machine runs systemd: auto would install the timer into the real systemd")
    env = dict(bare.env(), BLUEGREEN_CRON_DIR=str(bare.work / "no-cron"))
    proc = project.run(*bare.setup_args(), env=env, check=2)
    assert "neither cron" in proc.stderr and "dnf install -y cronie" in proc.stderr and not bare.root.exists()
