"""The fleet's day-2 decisions (pure): one rollback tag for every host, the fleet's status verdict, merged
history, the job summary; and the CLI refusing fleet options without hosts."""

from __future__ import annotations

import io
import json

from hypothesis import given, settings as hsettings, strategies as st

from bluegreen import cli, fleet
from bluegreen.journal import RESULT_DEPLOYED, RESULT_FAILED, Entry


def entry(tag: str, t: int, result: str = RESULT_DEPLOYED, from_tag: str | None = None, host: str = "h") -> Entry:
    return Entry(time=f"2026-12-01T10:00:{t:02d}+00:00", host=host, user="ci", project="api", action="deploy", tag=tag,
                 result=result, from_tag=from_tag)


def test_after_a_split_rollout_the_fleet_goes_back_to_what_the_hosts_that_stayed_serve():
    hosts = {
        "h1": ("v2", [entry("v1", 1), entry("v2", 10, from_tag="v1")]),
        "h2": ("v1", [entry("v1", 2), entry("v2", 11, RESULT_FAILED)]),
        "h3": ("v1", [entry("v1", 3)]),
    }
    assert fleet.rollback_target(hosts) == "v1"


def test_after_a_full_rollout_the_fleet_goes_back_to_the_previous_tag():
    journal = [entry("v0", 1), entry("v1", 5, from_tag="v0"), entry("v2", 9, from_tag="v1")]
    assert fleet.rollback_target({h: ("v2", journal) for h in ("h1", "h2")}) == "v1"


def test_a_tag_one_host_never_had_is_not_a_fleet_target():
    hosts = {"h1": ("v3", [entry("v1", 1), entry("v2", 2), entry("v3", 3)]),
             "h2": ("v3", [entry("v1", 1), entry("v3", 3)])}  # h2 skipped v2
    assert fleet.rollback_target(hosts) == "v1"


def test_no_common_tag_means_no_target():
    hosts = {"h1": ("v1", [entry("v1", 1)]), "h2": ("v1", [entry("v1", 1)])}
    assert fleet.rollback_target(hosts) is None  # every host already serves the only tag
    assert fleet.rollback_target({"h1": ("v2", [entry("v2", 1)]), "h2": ("v3", [entry("v3", 1)])}) is None


def test_what_served_before_bluegreen_counts_as_a_target():
    """A host adopted from deploy.sh: its only record of v0 is the first deploy's from_tag."""
    assert fleet.rollback_target({"h1": ("v1", [entry("v1", 1, from_tag="v0")]),
                                  "h2": ("v1", [entry("v1", 1, from_tag="v0")])}) == "v0"


def status(target: str, tag: str = "v1", verdict: str = "ok", **kw) -> fleet.HostStatus:
    return fleet.HostStatus(target, tag=tag, colour="blue", verdict=verdict, **kw)


def test_the_fleet_verdict_names_skew_unreachable_hosts_and_hosts_down():
    assert fleet.status_verdict([status("h1"), status("h2")]) == (True, [])
    ok, problems = fleet.status_verdict([status("h1"), status("h2", "v2"), status("h3", verdict="down", reason="nginx stopped"),
                                         fleet.HostStatus("h4", error="cannot reach h4")])
    assert not ok and problems == ["unreachable or unknown: h4", "version skew: v1 on h1, h3; v2 on h2",
                                   "h3 is down: nginx stopped"]
    ok, problems = fleet.status_verdict([status("h1", freeze="by ann: incident"), status("h2")])
    assert not ok and problems == ["frozen on h1 only"]
    assert fleet.status_verdict([status("h1", freeze="x"), status("h2", freeze="y")])[0]  # a fleet freeze is in order


def test_a_hosts_status_answer_is_read_whatever_its_shape():
    answer = [{"tag": "v1\x1b[2J", "serving": "green", "verdict": "degraded", "checks": [{"name": "route", "ok": False,
               "detail": "cannot prove"}], "lock": {"tag": "v2", "user": "ann", "since": "now"}, "drift": [{}, {}]}]
    item = fleet.host_status("h1", json.dumps(answer), 1)
    # Not a tag deploy accepts: unknown, never shown.
    assert (item.tag, item.colour, item.verdict, item.reason, item.drift) == ("", "green", "degraded", "cannot prove", 2)
    assert item.lock == "deploy of v2 by ann since now"
    assert fleet.host_status("h1", "not json", 2) is None
    assert fleet.host_status("h1", "[]", 0) is None


