"""Pure tests of issue 11's recognition of a container the guide's deploy.sh started (`docker run -d --name
PROJECT-COLOUR -p PORT:8080 IMAGE:TAG`): no bluegreen labels, its port published on every address.

The real-stack test (test_stack_recognise.py) proves the same against real docker and nginx."""

from __future__ import annotations

import json
import os

import pytest

from bluegreen import docker as dk
from bluegreen import journal, status
from bluegreen.config import load_settings, parse_env, project_from_entries
from bluegreen.prune import plan_prune
from bluegreen.runner import RecordingRunner, Result
from test_deploy_logic import env  # noqa: F401  (the fixture: a FakeHost behind a recording runner)

IMAGE = "reg.local/acme/api"
CFG = project_from_entries("api", "api.env", parse_env(f"IMAGE={IMAGE}\n", "api.env"))
SETTINGS = load_settings("/opt/deploy", {}, euid=0)


def inspected(*, name="api-blue", image=f"{IMAGE}:v1", labels=None, status="running", bindings=None, live=None):
    """One item of `docker container inspect`, shaped as docker 20.10 prints it (checked against a real one)."""
    return {
        "Id": "c0ffee", "Name": "/" + name, "RestartCount": 0,
        "State": {"Status": status, "ExitCode": 0, "StartedAt": "2026-11-26T00:00:00Z"},
        "Config": {"Image": image, "Labels": labels},
        "HostConfig": {"PortBindings": bindings if bindings is not None else {}},
        "NetworkSettings": {"Ports": live if live is not None else {}},
    }


