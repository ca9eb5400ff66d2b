"""The Ansible example (docs/examples/ansible/deploy.yml, docs/ansible.md) on real hosts: the fleet harness's
three network namespaces with their own dockerd, sshd and nginx (tests/fleet.py), reached by ansible-playbook
over the system ssh with the controller key and strict host key checking.

ansible-core is a dev-only dependency (.ci/install-deps installs it with pip); nothing is installed here. The
playbook runs as written, from docs/examples/ansible/. No community.aws is installed: the ALB tasks are checked
against a stand-in `community.aws.elb_target` written into a private collections path, which proves that the
playbook loads them (and so needs the collection) only when alb_target_group_arn is set.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from fleet import fleet_fixture  # noqa: F401  (the module-scoped `fleet` fixture)
from test_stack_rollout import App, app, break_image_on  # noqa: F401  (`app`: one project on every host, removed after)

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "ansible"
PLAYBOOK = EXAMPLE / "deploy.yml"
ARN = "arn:aws:elasticloadbalancing:ap-northeast-2:123456789012:targetgroup/fa/0123456789abcdef"
COPY_TASK = "Install bluegreen.pyz (copied only when it differs from the controller's)"
PULL_TASK = "Pull the image (bluegreen pull, with the project's PULL policy)"
DEPLOY_TASK = "Deploy (bluegreen deploy)"
FAIL_TASK = "Stop here if the deploy failed"

# An aggregate callback that appends every task result to $BG_ANSIBLE_RECORD as one JSON line: which play, task,
# module and host, and whether it was ok, changed, failed or skipped (ansible-core ships no JSON callback).
RECORDER = '''\
import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: bg_record
type: aggregate
short_description: every task result as one JSON line in $BG_ANSIBLE_RECORD (tests/test_stack_ansible.py)
description: [every task result as one JSON line]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "bg_record"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.play = ""

    def v2_playbook_on_play_start(self, play):
        self.play = play.get_name()

    def _record(self, result, status):
        res = getattr(result, "result", None)  # ansible-core 2.19 and later; _result before
        res = res if isinstance(res, dict) else result._result
        task = getattr(result, "task", None) or result._task
        host = getattr(result, "host", None) or result._host
        keep = ("rc", "msg", "stdout", "stderr", "skipped", "failed_when_result")
        line = {"play": self.play, "task": task.get_name(), "action": task.action, "host": host.get_name(),
                "status": status, "changed": bool(res.get("changed")),
                "args": (res.get("invocation") or {}).get("module_args"),
                **{k: res[k] for k in keep if k in res}}
        with open(os.environ["BG_ANSIBLE_RECORD"], "a") as fh:
            fh.write(json.dumps(line, default=str) + "\\n")

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")
'''

# Stands in for community.aws.elb_target (same options; no AWS): it only says it changed the target.
ELB_TARGET_STUB = '''\
#!/usr/bin/python
from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(argument_spec=dict(
        target_group_arn=dict(type="str"), target_id=dict(type="str", required=True), target_port=dict(type="int"),
        region=dict(type="str"), state=dict(type="str", required=True, choices=["present", "absent"]),
        target_status=dict(type="str"), target_status_timeout=dict(type="int", default=60)),
        supports_check_mode=True)
    module.exit_json(changed=True)


if __name__ == "__main__":
    main()
'''


def ansible_playbook_path() -> str:
    """ansible-playbook of this interpreter: pip puts it in the interpreter's scripts directory, which is not on
    PATH under pyenv (until `pyenv rehash`) or in a virtualenv that is not activated."""
    here = Path(sysconfig.get_path("scripts")) / "ansible-playbook"
    found = str(here) if os.access(here, os.X_OK) else shutil.which("ansible-playbook")
    assert found, f"ansible-playbook is needed (.ci/install-deps installs ansible-core with {sys.executable} -m pip)"
    return found


class Ansible:
    """ansible-playbook with a private configuration: its own config file, home, temp directories and ssh
    control sockets, an inventory of the fleet's hosts, and a recording callback."""

    def __init__(self, fleet, stack, work: Path) -> None:
        self.fleet, self.stack, self.work = fleet, stack, work
        self.playbook_cmd = ansible_playbook_path()
        self.inventory = work / "inventory.ini"
        self.record = work / "record.jsonl"
        self.control = work / "cp"
        for d in ("home", "local", "remote", "callbacks", "no-collections", "cp",
                  "collections/ansible_collections/community/aws/plugins/modules"):
            (work / d).mkdir(parents=True, exist_ok=True)
        (work / "callbacks" / "bg_record.py").write_text(RECORDER)
        (work / "collections/ansible_collections/community/aws/plugins/modules/elb_target.py").write_text(ELB_TARGET_STUB)
        self.config = work / "ansible.cfg"
        self.config.write_text("[defaults]\nhost_key_checking = True\nretry_files_enabled = False\n")
        ssh_args = (f"-F {fleet.ssh_config} -o UserKnownHostsFile={fleet.known_hosts} "
                    "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes")
        hosts = "".join(
            f"{h.name} ansible_host={h.addr} bluegreen_root={h.deploy_root} alb_target_id=i-{h.name}\n"
            for h in fleet.hosts)
        self.inventory.write_text(
            f"[bluegreen]\n{hosts}\n[bluegreen:vars]\nansible_user=root\n"
            f"ansible_ssh_private_key_file={fleet.client_key}\nansible_ssh_common_args='{ssh_args}'\n"
            "ansible_python_interpreter=/usr/bin/python3\nbluegreen_become=false\n")

    def env(self, alb: bool) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "BLUEGREEN_"))}
        w = self.work
        env.update({
            "ANSIBLE_CONFIG": str(self.config),  # never an ansible.cfg of the cwd, the home or /etc
            "ANSIBLE_HOME": str(w / "home"),
            "ANSIBLE_LOCAL_TEMP": str(w / "local"),
            "ANSIBLE_REMOTE_TEMP": str(w / "remote"),  # the hosts share this machine's file system
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.control),
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_TIMEOUT": "20",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_CALLBACK_PLUGINS": str(w / "callbacks"),
            "ANSIBLE_CALLBACKS_ENABLED": "bg_record",
            # ansible-core alone, unless a run asks for the stand-in community.aws
            "ANSIBLE_COLLECTIONS_PATH": str(w / ("collections" if alb else "no-collections")),
            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
            "BG_ANSIBLE_RECORD": str(self.record),
        })
        return env

    def argv(self, *args: str, alb: bool = False) -> list:
        argv = [self.playbook_cmd, "-i", str(self.inventory), str(PLAYBOOK),
                "-e", f"bluegreen_pyz_src={self.stack.pyz}", *args]
        if alb:
            argv += ["-e", f"alb_target_group_arn={ARN}", "-e", "alb_timeout=30"]
        return argv

    def start(self, *args: str, alb: bool = False) -> subprocess.Popen:
        """ansible-playbook in its own session: a signal to its process group reaches its workers and their ssh
        clients too, as Ctrl-C in a terminal does."""
        self.record.write_text("")
        return subprocess.Popen(self.argv(*args, alb=alb), cwd=self.work, env=self.env(alb), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL, start_new_session=True)

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float) -> str:
        """Its output once it exits; after `timeout` seconds its whole process group is killed (and it fails)."""
        try:
            return proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out = proc.communicate()[0]
            pytest.fail(f"ansible-playbook ran longer than {timeout:g}s:\n{out}")

    def run(self, *args: str, alb: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = self.start(*args, alb=alb)
        try:
            out = self.finish(proc, timeout)
        finally:
            if proc.poll() is None:  # interrupted (the test itself was stopped)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out)
        done.records = json_lines(self.record)
        return done

    def deploy(self, app: App, tag: str, *args: str, alb: bool = False) -> subprocess.CompletedProcess:
        return self.run("-e", f"project={app.name}", "-e", f"tag={tag}", *args, alb=alb)

    def close(self) -> None:
        """Stop the ssh control masters ansible left (ControlPersist)."""
        for sock in self.control.iterdir() if self.control.exists() else ():
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "bluegreen-test"], timeout=20,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def ansible(fleet, stack):
    work = Path(tempfile.mkdtemp(prefix="bg-ansible-"))
    a = None
    try:
        a = Ansible(fleet, stack, work)
        yield a
    finally:
        try:
            if a is not None:
                a.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)