@hsettings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20))
def test_any_json_from_a_host_is_a_status_or_none_never_a_crash(value):
    item = fleet.host_status("h1", json.dumps([value]), 0)
    assert item is None or all("\n" not in getattr(item, f) for f in ("tag", "colour", "verdict", "reason", "lock", "freeze"))
    fleet.status_table([item or fleet.HostStatus("h1", error="none")])


def test_history_merges_newest_first_with_each_host():
    merged = fleet.merge_history({"h1": [entry("v1", 1), entry("v2", 9)], "h2": [entry("v1", 3), entry("v2", 12)]})
    assert [(t, e.tag, e.time[-8:-6]) for t, e in merged] == [("h2", "v2", "12"), ("h1", "v2", "09"),
                                                               ("h2", "v1", "03"), ("h1", "v1", "01")]


def test_the_job_summary_is_a_markdown_table_a_host_cannot_break():
    text = fleet.markdown_table("api", "v2", 1, [fleet.HostResult("h1", fleet.OK, "v1", "v2", 3.2),
                                                 fleet.HostResult("h2", fleet.FAILED, "v1", "v1", 1, "health", "a|b\n\x1b[31mred")])
    lines = text.splitlines()
    assert lines[0] == "### bluegreen: api v2: exit 1"
    assert lines[4] == "| h1 | deployed | v1 → v2 | 3.2s |   |"
    assert lines[5] == "| h2 | failed | v1 → v1 | 1.0s | health: a\\|b |"
    link = fleet.markdown_table("api", "v2", 1, [fleet.HostResult("h1", fleet.FAILED, message="[re-run](https://x) <img src=x> ![](y)")])
    assert "| [re-run](" not in link and "\\[re-run\\]\\(https://x\\) \\<img src=x\\> \\!\\[\\]\\(y\\)" in link