# `docker run -p 8081:8080` (deploy.sh) and `--publish 127.0.0.1:8081:8080` (bluegreen), as docker reports them.
DEPLOY_SH_BINDINGS = {"8080/tcp": [{"HostIp": "", "HostPort": "8081"}]}
DEPLOY_SH_LIVE = {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8081"}, {"HostIp": "::", "HostPort": "8081"}]}
LOOPBACK_BINDINGS = {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8081"}]}
LABELS = {dk.LABEL_PROJECT: "api", dk.LABEL_COLOUR: "blue", dk.LABEL_TAG: "v1"}


def parse_one(item) -> dk.Container:
    (found,) = dk.parse_inspect(json.dumps([item]))
    return found


# --- parse_inspect: labels and bindings ---------------------------------------------------------------------

def test_a_deploy_sh_container_has_no_labels_and_publishes_on_every_address():
    c = parse_one(inspected(bindings=DEPLOY_SH_BINDINGS, live=DEPLOY_SH_LIVE))
    assert (c.name, c.image, c.labels, c.managed, c.running) == ("api-blue", f"{IMAGE}:v1", {}, False, True)
    # While it runs, what docker forwards now (NetworkSettings.Ports): both address families.
    assert c.bindings == (dk.Binding("8080/tcp", "0.0.0.0", 8081), dk.Binding("8080/tcp", "::", 8081))
    assert [b.address() for b in c.exposed()] == ["0.0.0.0:8081", "[::]:8081"]


def test_a_bluegreen_container_is_managed_and_published_on_loopback_only():
    live = {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8081"}]}
    c = parse_one(inspected(labels=LABELS, bindings=LOOPBACK_BINDINGS, live=live))
    assert c.managed and c.bindings == (dk.Binding("8080/tcp", "127.0.0.1", 8081),)
    assert c.exposed() == () and dk.exposed_note(c) is None


def test_a_stopped_container_keeps_its_configured_bindings_but_exposes_nothing():
    # docker empties NetworkSettings.Ports when the container stops; HostConfig.PortBindings stays.
    c = parse_one(inspected(status="exited", bindings=DEPLOY_SH_BINDINGS, live={}))
    assert c.bindings == (dk.Binding("8080/tcp", "", 8081),) and c.bindings[0].all_addresses
    assert c.exposed() == () and dk.exposed_note(c) is None  # not reachable while it does not run


def test_a_container_without_any_published_port():
    c = parse_one(inspected(bindings=None, live=None))
    assert c.bindings == () and dk.exposed_note(c) is None


@pytest.mark.parametrize("host_ip, every", [
    ("", True), ("0.0.0.0", True), ("::", True), ("[::]", True), ("0:0::0", True),
    ("127.0.0.1", False), ("::1", False), ("10.0.0.5", False), ("localhost", False), ("0", False), (None, False), (0, False),
])
def test_which_host_ips_mean_every_address(host_ip, every):
    assert dk.on_all_addresses(host_ip) is every


HOSTILE = [
    None, 1, "x", [], True, {"8080/tcp": "0.0.0.0:8081"}, {"8080/tcp": [None, 1, "s", [], {"HostIp": 5, "HostPort": "8081"}]},
    {"8080/tcp": [{"HostIp": "", "HostPort": "65536"}, {"HostIp": "", "HostPort": "-1"}, {"HostIp": "", "HostPort": "8O81"},
                  {"HostIp": "", "HostPort": True}, {"HostIp": "", "HostPort": 8.5}, {"HostIp": "", "HostPort": None},
                  {"HostIp": "", "HostPort": "١٢٣"}, {"HostIp": "", "HostPort": {"a": 1}}, {"HostIp": "x" * 100, "HostPort": "1"}]},
]


@pytest.mark.parametrize("ports", HOSTILE)
def test_hostile_port_maps_give_no_binding_and_never_crash(ports):
    c = parse_one(inspected(bindings=ports, live=ports))
    assert c.bindings == () and dk.exposed_note(c) is None


def test_good_bindings_survive_next_to_hostile_ones_and_a_port_docker_picks():
    ports = {"8080/tcp": [None, {"HostIp": "", "HostPort": "8081"}, {"HostPort": 9090}, {"HostIp": "", "HostPort": ""}]}
    c = parse_one(inspected(bindings=ports, live=ports))
    assert c.bindings == (dk.Binding("8080/tcp", "", 8081), dk.Binding("8080/tcp", "", 9090), dk.Binding("8080/tcp", "", None))
    assert [b.address() for b in c.exposed()] == ["*:8081", "*:9090", "*:?"]
    # Not from JSON (its keys are strings), but parse_bindings takes any object.
    assert dk.parse_bindings({5: [{"HostIp": "", "HostPort": "1"}], "1/udp": [{"HostIp": "", "HostPort": "1"}] * 3}) == (
        dk.Binding("1/udp", "", 1),)
    many = {"8080/tcp": [{"HostIp": "", "HostPort": str(p)} for p in range(1, 5000)]}
    assert len(dk.parse_bindings(many)) == dk.MAX_BINDINGS


@pytest.mark.parametrize("field, value", [
    ("State", "running"), ("State", [1]), ("Config", None), ("Config", "x"), ("Name", 5), ("Id", {}),
    ("RestartCount", "3"), ("RestartCount", True), ("HostConfig", 7), ("NetworkSettings", [None]),
])
def test_a_field_of_the_wrong_type_reads_as_absent(field, value):
    item = inspected(labels=LABELS, bindings=DEPLOY_SH_BINDINGS)
    item[field] = value
    parse_one(item)  # never raises


def test_wrong_types_inside_state_and_config_read_as_absent():
    item = inspected()
    item["State"] = {"Status": 1, "ExitCode": "3", "StartedAt": None}
    item["Config"] = {"Image": ["a"], "Labels": {"bluegreen.tag": 5, "ok": "yes", "n": None}}
    c = parse_one(item)
    assert (c.status, c.exit_code, c.image, c.labels, c.started_at) == ("", 0, "", {"ok": "yes"}, "")


def test_items_that_are_not_containers_are_skipped_and_a_non_list_is_refused():
    found = dk.parse_inspect(json.dumps([None, 3, "x", [], inspected()]))
    assert [c.name for c in found] == ["api-blue"]
    for text in ('{"Name": "/api-blue"}', '"x"', "3", "[" * 100000 + "]" * 100000):
        with pytest.raises(ValueError):
            dk.parse_inspect(text)


def test_inspect_many_turns_garbage_into_a_command_error_not_a_crash():
    runner = RecordingRunner(responder=lambda argv: Result(tuple(argv), 0, '{"not": "a list"}', ""))
    with pytest.raises(dk.CommandError):
        dk.Docker(runner, ("docker",)).inspect_many(["api-blue"])


# --- tag_in ----------------------------------------------------------------------------------------------------

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("image, labels, tag", [
    (f"{IMAGE}:v1", None, "v1"),  # deploy.sh
    (f"{IMAGE}:1.2.3-rc_1", {}, "1.2.3-rc_1"),
    (IMAGE, None, "latest"),  # `docker run IMAGE` runs IMAGE:latest
    (f"{IMAGE}@{DIGEST}", None, DIGEST),  # what runs, and what `deploy PROJECT sha256:...` deploys again
    (f"{IMAGE}:v1@{DIGEST}", None, DIGEST),  # docker ignores the tag next to a digest
    (f"{IMAGE}@sha256:short", None, None),
    (f"{IMAGE}:sha256:{'ab' * 32}", None, None),  # no docker reference
    (f"{IMAGE}:-bad", None, None),
    (f"{IMAGE}:a..b", None, None),
    (f"{IMAGE}/sub:v1", None, None),  # another repository
    (f"{IMAGE}2:v1", None, None),
    ("other/app:v1", None, None),
    ("", None, None),
    (f"{IMAGE}:v1", {dk.LABEL_TAG: "v9"}, "v9"),  # bluegreen's label wins
    (f"{IMAGE}@{DIGEST}", {dk.LABEL_TAG: "v1"}, "v1"),  # a rollback by digest is labelled with its tag
    (f"{IMAGE}:v1", {dk.LABEL_TAG: "--privileged"}, None),  # a label that is no tag is not believed
    (f"{IMAGE}:v1", {"com.example": "x"}, "v1"),  # someone else's labels: still deploy.sh's
])
def test_tag_in_reads_the_label_else_the_image_reference(image, labels, tag):
    c = parse_one(inspected(image=image, labels=labels))
    assert c.tag_in(IMAGE) == tag


def test_tag_in_of_a_container_built_by_hand():
    c = dk.Container(name="api-blue", id="", status="running", exit_code=0, image=f"{IMAGE}:v1")
    assert c.tag_in(IMAGE) == "v1" and c.tag_in("") is None and c.tag_in(IMAGE + ":") is None


# --- exposed_note ----------------------------------------------------------------------------------------------

def test_exposed_note_names_the_addresses_the_reason_and_what_ends_it():
    note = dk.exposed_note(parse_one(inspected(bindings=DEPLOY_SH_BINDINGS, live=DEPLOY_SH_LIVE)))
    assert note.startswith("api-blue publishes its port on every address of this host (0.0.0.0:8081, [::]:8081)")
    assert "reachable directly, around nginx and bypassing it" in note and "other hosts in the VPC" in note
    assert "The next bluegreen deploy of this project replaces it with a container published on 127.0.0.1 only" in note
    assert "\n" not in note


# --- rollback target -------------------------------------------------------------------------------------------

def entry(tag, result="deployed", from_tag=None, action="deploy"):
    return journal.Entry(time="2026-11-26T00:00:00+00:00", host="h", user="u", project="api", action=action,
                         tag=tag, result=result, exit_code=0 if result == "deployed" else 1, from_tag=from_tag)


def test_rollback_after_the_first_deploy_over_deploy_sh_goes_to_what_served_before():
    # deploy.sh ran v1 (no journal); bluegreen deployed v2 over it.
    entries = [entry("v2", from_tag="v1")]
    assert journal.rollback_target(entries, "v2") == "v1"
    assert journal.rollback_candidates(entries) == ["v2", "v1"]
    # Then the rollback itself is journaled: back from v1 goes to v2, as before.
    entries.append(entry("v1", from_tag="v2", action="rollback"))
    assert journal.rollback_target(entries, "v1") == "v2"


def test_rollback_fallback_skips_what_serves_and_unknown_or_failed_from_tags():
    # Redeploying v2 over itself: the newest deploy's from_tag is v2, what served before the first one is v1.
    assert journal.rollback_target([entry("v2", from_tag="v1"), entry("v2", from_tag="v2")], "v2") == "v1"
    # The first deploy ever (nothing served before): nothing to fall back to.
    assert journal.rollback_target([entry("v1")], "v1") is None
    # A failed deploy proves nothing about what served before it.
    assert journal.rollback_target([entry("v2"), entry("v3", "failed", from_tag="v9")], "v2") is None
    # A from_tag that is what serves is no target.
    assert journal.rollback_target([entry("v2", from_tag="v2")], "v2") is None


def test_rollback_target_prefers_successful_tags_as_before():
    entries = [entry("v1", from_tag="v0"), entry("v2", from_tag="v1"), entry("v3", "failed", from_tag="v2")]
    assert journal.rollback_target(entries, "v2") == "v1"
    assert journal.rollback_target(entries, "v1") == "v2"
    assert journal.rollback_candidates(entries) == ["v2", "v1", "v0"]
    assert journal.rollback_target([], None) is None


# --- prune -----------------------------------------------------------------------------------------------------

def test_prune_keeps_the_serving_deploy_sh_container_and_its_image():
    blue = parse_one(inspected(bindings=DEPLOY_SH_BINDINGS, live=DEPLOY_SH_LIVE))
    plan = plan_prune(image=IMAGE, containers=[blue], serving="api-blue", image_tags=["v0", "v1"], successful=[], keep=3)
    assert plan.containers == [] and plan.images == [f"{IMAGE}:v0"] and plan.kept == ["v1 (serving)"]


def test_prune_keeps_a_stopped_serving_deploy_sh_container_and_its_image():
    blue = parse_one(inspected(status="exited", bindings=DEPLOY_SH_BINDINGS))
    plan = plan_prune(image=IMAGE, containers=[blue], serving="api-blue", image_tags=["v1"], successful=[], keep=0)
    assert plan.containers == [] and plan.images == [] and plan.kept == ["v1 (serving)"]


def test_prune_after_the_first_deploy_keeps_the_deploy_sh_version_as_the_rollback_target():
    blue = parse_one(inspected(status="exited", bindings=DEPLOY_SH_BINDINGS))
    green = parse_one(inspected(name="api-green", image=f"{IMAGE}:v2", labels={**LABELS, dk.LABEL_TAG: "v2"}))
    plan = plan_prune(image=IMAGE, containers=[blue, green], serving="api-green", image_tags=["v0", "v1", "v2"],
                      successful=journal.rollback_candidates([entry("v2", from_tag="v1")]), keep=3)
    assert plan.containers == ["api-blue"]  # stopped and not serving, as any retired container
    assert plan.images == [f"{IMAGE}:v0"] and plan.kept == ["v2 (serving)", "v1 (rollback target)"]


# --- status ----------------------------------------------------------------------------------------------------

def status_of(tmp_path, items, *, upstream_port=8081, active="blue", probe_status=200):
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "api.env").write_text(f"IMAGE={IMAGE}\nBLUE_PORT=8081\nGREEN_PORT=8082\n")
    (tmp_path / "projects" / "api.active").write_text(active + "\n")
    (tmp_path / "nginx" / "conf.d").mkdir(parents=True)
    # As the guide writes it by hand: no probe token, so status sees only the answer's status.
    (tmp_path / "nginx" / "conf.d" / "api-upstream.conf").write_text(f"upstream api {{\n    server 127.0.0.1:{upstream_port};\n}}\n")
    # A live pid stands for nginx's master (this test's own process): status finds nginx running.
    (tmp_path / "nginx.pid").write_text(f"{os.getpid()}\n")
    settings = load_settings(str(tmp_path), {"BLUEGREEN_NGINX_PID_FILE": str(tmp_path / "nginx.pid")}, euid=0)
    names = {i["Name"].lstrip("/") for i in items}

    def respond(argv):
        if argv[:3] == ("docker", "container", "inspect"):
            missing = [f"Error: No such container: {n}" for n in argv[3:] if n not in names]
            return Result(tuple(argv), 1 if missing else 0, json.dumps(items), "\n".join(missing))
        return Result(tuple(argv), 0, "", "")

    def probe(url, timeout, host="", headers=None):
        from bluegreen.health import Probe
        return Probe(probe_status, f"HTTP {probe_status}")

    (ps,) = status.collect(settings, ["api"], RecordingRunner(responder=respond), probe=probe, live_health=True)
    return ps, settings


def test_status_of_a_deploy_sh_container_shows_its_tag_serving_and_warns_without_drift(tmp_path):
    ps, settings = status_of(tmp_path, [inspected(bindings=DEPLOY_SH_BINDINGS, live=DEPLOY_SH_LIVE)])
    assert (ps.serving, ps.tag, ps.drift) == ("blue", "v1", [])
    blue, green = ps.colours
    assert (blue.state, blue.tag, blue.managed, blue.healthy) == ("running", "v1", False, True)
    assert blue.exposed and "every address of this host (0.0.0.0:8081, [::]:8081)" in blue.exposed
    assert (green.state, green.exposed) == ("absent", None)
    # The warning is informational: it is no drift and no failed check. (The hand-written upstream has no probe
    # token, so the route cannot be proven: that, not the warning, is why the verdict is degraded here.)
    assert ps.verdict == status.DEGRADED and [c.name for c in ps.checks if not c.ok] == ["route"]
    text = status.render(ps, settings)
    blue_line = [ln for ln in text.splitlines() if ln.startswith("  blue ")][0]
    assert "running, health HTTP 200 tag v1" in blue_line and "no bluegreen labels" in blue_line
    assert "              warning: api-blue publishes its port on every address" in text
    assert "no drift" in text
    assert "warning: api-blue published on every address" in status.render_line(ps)
    assert json.loads(status.to_json([ps]))[0]["colours"][0]["exposed"] == blue.exposed


def test_the_exposure_warning_never_changes_the_verdict(tmp_path):
    live = parse_one(inspected(bindings=DEPLOY_SH_BINDINGS, live=DEPLOY_SH_LIVE))
    colours = [status.ColourState("blue", "api-blue", 8081, "running", live.tag_in(IMAGE), None, "HTTP 200", True,
                                  live.managed, dk.exposed_note(live)),
               status.ColourState("green", "api-green", 8082, "absent")]
    assert status.find_drift(CFG, SETTINGS, serving="blue", active="blue", upstream_port=8081, colours=colours,
                             nginx_route=8081) == []
    from bluegreen.health import Probe
    verdict, checks = status.judge(CFG, nginx=status.NginxState(True, 42, "/run/nginx.pid"),
                                   answer=Probe(200, "HTTP 200", {"X-Bluegreen-Upstream": "127.0.0.1:8081"}),
                                   nginx_route=8081, serving="blue", colours=colours, drift=[])
    assert verdict == status.OK and all(c.ok for c in checks)


def test_status_of_a_stopped_deploy_sh_container_has_no_warning(tmp_path):
    ps, settings = status_of(tmp_path, [
        inspected(status="exited", bindings=DEPLOY_SH_BINDINGS),
        inspected(name="api-green", image=f"{IMAGE}:v2", labels={**LABELS, dk.LABEL_TAG: "v2"},
                  bindings={"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8082"}]},
                  live={"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8082"}]}),
    ], upstream_port=8082, active="green")
    assert (ps.serving, ps.tag, ps.drift) == ("green", "v2", [])
    assert [(c.tag, c.managed, c.exposed) for c in ps.colours] == [("v1", False, None), ("v2", True, None)]
    assert "warning" not in status.render(ps, settings) and "warning" not in status.render_line(ps)


