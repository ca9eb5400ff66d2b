"""Pure tests of the fleet's deciding code: hosts as users write them, the exact ssh argv, batches, exit codes."""

from __future__ import annotations

import glob
import hashlib
import io
import os
import shlex
import subprocess
import sys

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from bluegreen import fleet
from bluegreen.errors import UsageError


def test_the_guides_comma_list_and_a_hosts_file_both_parse():
    assert fleet.parse_hosts("10.0.1.10,10.0.1.11") == [fleet.Target("10.0.1.10"), fleet.Target("10.0.1.11")]
    text = "# user-api fleet\nec2-user@10.0.1.10   # az a\n\n10.0.1.11:2222\n[2001:db8::1]:22\nweb-3.internal\n10.0.1.11:2222\n"
    assert fleet.parse_hosts(text, "--hosts-file") == [
        fleet.Target("10.0.1.10", "ec2-user"), fleet.Target("10.0.1.11", port=2222),
        fleet.Target("2001:db8::1", port=22), fleet.Target("web-3.internal")]


@pytest.mark.parametrize("bad", ["-oProxyCommand=touch /tmp/x", "host;rm", "h:0", "h:70000", "user@", "@h",
                                 "[::1", "h\x1b[31m", "é.example"])
def test_what_is_not_a_host_is_refused_before_anything_runs(bad):
    with pytest.raises(UsageError) as exc:
        fleet.parse_hosts(bad)
    assert "Nothing was changed" in exc.value.message and "\x1b" not in exc.value.message


def test_an_empty_list_is_refused():
    with pytest.raises(UsageError):
        fleet.parse_hosts(" , # nothing\n")


def test_ssh_argv_is_exact():
    opts = fleet.SshOptions(user="deploy", identity="/k/id", options=("StrictHostKeyChecking=yes",),
                            config="/c/ssh_config", control_dir="/tmp/bg-ssh")
    argv = fleet.ssh_argv(fleet.Target("10.0.1.10", port=2222), opts, ["python3", "/opt/deploy/bluegreen.pyz", "deploy",
                                                                        "user-api", "v2"])
    assert argv == ["ssh", "-F", "/c/ssh_config", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                    "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3",
                    "-o", "ControlMaster=auto", "-o", "ControlPath=/tmp/bg-ssh/%C", "-o", "ControlPersist=120",
                    "-o", "StrictHostKeyChecking=yes", "-i", "/k/id", "-l", "deploy", "-p", "2222",
                    "--", "10.0.1.10", "python3 /opt/deploy/bluegreen.pyz deploy user-api v2"]
    # A user in the host name wins over --ssh-user; no options given: only the fixed ones.
    assert fleet.ssh_argv(fleet.Target("h", "ec2-user"), fleet.SshOptions(user="x"), ["true"])[-5:] == [
        "-l", "ec2-user", "--", "h", "true"]


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=20), min_size=1, max_size=5))
def test_the_remote_command_reaches_the_remote_shell_word_for_word(words):
    argv = fleet.ssh_argv(fleet.Target("h"), fleet.SshOptions(), words)
    assert argv[-3:-1] == ["--", "h"] and shlex.split(argv[-1]) == words


@pytest.mark.parametrize("bad", ["", "NoEquals", "-oProxyCommand=x", "Key=a\nb", "1Key=v"])
def test_ssh_options_must_be_key_value(bad):
    with pytest.raises(UsageError):
        fleet.check_option(bad)


@pytest.mark.parametrize("spec,hosts,size", [("1", 3, 1), ("2", 3, 2), ("9", 3, 3), ("50%", 3, 1), ("50%", 4, 2),
                                             ("100%", 3, 3), ("10%", 3, 1)])
def test_batch_sizes(spec, hosts, size):
    assert fleet.parse_batch(spec, hosts) == size


@pytest.mark.parametrize("bad", ["0", "0%", "101%", "-1", "x", "1.5"])
def test_bad_batch_sizes_are_refused(bad):
    with pytest.raises(UsageError):
        fleet.parse_batch(bad, 3)


def test_batches_keep_the_order():
    hosts = [fleet.Target(f"h{i}") for i in range(5)]
    assert [[t.host for t in b] for b in fleet.batches(hosts, 2)] == [["h0", "h1"], ["h2", "h3"], ["h4"]]


def R(result, code=0):  # noqa: N802
    return fleet.HostResult("h", result, exit_code=code)


@pytest.mark.parametrize("results,kw,code", [
    ([R(fleet.OK), R(fleet.OK)], {}, 0),
    ([R(fleet.OK), R(fleet.FAILED, 1), R(fleet.SKIPPED)], {}, 1),
    ([R(fleet.REFUSED, 2), R(fleet.OK)], {"preflight_failed": True}, 2),
    ([R(fleet.REFUSED, 3), R(fleet.REFUSED, 2)], {"preflight_failed": True}, 3),
    ([R(fleet.REVERTED), R(fleet.FAILED, 1)], {"revert_failed": True}, 4),
    ([R(fleet.OK), R(fleet.FAILED, 4)], {}, 4),
])
def test_exit_codes(results, kw, code):
    assert fleet.exit_code(results, **kw) == code


