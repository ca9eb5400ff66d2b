"""The bookkeeping around one deploy attempt: every failure journaled and notified, hooks and notification
under the project lock, file-system errors named plainly, route-variable clashes refused."""

from __future__ import annotations

import errno
import io
import json
import os

import pytest

from bluegreen import attempt, cli, state
from bluegreen.config import load_settings
from bluegreen.deploy import Deployer
from bluegreen.errors import NeedsAttention, UsageError
from bluegreen.runner import RecordingRunner, SubprocessRunner
from test_deploy_logic import FakeHost


@pytest.fixture
def root(tmp_path):
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "api.env").write_text("IMAGE=reg.local/acme/api\nHEALTH_TIMEOUT=5\nDB_PASSWORD=s3cret\n")
    return tmp_path


def run_deploy(root, monkeypatch, failure: BaseException):
    def explode(self, plan):
        raise failure

    monkeypatch.setattr(Deployer, "check", lambda self, plan: None)  # no docker or nginx is asked
    monkeypatch.setattr(Deployer, "run", explode)
    settings = load_settings(str(root), {}, euid=0)
    err = io.StringIO()
    with pytest.raises(BaseException) as exc:
        # The deploy itself is replaced; the runner is real so that the hooks really run.
        attempt.deploy_project(settings=settings, project="api", tag="v1", wait=0, dry_run=False, stdout=io.StringIO(),
                               stderr=err, environ=dict(os.environ), runner=SubprocessRunner())
    return exc.value, err.getvalue()


def journal(root):
    return [json.loads(line) for line in (root / "projects" / "api.journal").read_text().splitlines()]


def test_an_unexpected_exception_is_journaled_and_runs_the_failure_hook_under_the_lock(root, monkeypatch):
    hooks = root / "hooks" / "api"
    hooks.mkdir(parents=True)
    out = root / "hook-saw"
    hook = hooks / "on-failure"
    # flock -n fails while the deploy still holds the project lock: the hook records which it was.
    hook.write_text(f"#!/bin/sh\nif flock -n {root}/projects/api.lock true; then echo free; else echo held; fi > {out}\n"
                    f"echo \"$BLUEGREEN_RESULT $BLUEGREEN_EXIT_CODE\" >> {out}\n")
    hook.chmod(0o755)
    error, err = run_deploy(root, monkeypatch, RuntimeError("boom"))
    assert isinstance(error, NeedsAttention) and error.exit_code == 4
    assert "RuntimeError: boom" in error.message
    (entry,) = journal(root)
    assert (entry["result"], entry["exit_code"]) == ("attention", 4) and "RuntimeError: boom" in entry["message"]
    assert out.read_text().split() == ["held", "attention", "4"]


def test_a_full_disk_names_the_file_and_is_journaled(root, monkeypatch):
    error, err = run_deploy(root, monkeypatch, OSError(errno.ENOSPC, "No space left on device", "/opt/deploy/x.tmp"))
    assert isinstance(error, NeedsAttention)  # raised past the Deployer: a bug-class failure, still reported
    (entry,) = journal(root)
    assert entry["exit_code"] == 4


def test_os_error_message_in_the_deployer_names_file_and_what_serves():
    from bluegreen.errors import os_problem

    exc = OSError(errno.ENOSPC, "No space left on device", "/opt/deploy/projects/api.active")
    assert os_problem(exc) == "No space left on device: /opt/deploy/projects/api.active."


def test_cli_os_error_no_longer_claims_an_undo_or_blames_permissions(root, monkeypatch, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "projects" / "api.freeze"))

    monkeypatch.setattr(state, "atomic_write", full)  # cli imports it when lock runs
    code = cli.main(["lock", "api", "-m", "db migration", "--root", str(root)], environ={})
    err = capsys.readouterr().err
    assert code == 1
    assert f"No space left on device: {root / 'projects' / 'api.freeze'}." in err
    assert "undone" not in err and "permissions of the deploy root" not in err


