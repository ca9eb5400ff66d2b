"""The `bluegreen` launcher `setup` installs: a stable python3 running the pyz, idempotent, never replacing a
file it did not write, and messages that name the command the way the user ran it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bluegreen import host, setup
from test_stack_setup import bare  # noqa: F401  (the fixture, shared with the setup tests)


def test_launcher_text_runs_the_pyz_with_a_stable_python_and_says_how_it_was_called():
    text = setup.launcher_text("/usr/bin/python3", "/opt/deploy/bluegreen.pyz", "bluegreen")
    assert text.startswith("#!/bin/sh\n# Managed by `bluegreen setup`")
    assert "BLUEGREEN_INVOKED_AS=bluegreen\nexport BLUEGREEN_INVOKED_AS\n" in text
    assert text.endswith('exec /usr/bin/python3 /opt/deploy/bluegreen.pyz "$@"\n')
    odd = setup.launcher_text("/usr/bin/python3", "/opt/my deploy/it's.pyz", "/srv/x y/bluegreen")
    assert "exec /usr/bin/python3 '/opt/my deploy/it'\"'\"'s.pyz' \"$@\"" in odd


def test_the_launcher_is_called_bluegreen_only_where_it_is_on_the_path():
    assert setup.launcher_invoked_as(Path("/usr/local/bin/bluegreen")) == "bluegreen"
    assert setup.launcher_invoked_as(Path("/srv/tools/bluegreen")) == "/srv/tools/bluegreen"


def test_invocation_names_the_launcher_when_run_through_it():
    assert host.invocation({"BLUEGREEN_INVOKED_AS": "bluegreen"}) == "bluegreen"
    assert host.invocation({"BLUEGREEN_INVOKED_AS": "/srv/tools/bluegreen"}) == "/srv/tools/bluegreen"
    # Anything else (a shell snippet, a newline) is not believed: the default hint instead.
    for bad in ("rm -rf /; bluegreen", "blue\ngreen", ""):
        assert host.invocation({"BLUEGREEN_INVOKED_AS": bad}) == host.invocation({})


def run(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    full = {"PATH": "/usr/local/bin:/usr/bin:/bin", **env}
    return subprocess.run(argv, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)


def test_setup_installs_the_launcher_once_and_messages_name_it(stack, project, bare):  # noqa: F811
    env = bare.env()
    launcher = bare.bin / "bluegreen"
    first = project.run(*bare.setup_args("--schedule", "none"), env=env, check=True)
    assert f"changed  install the launcher {launcher}" in first.stdout, first.stdout
    assert launcher.read_text().endswith(f'exec /usr/bin/python3 {bare.pyz} "$@"\n')
    assert launcher.stat().st_mode & 0o777 == 0o755
    # Not on the PATH here, so the messages name it by its path.
    assert f"Next: {launcher} init PROJECT" in first.stdout

    version = run([str(launcher), "--version"], env)
    assert version.returncode == 0 and "bluegreen" in version.stdout + version.stderr

    again = run([str(launcher), *bare.setup_args("--schedule", "none")], env)
    assert again.returncode == 0, again.stderr
    assert f"ok       launcher {launcher} is up to date" in again.stdout and "Nothing to change" in again.stdout

    # A command run through the launcher tells the user to run the launcher, not `python3 PYZ`.
    init = run([str(launcher), "init", project.name, "--image", stack.image_repo, "--ports",
                f"{project.blue_port},{project.green_port}", "--listen", f"127.0.0.1:{project.nginx_port}"], env)
    assert init.returncode == 0, init.stdout + init.stderr
    assert f"(then: {launcher} deploy {project.name} TAG)" in init.stdout and "python3 " not in init.stdout

    # The pyz moved: the launcher follows it.
    moved = bare.pyz_dir / "other.pyz"
    os.rename(bare.pyz, moved)
    follow = project.run("setup", "--logs", str(bare.logs), "--backup", str(bare.backup), "--pyz", str(moved),
                         "--schedule", "none", env=env, check=True)
    assert f"changed  update the launcher {launcher}" in follow.stdout
    assert launcher.read_text().endswith(f'exec /usr/bin/python3 {moved} "$@"\n')


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_bluegreen_command_setup_did_not_write_is_left_alone(stack, project, bare, kind):  # noqa: F811
    bare.bin.mkdir()
    launcher = bare.bin / "bluegreen"
    other = bare.work / "their-bluegreen"
    other.write_text("#!/bin/sh\necho someone else's tool\n")
    if kind == "file":
        os.rename(other, launcher)
    else:
        launcher.symlink_to(other)
    before = launcher.read_text()
    proc = project.run(*bare.setup_args("--schedule", "none"), env=bare.env(), check=True)
    assert f"warning: left {launcher} as it is: setup did not write it" in proc.stderr, proc.stderr
    assert launcher.read_text() == before and launcher.is_symlink() == (kind == "symlink")
    assert "launcher" not in proc.stdout
    assert f"Next: python3 {stack.pyz} init" in proc.stdout  # not a command that is someone else's


def test_no_launcher_without_a_pyz_to_run(stack, project, bare):  # noqa: F811
    missing = bare.pyz_dir / "missing.pyz"
    proc = project.run("setup", "--logs", str(bare.logs), "--backup", str(bare.backup), "--pyz", str(missing),
                       "--schedule", "none", env=bare.env(), check=True)
    assert f"{missing} does not exist, so no `bluegreen` launcher was installed" in proc.stderr
    assert not (bare.bin / "bluegreen").exists()


DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("guide", ["guide.md", "guide.ko.md"])
def test_the_guides_give_debian_commands_beside_amazon_linux_ones_and_use_the_launcher(guide):
    text = (DOCS / guide).read_text()
    assert "sudo dnf install -y docker nginx cronie python3" in text
    assert "sudo apt-get update && sudo apt-get install -y docker.io nginx cron python3" in text
    assert "sudo systemctl enable --now docker nginx crond" in text and "sudo systemctl enable --now docker nginx cron\n" in text
    assert "sites-enabled/default" in text and "admin" in text and "ubuntu" in text
    assert "/usr/local/bin/bluegreen" in text and "alias bg=" not in text
    assert "PULL=never" in text and "docker load -i" in text