# --- deploy over a deploy.sh container -------------------------------------------------------------------------

def deploy_sh_host(env):  # noqa: F811
    """The state deploy.sh leaves: api-blue runs IMAGE:v1 on every address, the upstream and active file name blue."""
    env.host.containers["api-blue"] = inspected(bindings=DEPLOY_SH_BINDINGS, live=DEPLOY_SH_LIVE)
    conf = env.root / "nginx" / "conf.d"
    conf.mkdir(parents=True)
    (conf / "api-upstream.conf").write_text("upstream api {\n    server 127.0.0.1:8081;\n}\n")
    (env.root / "projects" / "api.active").write_text("blue\n")


def test_a_deploy_over_deploy_sh_names_the_old_tag_warns_and_retires_it(env):  # noqa: F811
    deploy_sh_host(env)
    summary = env.deploy("v2")
    assert "api v2 now serves from api-green on 127.0.0.1:8082 (was v1 in api-blue)" in summary
    assert env.host.containers["api-blue"]["State"]["Status"] == "exited"  # retired as usual: stopped, kept
    warnings = [ln for ln in env.err.getvalue().splitlines() if ln.startswith("warning: api-blue")]
    assert len(warnings) == 1
    assert ("warning: api-blue, which serves now, publishes its port on every address of this host (0.0.0.0:8081, "
            "[::]:8081), not on 127.0.0.1 only: the app is reachable directly, around nginx and bypassing it") in warnings[0]
    assert "This deploy replaces it: api-green is published on 127.0.0.1:8082 only" in warnings[0]
    # The warning comes before the deploy changes anything.
    err = env.err.getvalue()
    assert err.index("warning: api-blue") < err.index("[1/6] pull")


