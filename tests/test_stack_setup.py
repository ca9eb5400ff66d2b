"""`bluegreen setup` (and init) on a bare host: a private nginx whose nginx.conf lacks the include, an
empty root, a private cron directory. Pure tests of the plan first, then the real thing."""

from __future__ import annotations

import io
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stack as stacklib
from bluegreen import host, setup
from bluegreen.cli import main
from bluegreen.config import load_settings
from bluegreen.errors import BluegreenError, UsageError
from bluegreen.host import add_include, includes_dir
from bluegreen.template import load as load_template

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


# -- pure: values written into the root-run schedule ------------------------------------------------------------

HOSTILE = [
    "/app/logs%x", "/app/%logs%", "/a\\%b", "/a\\", "/a b/c", "/a'b\"c", "/$HOME/x", "/a;touch /tmp/p", "/a`id`",
    "/a$(id)", "/~x", "/a*", "/%%", "/\\%%\\", "/a#b", "/é/日本", "/a=b", "/-x", "/a\\nb", "/a%Hb", "/${PATH}",
]


def cron_unescape(command: str) -> str:
    """What cronie and vixie cron hand to /bin/sh: `\\%` becomes `%`, a bare `%` ends the command."""
    out, escaped = [], False
    for ch in command:
        if escaped:
            if ch == "%":
                out[-1] = "%"
            else:
                out.append(ch)
            escaped = False
            continue
        if ch == "\\":
            escaped = True
            out.append(ch)
            continue
        if ch == "%":
            break
        out.append(ch)
    return "".join(out)


def cron_jobs(text: str) -> list[str]:
    return [ln for ln in text.split("\n") if ln.strip() and not ln.lstrip().startswith("#") and "=" not in ln.split()[0]]


def systemd_split(line: str) -> list[str]:
    """A model of how systemd reads an Exec line: `%%` is `%` (another specifier expands), words split on
    whitespace, single or double quotes with C escapes, `$$` is `$` (`$NAME` / `${NAME}` expand)."""
    words: list[str] = []
    word: list[str] = []
    i, quoted, started = 0, None, False
    while i < len(line):
        ch = line[i]
        if ch == "%":
            assert line[i + 1] == "%", f"specifier %{line[i + 1]} would expand"
            word.append("%")
            i += 2
            started = True
            continue
        if ch == "$":
            if line[i + 1] == "$":
                word.append("$")
                i += 2
                started = True
                continue
            assert not (line[i + 1].isalpha() or line[i + 1] in "_{"), "an environment variable would expand"
        if ch == "\\":
            nxt = line[i + 1]
            assert nxt in "\\\"'", f"an escape \\{nxt} would change the value"
            word.append(nxt)
            i += 2
            started = True
            continue
        if ch in "\"'" and quoted in (None, ch):
            quoted = ch if quoted is None else None
            started = True
        elif ch.isspace() and quoted is None:
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(ch)
            started = True
        i += 1
    assert quoted is None
    if started:
        words.append("".join(word))
    return words


def _render(schedule: str, tmp: Path, logs: str, backup: str, pyz: str = "/opt/deploy/bluegreen.pyz") -> tuple[list[str], str]:
    settings = load_settings(None, {"BLUEGREEN_ROOT": "/opt/deploy", "BLUEGREEN_CRON_DIR": str(tmp),
                                    "BLUEGREEN_SYSTEMD_DIR": str(tmp)}, euid=0)
    argv = ["/usr/bin/python3", pyz, "backup-logs", "--logs", logs, "--backup", backup, "--older-than", "1", "--keep-days", "90"]
    texts = setup.schedule_texts(settings, schedule, owner=OWNER, command=argv, logs=logs, backup=backup, older_than=1, keep_days=90)
    name = "bluegreen" if schedule == "cron" else setup.SERVICE_UNIT
    return argv, texts[tmp / name]


def _cron_argv(text: str) -> list[str]:
    jobs = cron_jobs(text)
    assert len(jobs) == 1, text
    fields = jobs[0].split(None, 6)
    assert fields[:6] == ["0", "2", "*", "*", "*", "ec2-user"], jobs
    return shlex.split(cron_unescape(fields[6]))


def _systemd_argv(text: str) -> list[str]:
    template_lines = load_template("backup-logs.service").count("\n")
    assert text.count("\n") == template_lines, text  # no value added a line
    (exec_line,) = [ln for ln in text.split("\n") if ln.startswith("ExecStart=")]
    description = [ln for ln in text.split("\n") if ln.startswith("Description=")][0]
    assert "%" not in description.replace("%%", ""), description  # every % of a path is doubled there too
    return systemd_split(exec_line[len("ExecStart="):])


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_but_valid_paths_round_trip_through_cron_and_systemd(tmp_path, value):
    for logs, backup in ((value, "/app/backup"), ("/app/logs", value)):
        argv, text = _render("cron", tmp_path, logs, backup)
        assert _cron_argv(text) == argv, text
        argv, text = _render("systemd", tmp_path, logs, backup, pyz=value)
        assert _systemd_argv(text) == argv, text