def test_the_table_has_one_line_per_host():
    lines = fleet.table([fleet.HostResult("a.example", fleet.OK, "v1", "v2", 3.25),
                         fleet.HostResult("b", fleet.FAILED, "v1", "v1", 1.0, "health", "no answer\nmore")])
    assert lines[1].split()[:5] == ["a.example", "deployed", "v1", "->", "v2"]
    assert lines[2].endswith("health: no answer") and len(lines) == 3


def test_the_probe_goes_on_as_the_tool_only_when_it_is_the_controllers(tmp_path):
    """One command checks a host that is up to date: the probe's two lines, then the tool's own output."""
    from bluegreen import rollout

    tool = tmp_path / "bluegreen.pyz"
    tool.write_bytes(b"import sys\nprint('tool ran with', sys.argv[1:])\n")
    digest = hashlib.sha256(tool.read_bytes()).hexdigest()

    def probe(want: str) -> list:
        proc = subprocess.run([sys.executable, "-c", rollout.PROBE, str(tool), want, "doctor", "api", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    version = "%d.%d" % sys.version_info[:2]
    assert probe(digest) == ["BLUEGREEN-PROBE", version, digest, "tool ran with ['doctor', 'api', '--json']"]
    assert probe("0" * 64) == ["BLUEGREEN-PROBE", version, digest]  # another tool there: it is replaced first, never run


OLD_PYTHONS = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.[678].*/bin/python3")))


@pytest.mark.skipif(not OLD_PYTHONS, reason="no python older than 3.9 on this machine (pyenv has 3.6-3.8 here)")
def test_the_probe_runs_on_an_old_python_and_preflight_names_it(tmp_path):
    """The probe is the one thing the controller runs on whatever python3 a host has."""
    from bluegreen import rollout

    old = OLD_PYTHONS[0]
    tool = tmp_path / "bluegreen.pyz"
    tool.write_bytes(b"x")
    digest = hashlib.sha256(b"x").hexdigest()
    # Even with the tool's own sha256 and a command, an old python only reports: it never runs the tool.
    proc = subprocess.run([old, "-c", rollout.PROBE, str(tool), digest, "doctor", "api", "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    marker, version, digest = proc.stdout.split()
    assert marker == "BLUEGREEN-PROBE"
    assert version.startswith("3.") and int(version.split(".")[1]) < 9
    assert digest == hashlib.sha256(b"x").hexdigest()

    class Answer:
        returncode, stdout, stderr = 0, proc.stdout, ""

    pyz = tmp_path / "me.pyz"
    pyz.write_bytes(b"new")
    ro = rollout.Rollout(settings=None, project="api", tag="v2", targets=[fleet.Target("h1")], ssh=fleet.SshOptions(),
                         remote=rollout.Remote(), pyz=pyz, stdout=io.StringIO(), stderr=io.StringIO(), environ={})
    ro.ssh_run = lambda *a, **k: Answer()  # only the probe runs: its answer above, from the real old python
    (h,) = ro.hosts
    ro.preflight_one(h)
    assert (h.result.result, h.result.step) == ("refused", "python")
    assert f"is {version}; bluegreen needs 3.9 or newer" in h.result.message


def test_a_host_flooding_its_output_costs_bounded_memory(tmp_path):
    """FAKE BINARY, on purpose: a stand-in for `ssh` that prints 64 MiB without a line break, as a broken or
    hostile host could; the real ssh relays whatever the host prints. Both ways of running a remote command
    keep only a bounded part of it."""
    from bluegreen import rollout

    flood = tmp_path / "ssh"
    flood.write_text("#!/bin/sh\nhead -c 67108864 /dev/zero | tr '\\\\0' x\necho\necho 'bluegreen: the end'\n")
    flood.chmod(0o755)
    pyz = tmp_path / "me.pyz"
    pyz.write_bytes(b"x")
    err = io.StringIO()
    ro = rollout.Rollout(settings=None, project="api", tag="v2", targets=[fleet.Target("h1")], ssh=fleet.SshOptions(),
                         remote=rollout.Remote(), pyz=pyz, stdout=io.StringIO(), stderr=err, environ={}, ssh_cmd=str(flood))
    result = ro.ssh_run(fleet.Target("h1"), ["true"], timeout=60)
    assert result.returncode == 0 and len(result.stdout) <= 2 * rollout.OUTPUT_LIMIT
    keep: list = []
    assert ro.ssh_stream(fleet.Target("h1"), ["true"], keep) == 0
    assert keep[-1] == "bluegreen: the end" and max(len(line) for line in keep) <= rollout.LINE_MAX
    assert len(keep) <= 60 and len(err.getvalue()) > 64 * 1024 * 1024 // 2  # every piece was shown, bounded each