def test_the_next_deploy_after_that_says_nothing_about_addresses(env):  # noqa: F811
    deploy_sh_host(env)
    env.deploy("v2")
    env.err.truncate(0)
    env.err.seek(0)
    summary = env.deploy("v3")
    assert "(was v2 in api-green)" in summary and "every address" not in env.err.getvalue()


def test_the_journal_gets_the_deploy_sh_tag_as_from_tag(env):  # noqa: F811
    from bluegreen.attempt import _finish
    from bluegreen.deploy import Deployer, Progress, read_plan

    deploy_sh_host(env)
    plan, _ = read_plan(env.settings, env.cfg, "v2")
    d = Deployer(settings=env.settings, runner=env.runner, progress=Progress(env.err), probe=lambda *a, **k: None,
                 port_busy=lambda p: False)
    d.check(plan)
    assert d.old_tag == "v1"
    progress = Progress(env.err)
    done = _finish(entry("v2", result="pending"), d, progress, 1.0, 0, "ok")
    assert done.from_tag == "v1" and done.result == journal.RESULT_DEPLOYED
    # And what the journal then says is where a rollback goes.
    assert journal.rollback_target(list(journal.parse_lines([done.to_json()])), "v2") == "v1"


def test_rollback_before_any_bluegreen_deploy_says_why_the_deploy_sh_version_is_unknown(env):  # noqa: F811
    import io

    from bluegreen.attempt import rollback_project
    from bluegreen.errors import UsageError

    deploy_sh_host(env)
    with pytest.raises(UsageError) as exc:
        rollback_project(settings=env.settings, project="api", to=None, wait=0, dry_run=False, stdout=io.StringIO(),
                         stderr=io.StringIO(), environ={}, runner=env.runner)
    assert exc.value.message.startswith(
        "Nothing to roll back to for api: the deploy journal has no successful deploy (a version deployed before "
        "bluegreen, e.g. by deploy.sh, is not in it until bluegreen deploys over it). Nothing was changed.")
    assert [c[1] for c in env.runner.calls] == ["container"]  # it only looked