def json_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def results(proc, task: str) -> dict:
    """{host: record} of one task (by name) in a run."""
    return {r["host"]: r for r in proc.records if r["task"] == task}


def alb_calls(proc) -> list:
    """(host, state) of every elb_target call, in order."""
    return [(r["host"], r["args"]["state"]) for r in proc.records if r["action"] == "community.aws.elb_target"]


def deployed_tags(app, h) -> list:
    return [e["tag"] for e in app.journal(h) if e.get("action") == "deploy" and e["result"] == "deployed"]


def fleet_status_of(app) -> subprocess.CompletedProcess:
    """`bluegreen status PROJECT --hosts h1,h2,h3` from the controller, over the harness's ssh config."""
    hosts = ",".join(h.name for h in app.fleet.hosts)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}
    return subprocess.run([sys.executable, app.stack.pyz, "status", app.name, "--hosts", hosts, "--ssh-config",
                           app.fleet.ssh_config], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=120, env=env)


def test_the_example_playbook_and_inventory_parse():
    work = Path(tempfile.mkdtemp(prefix="bg-ansible-"))
    try:
        (work / "ansible.cfg").write_text("[defaults]\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update(ANSIBLE_CONFIG=str(work / "ansible.cfg"), ANSIBLE_HOME=str(work / "home"),
                   ANSIBLE_LOCAL_TEMP=str(work / "local"), ANSIBLE_COLLECTIONS_PATH=str(work / "none"),
                   ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="False", ANSIBLE_NOCOLOR="1")
        playbook = ansible_playbook_path()
        # With ansible-core alone (no collection anywhere): the ALB tasks are not loaded by the syntax check.
        check = subprocess.run([playbook, "--syntax-check", "-i", str(EXAMPLE / "inventory.ini"), str(PLAYBOOK)],
                               cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        inventory = subprocess.run([str(Path(playbook).with_name("ansible-inventory")), "-i",
                                    str(EXAMPLE / "inventory.ini"), "--list"],
                                   cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert inventory.returncode == 0, inventory.stdout + inventory.stderr
        assert json.loads(inventory.stdout)["bluegreen"]["hosts"] == ["app-1", "app-2"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_playbook_deploys_every_host_and_copies_the_tool_only_when_it_changed(app, ansible):
    data = Path(app.stack.pyz).read_bytes()
    h1 = app.fleet.hosts[0]
    Path(h1.deploy_root, "bluegreen.pyz").write_bytes(b"#!/usr/bin/env python3\nprint('old tool')\n")
    for h in app.fleet.hosts[1:]:
        Path(h.deploy_root, "bluegreen.pyz").unlink(missing_ok=True)

    first = ansible.deploy(app, "v1")
    assert first.returncode == 0, first.stdout
    assert app.versions() == ["v1", "v1", "v1"]
    hosts = [h.name for h in app.fleet.hosts]
    assert {h: r["changed"] for h, r in results(first, COPY_TASK).items()} == {h: True for h in hosts}
    for h in app.fleet.hosts:
        remote = Path(h.deploy_root, "bluegreen.pyz")
        st = remote.stat()
        assert remote.read_bytes() == data and stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == 0 and st.st_gid == 0
    assert alb_calls(first) == [] and "fleet-s3cret" not in first.stdout

    # --check: doctor and deploy --dry-run, nothing changes.
    dry = ansible.deploy(app, "v2", "--check")
    assert dry.returncode == 0, dry.stdout
    assert app.versions() == ["v1", "v1", "v1"]
    assert all(r["status"] == "skipped" for r in results(dry, PULL_TASK).values()), dry.stdout
    deploys = results(dry, DEPLOY_TASK)
    assert sorted(deploys) == hosts and not any(r["changed"] for r in deploys.values()), dry.stdout
    assert all(f"Dry run: deploy {app.fleet.image_repo}:v2" in r["stdout"] for r in deploys.values()), dry.stdout

    # v2 between the ALB tasks (the stand-in community.aws): host by host, out, deploy, back in.
    second = ansible.deploy(app, "v2", alb=True)
    assert second.returncode == 0, second.stdout
    assert app.versions() == ["v2", "v2", "v2"]
    assert {h: (r["status"], r["changed"]) for h, r in results(second, COPY_TASK).items()} == {
        h: ("ok", False) for h in hosts}
    for h in app.fleet.hosts:
        assert Path(h.deploy_root, "bluegreen.pyz").read_bytes() == data
        assert deployed_tags(app, h) == ["v1", "v2"]
        assert app.journal(h)[-1]["exit_code"] == 0
    # Every pull (play 1) before any deploy (play 2); per host: deregister, deploy, register, then the next host.
    order = [(r["host"], r["task"]) for r in second.records if r["task"] in (PULL_TASK, DEPLOY_TASK)
             or r["action"] == "community.aws.elb_target"]
    assert sorted(order[:3]) == [(h, PULL_TASK) for h in hosts], order
    assert [(h, t if t == DEPLOY_TASK else "alb") for h, t in order[3:]] == [
        (h, step) for h in hosts for step in ("alb", DEPLOY_TASK, "alb")], order
    assert alb_calls(second) == [(h, s) for h in hosts for s in ("absent", "present")]
    calls = [r["args"] for r in second.records if r["action"] == "community.aws.elb_target"]
    assert calls[0]["target_group_arn"] == ARN and calls[0]["target_id"] == "i-h1"
    assert [(c["target_status"], c["target_status_timeout"]) for c in calls[:2]] == [("unused", 30), ("healthy", 30)]
    assert all(r["changed"] for r in results(second, DEPLOY_TASK).values())
    # The fleet as `bluegreen status --hosts` sees it after the playbook: one healthy version everywhere.
    fleet_status = fleet_status_of(app)
    assert fleet_status.returncode == 0, fleet_status.stdout + fleet_status.stderr
    assert "fleet: ok, 3 host(s) serve v2" in fleet_status.stdout


def test_a_host_whose_deploy_fails_stops_the_play_there(app, ansible):
    assert ansible.deploy(app, "v1").returncode == 0
    h1, h2, h3 = app.fleet.hosts
    break_image_on(app, h2)
    proc = ansible.deploy(app, "v2", alb=True)
    assert proc.returncode == 2, proc.stdout  # ansible-playbook: a host failed
    assert app.versions() == ["v2", "v1", "v1"]
    assert sorted(results(proc, PULL_TASK)) == ["h1", "h2", "h3"]  # play 1 ran on every host
    deploys = results(proc, DEPLOY_TASK)
    assert {h: r["rc"] for h, r in deploys.items()} == {"h1": 0, "h2": 1}, proc.stdout
    assert deploys["h1"]["changed"] and not deploys["h2"]["changed"]
    failed = results(proc, FAIL_TASK)["h2"]
    assert failed["status"] == "failed", failed
    assert "exited 1: the deploy failed and the previous version still serves" in failed["msg"], failed
    assert "still serves. bluegreen: " in failed["msg"] and "HEALTH_TIMEOUT" in failed["msg"], failed  # bluegreen's own
    # Like rollout's after-host hook, h2 went back into the target group (its v1 still serves); h3 was not touched.
    assert alb_calls(proc) == [("h1", "absent"), ("h1", "present"), ("h2", "absent"), ("h2", "present")]
    assert not [r for r in proc.records if r["host"] == "h3" and r["play"] == "Deploy host by host"]
    last = app.journal(h2)[-1]
    assert (last["tag"], last["result"], last["exit_code"], last["failed_step"]) == ("v2", "failed", 1, "health")
    assert deployed_tags(app, h1) == ["v1", "v2"] and [e["tag"] for e in app.journal(h3)] == ["v1"]
    # `status --hosts` names the skew the stopped play left.
    skew = fleet_status_of(app)
    assert skew.returncode == 1 and "version skew: v1 on h2, h3; v2 on h1" in skew.stdout, skew.stdout + skew.stderr


def test_a_frozen_host_stops_everything_before_any_pull(app, ansible):
    h3 = app.fleet.hosts[2]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}, "BLUEGREEN_ROOT": h3.deploy_root}
    lock = subprocess.run([sys.executable, app.stack.pyz, "lock", app.name, "-m", "incident 42"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert lock.returncode == 0, lock.stderr
    proc = ansible.deploy(app, "v1")
    assert proc.returncode == 2, proc.stdout
    refused = [r for r in proc.records if r["status"] == "failed"]
    assert [r["host"] for r in refused] == ["h3"], refused
    assert refused[0]["msg"].startswith(f"{app.name} on h3: is frozen by root since "), refused
    assert refused[0]["msg"].endswith(": incident 42. Nothing was pulled or deployed on any host."), refused
    assert not results(proc, PULL_TASK) and not results(proc, DEPLOY_TASK)
    assert app.versions() == [None, None, None]
    assert all(app.journal(h) == [] for h in app.fleet.hosts)


def test_ctrl_c_stops_the_playbook_but_not_the_deploy_in_progress(app, ansible):
    """What docs/ansible.md says about an interrupted playbook: the host being deployed finishes its deploy (an ssh
    session without a terminal passes no signal on); no later task runs, and no later host is touched."""
    assert ansible.deploy(app, "v1").returncode == 0
    h1, h2, h3 = app.fleet.hosts
    proc = ansible.start("-e", f"project={app.name}", "-e", "tag=slow")
    try:
        deadline, started = time.monotonic() + 300, False
        while not started and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)  # until h2's deploy has started the image that boots in 3 s
            started = bool(h2.docker("ps", "-q", "--filter", f"name={app.name}-green", check=False).stdout.strip())
        assert started and proc.poll() is None, ansible.finish(proc, timeout=60)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        out = ansible.finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 99 and "User interrupted execution" in out, out  # ansible-playbook's code for it
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not deployed_tags(app, h2)[-1:] == ["slow"]:
        time.sleep(0.5)
    assert deployed_tags(app, h2) == ["v1", "slow"], (out, app.journal(h2))
    assert app.versions() == ["slow", "slow", "v1"] and [e["tag"] for e in app.journal(h3)] == ["v1"]
    assert not [r for r in json_lines(ansible.record) if r["host"] == "h2" and r["task"] == DEPLOY_TASK], out