def test_the_cron_command_round_trips_through_a_real_sh(tmp_path):
    """Not a model: /bin/sh itself splits what cron would hand it."""
    for value in HOSTILE:
        argv, text = _render("cron", tmp_path, value, "/b%\\%")
        command = cron_unescape(cron_jobs(text)[0].split(None, 6)[6])
        assert command.startswith("/usr/bin/python3 ")
        printer = "printf '%s\\0'" + command[len("/usr/bin/python3"):]
        out = subprocess.run(["/bin/sh", "-c", printer], capture_output=True, timeout=10, check=True).stdout
        assert out.decode("utf-8").split("\0")[:-1] == argv[1:], (value, command)


@pytest.mark.parametrize("value", ["/app/logs\n* * * * * root touch /tmp/pwned", "/a\rb", "/a\x00b", "/a\x1b[31m",
                                   "/a\u2028b", "/a\x85b", "/a\udcffb", "relative/logs", "", "/" + "a" * 1100])
def test_control_characters_relative_and_overlong_paths_are_refused(tmp_path, value):
    for schedule in ("cron", "systemd"):
        with pytest.raises(UsageError, match="Nothing was changed"):
            _render(schedule, tmp_path, value, "/app/backup")
        with pytest.raises(UsageError, match="Nothing was changed"):
            _render(schedule, tmp_path, "/app/logs", value)


def test_a_command_cron_would_cut_short_is_refused(tmp_path):
    long = "/" + "d" * 450
    with pytest.raises(UsageError, match="cron cuts commands at 1000"):
        _render("cron", tmp_path, long, long)
    argv, text = _render("systemd", tmp_path, long, long)  # systemd has no such limit
    assert _systemd_argv(text) == argv


def test_user_names_that_are_not_one_plain_word_are_refused(tmp_path):
    settings = load_settings(None, {"BLUEGREEN_ROOT": "/opt/deploy", "BLUEGREEN_CRON_DIR": str(tmp_path)}, euid=0)
    for name in ("a b", "a\nb", "a%b", "-x", ""):
        with pytest.raises(UsageError, match="plain user name"):
            setup.schedule_texts(settings, "cron", owner=setup.Owner(name, 1, 1), command=["/usr/bin/python3"],
                                 logs="/a", backup="/b", older_than=1, keep_days=90)


@settings(max_examples=3000, deadline=None)
@given(st.text(min_size=1, max_size=120), st.sampled_from(["cron", "systemd"]))
def test_any_accepted_path_renders_one_line_whose_command_round_trips(tmp_path_factory, text, schedule):
    value = "/" + text
    tmp = tmp_path_factory.getbasetemp()
    try:
        argv, rendered = _render(schedule, tmp, value, "/app/backup%x")
    except UsageError as exc:  # refused only for what cannot be written safely
        assert not value.isprintable() or "cron cuts" in exc.message
        return
    if schedule == "cron":
        assert _cron_argv(rendered) == argv
    else:
        assert _systemd_argv(rendered) == argv


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
        self.bin = work / "bin"  # the launcher goes here, never into this machine's /usr/local/bin
        # A copy of the pyz the owner can read (the session's pyz and pytest's tmp_path are root's only).
        self.pyz_dir = Path(tempfile.mkdtemp(prefix="bg-setup-pyz-", dir="/tmp"))
        self.pyz = self.pyz_dir / "bluegreen.pyz"
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
            "BLUEGREEN_LAUNCHER_DIR": str(self.bin),
            # Test-only stand-in for /usr/sbin/cron: this machine has no cron daemon.
            "BLUEGREEN_TEST_CRON_DAEMONS": str(self.work / "fake-cron"),
        }

    def setup_args(self, *extra: str) -> list[str]:
        return ["setup", "--logs", str(self.logs), "--backup", str(self.backup), "--pyz", str(self.pyz), *extra]

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
def bare(tmp_path, stack):
    tmp_path.chmod(0o755)  # nginx workers run as nobody
    host = BareHost(tmp_path)
    try:
        (tmp_path / "fake-cron").write_text("")
        host.pyz_dir.chmod(0o755)
        shutil.copyfile(stack.pyz, host.pyz)
        host.pyz.chmod(0o644)
        yield host
    finally:
        host.nginx.stop()
        shutil.rmtree(host.pyz_dir, ignore_errors=True)


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
    # A stable interpreter, never the one setup ran with (sys.executable is a pyenv path on the test machine).
    assert f" nobody /usr/bin/python3 {bare.pyz} backup-logs --logs {bare.logs} --backup {bare.backup} --older-than 1 --keep-days 90\n" in cron
    assert "warning" not in first.stderr, first.stderr  # /usr/bin/python3 runs the pyz as nobody
    assert (bare.bin / "bluegreen").stat().st_mode & 0o777 == 0o755

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