def test_two_projects_sharing_one_route_variable_are_refused(root):
    (root / "projects" / "api.env").rename(root / "projects" / "user-api.env")
    (root / "projects" / "user.api.env").write_text("IMAGE=reg.local/acme/api\n")
    settings = load_settings(str(root), {}, euid=0)
    before = sorted(p.name for p in (root / "projects").iterdir())
    with pytest.raises(UsageError) as exc:
        attempt.deploy_project(settings=settings, project="user.api", tag="v1", wait=0, dry_run=False,
                               stdout=io.StringIO(), stderr=io.StringIO(), environ={},
                               runner=RecordingRunner(responder=FakeHost()))
    assert exc.value.exit_code == 2 and "$bluegreen_route_user_api" in exc.value.message and "user-api" in exc.value.message
    assert sorted(p.name for p in (root / "projects").iterdir() if not p.name.endswith((".journal", ".lock"))) == \
        [n for n in before]
    with pytest.raises(UsageError):
        attempt.deploy_project(settings=settings, project="user.api", tag="v1", wait=0, dry_run=True,
                               stdout=io.StringIO(), stderr=io.StringIO(), environ={})


def test_rollback_uses_the_recorded_digest():
    from bluegreen import journal as jr

    digest = "sha256:" + "a" * 64
    entries = [jr.Entry(time="t", host="h", user="u", project="p", action="deploy", tag="latest", digest=digest,
                        result=jr.RESULT_DEPLOYED, exit_code=0),
               jr.Entry(time="t", host="h", user="u", project="p", action="deploy", tag="latest", digest="junk",
                        result=jr.RESULT_FAILED, exit_code=1)]
    assert attempt.recorded_digest(entries, "latest") == digest
    assert attempt.recorded_digest(entries, "v9") == ""


def test_init_refuses_a_project_whose_route_variable_another_has(root):
    from bluegreen import init
    from bluegreen.runner import RecordingRunner

    (root / "projects" / "api.env").rename(root / "projects" / "user-api.env")
    settings = load_settings(str(root), {"BLUEGREEN_NGINX_CONF_DIR": str(root / "sites")}, euid=0)
    with pytest.raises(UsageError) as exc:
        init.init_project(settings=settings, runner=RecordingRunner(), project="user.api", image="reg.local/acme/api",
                          ports="8083,8084", listen="80", server_name="_", force=False, stdout=io.StringIO())
    assert "$bluegreen_route_user_api" in exc.value.message and "Nothing was changed" in exc.value.message
    assert not (root / "projects" / "user.api.env").exists() and not (root / "sites").exists()


def test_a_planted_symlink_target_never_reaches_a_message_raw(tmp_path):
    from bluegreen import safefs

    link = tmp_path / "projects" / "x.lock"
    link.parent.mkdir()
    os.symlink("/tmp/\x1b]0;owned\x07" + "a" * 300, link)
    with pytest.raises(safefs.UnsafePath) as exc:
        safefs.read_text(link, root=tmp_path)
    assert "\x1b" not in exc.value.message and "\x07" not in exc.value.message
    assert "\\x1b" in exc.value.message and len(exc.value.message) < 1000


def test_dry_run_says_when_a_hook_would_be_refused(root):
    hooks = root / "hooks" / "api"
    hooks.mkdir(parents=True)
    good, bad = hooks / "post-deploy", hooks / "pre-deploy"
    for hook in (good, bad):
        hook.write_text("#!/bin/sh\ntrue\n")
        hook.chmod(0o755)
    bad.chmod(0o775)  # group-writable: refused when bluegreen runs as root
    settings = load_settings(str(root), {}, euid=0)
    out = io.StringIO()
    attempt.deploy_project(settings=settings, project="api", tag="v1", wait=0, dry_run=True, stdout=out,
                           stderr=io.StringIO(), environ={})
    text = out.getvalue()
    assert f"hook    {good} would run" in text
    if os.geteuid() == 0:
        assert f"hook    {bad} would be refused:" in text and "chmod go-w" in text


def test_route_clash_ignores_case_as_nginx_does():
    from bluegreen.nginx import route_clash

    assert route_clash("User-Api", ["user-api"]) == "user-api"
    assert route_clash("user-api", ["user.api", "other"]) == "user.api"
    assert route_clash("user-api", ["user-api", "api"]) is None