def run(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, err.getvalue()


def test_fleet_options_without_hosts_are_refused_not_ignored():
    code, err = run("rollback", "api", "--revert-on-failure")
    assert code == 2 and "--revert-on-failure: only with --hosts" in err
    code, err = run("lock", "api", "-m", "x", "--ssh-config", "/dev/null")
    assert code == 2 and "--ssh-config: only with --hosts" in err
    code, err = run("status", "--hosts", "h1")
    assert code == 2 and "needs the PROJECT" in err
    code, err = run("rollback", "api", "--hosts", "h1", "--skip-preflight")
    assert code == 2 and "name the tag with --to TAG" in err


def test_a_host_whose_serving_tag_is_unknown_never_makes_the_current_tag_the_target():
    journal = [entry("v1", 1), entry("v2", 5, from_tag="v1"), entry("v3", 9, from_tag="v2")]
    assert fleet.rollback_target({"h1": ("v3", journal), "h2": ("v3", journal), "h3": ("", journal)}) == "v2"
    assert fleet.rollback_target({"h1": ("", journal), "h2": ("", journal)}) is None  # nothing known: name it with --to


def test_a_journal_time_that_is_no_time_orders_nothing():
    lying = [Entry(time="9999", host="h", user="u", project="api", action="deploy", tag="v1", result=RESULT_DEPLOYED),
             entry("v2", 5), entry("v3", 9)]
    assert fleet.rollback_target({"h1": ("v3", lying), "h2": ("v3", lying)}) == "v2"
    assert [e.tag for _, e in fleet.merge_history({"h1": lying})] == ["v3", "v2", "v1"]


def test_one_tag_on_two_images_is_skew_and_an_unnamed_version_is_not_ok():
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    ok, problems = fleet.status_verdict([status("h1", "latest", digest=a), status("h2", "latest", digest=b)])
    assert not ok and problems == [f"version skew: latest is 2 different images: {a[:19]}... on h1; {b[:19]}... on h2"]
    ok, problems = fleet.status_verdict([status("h1", ""), status("h2", "")])
    assert not ok and problems == ["version unknown on h1, h2: the serving container's image names no tag of IMAGE"]


def test_host_text_never_issues_a_ci_workflow_command():
    assert fleet.defuse("  ::error title=Deploy OK::fine") == "  \u200b::error title=Deploy OK::fine"
    assert fleet.defuse("x ##[error]y") == "x ##\u200b[error]y"
    row = fleet.table([fleet.HostResult("h1", fleet.FAILED, "v1\n::error::x", "v1", 1, "doctor", "\x1b]0;t\x07 ::stop-commands::z")])
    assert len(row) == 2 and "\n" not in row[1] and "\x1b" not in row[1] and "\x07" not in row[1]
    lines = fleet.status_table([fleet.HostStatus("h1", error="cannot reach\n::error::x")])
    assert len(lines) == 2 and not any(line.lstrip().startswith("::") for line in lines)


def test_an_empty_hosts_is_an_error_never_the_local_command():
    code, err = run("lock", "api", "-m", "x", "--hosts", "")
    assert code == 2 and "no host given" in err
    code, err = run("rollback", "api", "--hosts", "h1", "--wait", "30")
    assert code == 2 and "--wait: not with --hosts" in err


def test_a_hosts_exit_code_outside_ours_is_a_failure():
    from bluegreen.fleetcmd import _code

    assert [_code(c) for c in (0, 1, 2, 3, 4, -9, 124, 126, 127, 255)] == [0, 1, 2, 3, 4, 1, 1, 1, 1, 1]


def preflight(stdout: str, returncode: int = 0, tmp_dir=None):
    """One host's preflight against a crafted answer of its probe (the host's output is untrusted)."""
    import hashlib
    import tempfile
    from pathlib import Path

    from bluegreen import rollout

    pyz = Path(tempfile.mkdtemp()) / "me.pyz"
    pyz.write_bytes(b"tool")
    sha = hashlib.sha256(b"tool").hexdigest()

    class Answer:
        pass

    answer = Answer()
    answer.returncode, answer.stdout, answer.stderr = returncode, stdout.replace("SHA", sha), ""
    ro = rollout.Rollout(settings=None, project="api", tag="v2", targets=[fleet.Target("h1")], ssh=fleet.SshOptions(),
                         remote=rollout.Remote(), pyz=pyz, stdout=io.StringIO(), stderr=io.StringIO(), environ={})
    ro.ssh_run = lambda *a, **k: answer
    (h,) = ro.hosts
    ro.preflight_one(h)
    return h


def report(**found) -> str:
    return json.dumps({"fails": 0, "frozen": None, "locked": None, "sections": [], **found})


def test_a_preflight_answer_of_any_shape_refuses_that_host_and_never_crashes():
    for bad in (report(sections=7), report(sections=[{"checks": 5}]), "[1, 2]", "{" * 100000):
        h = preflight("BLUEGREEN-PROBE\n3.11\nSHA\n" + bad, returncode=1)
        assert h.result.result in (fleet.REFUSED, "ready"), bad[:40]
        assert h.result.result == "ready" or h.result.message
    huge = preflight("BLUEGREEN-PROBE\n" + "9" * 5000 + ".11\nSHA\n")
    assert huge.result.result == fleet.REFUSED


def test_a_login_banner_before_the_probe_is_skipped_and_no_probe_at_all_is_named():
    fine = preflight("Welcome to h1!\nBLUEGREEN-PROBE\n3.11\nSHA\n" + report())
    assert fine.result.result == "ready", fine.result.message
    odd = preflight("Welcome to h1!\n")
    assert odd.result.result == fleet.REFUSED and "unexpected output instead of the probe's answer: 'Welcome to h1!'" in odd.result.message


def test_a_serving_tag_that_is_no_tag_is_unknown():
    serving = {"name": "serving", "status": "ok", "detail": "", "fix": "", "facts": {"tag": "v1\n::error::x"}}
    h = preflight("BLUEGREEN-PROBE\n3.11\nSHA\n" + report(sections=[{"title": "p", "checks": [serving]}]))
    assert h.result.result == "ready" and h.before == ""
    serving["facts"] = {"tag": "v1"}
    assert preflight("BLUEGREEN-PROBE\n3.11\nSHA\n" + report(sections=[{"title": "p", "checks": [serving]}])).before == "v1"