def test_setup_with_a_cron_directory_but_no_cron_daemon_says_what_to_install(stack, project, bare):
    """Debian without cron: /etc/cron.d exists (e2fsprogs ships a file there) but nothing would read it. The
    daemon check looks at the test-only BLUEGREEN_TEST_CRON_DAEMONS, here an empty list: no daemon."""
    env = dict(bare.env(), BLUEGREEN_TEST_CRON_DAEMONS="")
    proc = project.run(*bare.setup_args("--schedule", "cron"), env=env, check=2)
    assert "no cron daemon is installed" in proc.stderr and "apt-get install -y cron" in proc.stderr, proc.stderr
    assert "dnf install -y cronie" in proc.stderr and "Nothing was changed" in proc.stderr
    assert list(bare.cron_dir.iterdir()) == [] and not bare.root.exists() and not bare.bin.exists()
    if not os.path.isdir("/run/systemd/system"):  # auto falls back to a timer only where systemd runs
        auto = project.run(*bare.setup_args(), env=env, check=2)
        assert "neither a cron daemon" in auto.stderr and "apt-get install -y cron" in auto.stderr
        assert list(bare.cron_dir.iterdir()) == [] and not bare.root.exists()


def test_setup_warns_when_the_owner_cannot_run_the_pyz(stack, project, bare):
    # A pyz in a directory only root may enter: cron would fail every night as nobody.
    private = bare.work / "private"
    private.mkdir(mode=0o700)
    pyz = private / "bluegreen.pyz"
    shutil.copyfile(stack.pyz, pyz)
    proc = project.run("setup", "--logs", str(bare.logs), "--backup", str(bare.backup), "--pyz", str(pyz),
                       "--owner", "nobody", env=bare.env(), check=True)
    assert f"the daily log backup runs `/usr/bin/python3 {pyz}` as nobody, but that fails here" in proc.stderr
    assert "Permission denied" in proc.stderr and (bare.cron_dir / "bluegreen").is_file()


def test_cron_daemon_check_and_interpreter_choice(tmp_path):
    settings = load_settings(str(tmp_path), {})
    assert settings.cron_dir == setup.DEFAULT_CRON_DIR
    assert setup.cron_daemon_installed(settings, {}, is_file=lambda p: p == "/usr/sbin/cron")
    assert setup.cron_daemon_installed(settings, {}, is_file=lambda p: p == "/usr/sbin/crond")
    assert not setup.cron_daemon_installed(settings, {}, is_file=lambda p: p == "/etc/cron.d/e2scrub_all")
    assert setup.cron_daemon_installed(settings, {"BLUEGREEN_TEST_CRON_DAEMONS": "/x:/y"}, is_file=lambda p: p == "/y")
    with pytest.raises(UsageError, match="no cron daemon"):
        setup.choose_schedule("cron", cron_dir_exists=True, systemd_running=True, cron_daemon=False)
    assert setup.choose_schedule("auto", cron_dir_exists=True, systemd_running=True, cron_daemon=False) == "systemd"
    with pytest.raises(UsageError, match="neither a cron daemon"):
        setup.choose_schedule("auto", cron_dir_exists=True, systemd_running=False, cron_daemon=False)
    assert host.stable_python(is_file=lambda p: True) == "/usr/bin/python3"
    assert host.stable_python(is_file=lambda p: p == "/usr/local/bin/python3") == "/usr/local/bin/python3"
    assert host.stable_python(is_file=lambda p: False) is None
    argv = host.self_command(settings, "/opt/deploy/bluegreen.pyz")
    assert argv[1] == "/opt/deploy/bluegreen.pyz" and argv[0] in host.STABLE_PYTHONS and ".pyenv" not in argv[0]


def test_an_nginx_conf_with_bytes_that_are_not_utf8_gets_the_include_and_keeps_its_bytes(stack, project, bare):
    original = bare.conf.read_bytes()
    latin1 = b"# r\xe9sum\xe9 of the proxy settings (latin-1)\n"
    bare.conf.write_bytes(latin1 + original)
    proc = project.run(*bare.setup_args(), env=bare.env(), check=True)
    assert f"changed  add `include {bare.root}/nginx/conf.d/*.conf;`" in proc.stdout
    data = bare.conf.read_bytes()
    assert data.startswith(latin1) and data.count(f"include {bare.root}/nginx/conf.d/*.conf;".encode()) == 1


# -- races and hostile output, in process (as root: the chown is real) ------------------------------------------

class _Crontab(setup.Runner):
    """Answers `crontab -l` with what the owner wrote; anything else fails (not found)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def run(self, argv, **kw):
        from bluegreen.runner import Result
        return Result(tuple(argv), 0, self.text, "") if argv[0] == "crontab" else Result(tuple(argv), 127, "", "")


def test_the_owners_crontab_is_shown_bounded_and_without_control_characters():
    evil = "0 2 * * * find /app/logs -delete \x1b]0;pwned\x07\x1b[2J" + "x" * 5000 + "\n" * 3 + "# find /app/ comment\n"
    lines = setup._seed_crontab_lines(_Crontab(evil * 20), OWNER)
    assert 1 <= len(lines) <= 5
    for line in lines:
        assert line.isprintable() and len(line) <= 210 and line.startswith("0 2 * * * find /app/logs -delete")


@pytest.mark.parametrize("schedule", ["cron", "systemd", "none"])
def test_the_seed_crontab_warning_names_the_schedule_really_written(tmp_path, schedule):
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"http {{ include {tmp_path}/root/nginx/conf.d/*.conf; }}\n")
    env = {"BLUEGREEN_ROOT": str(tmp_path / "root"), "BLUEGREEN_NGINX_CONF": str(conf),
           "BLUEGREEN_CRON_DIR": str(tmp_path), "BLUEGREEN_SYSTEMD_DIR": str(tmp_path)}
    out, err = io.StringIO(), io.StringIO()
    code = setup.setup_host(settings=load_settings(None, env), runner=_Crontab("0 2 * * * find /app/logs -mtime +1\n"),
                            owner=None, logs=str(tmp_path / "logs"), backup=str(tmp_path / "bk"), schedule=schedule,
                            older_than=1, keep_days=90, pyz=None, dry_run=True, environ=env, stdout=out, stderr=err,
                            systemd_running=True)
    assert code == 0, err.getvalue()
    warned = [ln for ln in err.getvalue().splitlines() if "the seed's line" in ln]
    if schedule == "none":
        assert warned == []  # the seed's line is then the only backup: never advise removing it
    else:
        where = str(tmp_path / "bluegreen") if schedule == "cron" else f"the systemd timer {setup.TIMER_UNIT}"
        assert len(warned) == 1 and f"the backup now runs from {where}, so remove it" in warned[0], warned


@pytest.mark.parametrize("kind", ["chown", "mkdir"])
def test_a_symlink_swapped_in_after_the_plan_is_never_followed(tmp_path, monkeypatch, kind):
    """The owner replaces ROOT/projects between setup's reading and its doing (the race is injected by
    wrapping plan_setup, which runs exactly between the two)."""
    if os.geteuid() != 0:
        pytest.fail("needs root: the chown is real")
    root, decoy = tmp_path / "root", tmp_path / "decoy"
    (decoy / "sub").mkdir(parents=True)
    (decoy / "secret").write_text("root only\n")
    root.mkdir()
    if kind == "chown":
        (root / "projects").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"http {{ include {root}/nginx/conf.d/*.conf; }}\n")
    real_plan = setup.plan_setup

    def plan_then_swap(facts, wanted):
        steps = real_plan(facts, wanted)
        assert any(s.kind == kind and s.path == root / "projects" for s in steps[0])
        if kind == "chown":
            (root / "projects").rmdir()
        (root / "projects").symlink_to(decoy)
        return steps

    monkeypatch.setattr(setup, "plan_setup", plan_then_swap)
    nobody = pwd.getpwnam("nobody")
    before = [(p, p.stat().st_uid, p.stat().st_mode) for p in (decoy, decoy / "sub", decoy / "secret")]
    out, err = io.StringIO(), io.StringIO()
    env = {"BLUEGREEN_ROOT": str(root), "BLUEGREEN_NGINX_CONF": str(conf), "BLUEGREEN_CRON_DIR": str(tmp_path)}
    code = main(["setup", "--owner", "nobody", "--logs", str(tmp_path / "logs"), "--backup", str(tmp_path / "bk"),
                 "--schedule", "none"], environ=env, stdout=out, stderr=err)
    assert code == 2, out.getvalue() + err.getvalue()
    assert f"{root / 'projects'} is a symlink (to {decoy})" in err.getvalue() and "Already done:" in err.getvalue()
    assert [(p, p.stat().st_uid, p.stat().st_mode) for p in (decoy, decoy / "sub", decoy / "secret")] == before
    assert root.stat().st_uid == nobody.pw_uid  # the step before it was done, and is reported as done
