"""The day-2 commands on a fleet (`status`, `history`, `lock`, `unlock`, `prune` with `--hosts`): the host's own
command on every host at once over one multiplexed ssh connection each, then one answer for the fleet.

These only read or change what each host keeps (its freeze, its images): they run the tool already on the host
and never send it (a rollout or a fleet rollback does). Deciding is in `bluegreen.fleet`."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Mapping, Sequence, TextIO

from bluegreen import fleet
from bluegreen.config import Settings, validate_project
from bluegreen.errors import EXIT_ATTENTION, EXIT_FAILED, EXIT_OK, Interrupted
from bluegreen.fleet import SshOptions
from bluegreen.journal import parse_line
from bluegreen.rollout import PARALLEL, SSH_UNREACHABLE, Host, Remote, Rollout, _each, connections, read_targets

HISTORY_MAX = 1000  # entries read from one host


def _fleet(settings: Settings, project: str, hosts: str | None, hosts_file: str | None, ssh: SshOptions, remote: Remote,
           stdout: TextIO, stderr: TextIO, environ: Mapping[str, str], command: str, ssh_cmd: str):
    validate_project(project)
    targets = read_targets(hosts, hosts_file, command)
    return targets, lambda opts: Rollout(settings=settings, project=project, tag="", targets=targets, ssh=opts, remote=remote,
                                         pyz=None, stdout=stdout, stderr=stderr, environ=environ, ssh_cmd=ssh_cmd)


def _gather(fn, ro: Rollout) -> str:
    """`fn` on every host at once; "" when all were asked, else the signal that stopped the waiting (the
    hosts not done by then are reported as such; their ssh commands finish on their own)."""
    try:
        _each(fn, ro.hosts, PARALLEL)
        return ""
    except Interrupted as exc:
        return exc.signame


def _code(code: int) -> int:
    """A host's exit code as one of ours: a signal, 124 (timed out), 126 or 127 is a failure."""
    return code if 0 <= code <= 4 else EXIT_FAILED


def _problem(ro: Rollout, h: Host, proc) -> str:
    """Why a host gave no answer: unreachable, no python3, no tool, or its own words."""
    if proc.returncode in (SSH_UNREACHABLE, 127):
        return ro._unreachable(h.target, proc)
    err = ro._text(proc.stderr)
    if "can't open file" in err or "No such file" in err:
        return f"no bluegreen at {ro.remote.pyz or 'ROOT/bluegreen.pyz'} on {h.target} (a rollout installs it)"
    last = err.splitlines()[-1] if err else ""
    return fleet.one_line(f"exit {proc.returncode}: {last[-300:]}" if last else f"exit {proc.returncode}")


def run_fleet_status(*, settings: Settings, project: str, hosts: str | None, hosts_file: str | None, ssh: SshOptions, remote: Remote,
                     json_out: bool, stdout: TextIO, stderr: TextIO, environ: Mapping[str, str], ssh_cmd: str = "ssh") -> int:
    """`status PROJECT --hosts ...`: one line per host, then the fleet's verdict; 0 only when every host serves
    the same version, healthy."""
    targets, make = _fleet(settings, project, hosts, hosts_file, ssh, remote, stdout, stderr, environ, "status", ssh_cmd)
    found: dict[str, fleet.HostStatus] = {}
    with connections(targets, ssh, ssh_cmd, multiplex=False) as opts:  # one command per host
        ro = make(opts)

        def ask(h: Host) -> None:
            proc = ro.ssh_run(h.target, remote.argv("status", project, "--json"), timeout=120)
            item = None if proc.returncode in (SSH_UNREACHABLE, 127) else \
                fleet.host_status(str(h.target), ro._text(proc.stdout), proc.returncode)
            found[str(h.target)] = item or fleet.HostStatus(str(h.target), error=_problem(ro, h, proc),
                                                            exit_code=proc.returncode)

        stopped = _gather(ask, ro)
    statuses = [found.get(str(t)) or fleet.HostStatus(str(t), error=f"not asked: interrupted by {stopped}") for t in targets]
    ok, problems = fleet.status_verdict(statuses)
    if json_out:
        print(json.dumps({"project": project, "ok": ok, "problems": problems, "hosts": [asdict(s) for s in statuses]},
                         sort_keys=True, indent=2), file=stdout)
    else:
        for line in fleet.status_table(statuses):
            print(line, file=stdout)
        tags = {s.tag for s in statuses}
        print(f"fleet: ok, {len(statuses)} host(s) serve {tags.pop() or 'nothing'}" if ok else
              "fleet: NOT OK\n" + "\n".join(f"  - {p}" for p in problems), file=stdout)
    if stopped:
        print(f"bluegreen: interrupted by {stopped}: the hosts not asked are shown as unknown.", file=stderr)
    return EXIT_OK if ok and not stopped else EXIT_FAILED


def run_fleet_history(*, settings: Settings, project: str, hosts: str | None, hosts_file: str | None, ssh: SshOptions, remote: Remote,
                      n: int, json_out: bool, stdout: TextIO, stderr: TextIO, environ: Mapping[str, str],
                      ssh_cmd: str = "ssh") -> int:
    """`history PROJECT --hosts ...`: the journals merged, newest first, each entry with its host."""
    from bluegreen import journal

    targets, make = _fleet(settings, project, hosts, hosts_file, ssh, remote, stdout, stderr, environ, "history", ssh_cmd)
    per_host: dict[str, list] = {}
    problems: dict[str, str] = {}
    count = n if n > 0 else HISTORY_MAX
    with connections(targets, ssh, ssh_cmd, multiplex=False) as opts:  # one command per host
        ro = make(opts)

        def read(h: Host) -> None:
            proc = ro.ssh_run(h.target, remote.argv("history", project, "-n", str(min(count, HISTORY_MAX)), "--json"))
            if proc.returncode != 0:
                problems[str(h.target)] = _problem(ro, h, proc)
            lines = ro._text(proc.stdout).splitlines()[:HISTORY_MAX]
            per_host[str(h.target)] = [e for e in map(parse_line, lines) if e is not None]

        stopped = _gather(read, ro)
    for t in targets:
        if str(t) not in per_host:
            problems[str(t)] = f"not read: interrupted by {stopped}"
    merged = fleet.merge_history({str(t): per_host.get(str(t), []) for t in targets})
    if n > 0:
        merged = merged[:n]
    if json_out:
        for target, entry in merged:
            # Journal fields are the host's text: JSON keeps them escaped, but never as a CI workflow command.
            print(fleet.defuse(json.dumps({"target": target, **asdict(entry)}, sort_keys=True)), file=stdout)
    else:
        width = max(len(str(t)) for t in targets)
        for target, entry in merged:
            for i, line in enumerate(journal.render([entry]).splitlines()):
                print(f"{target if i == 0 else '':<{width}}  {fleet.defuse(line)}", file=stdout)
        if not merged:
            print(f"no deploys recorded for {project} on any of the {len(targets)} host(s)", file=stdout)
    for target, problem in problems.items():
        print(f"bluegreen: {target}: {problem}; its entries are missing above.", file=stderr)
    return EXIT_FAILED if problems else EXIT_OK


def run_fleet_each(*, settings: Settings, project: str, words: Sequence[str], hosts: str | None, hosts_file: str | None,
                   ssh: SshOptions, remote: Remote, stdout: TextIO, stderr: TextIO, environ: Mapping[str, str],
                   ssh_cmd: str = "ssh") -> int:
    """`lock`, `unlock` or `prune` on every host at once (`words`: the host's command line after the tool), one
    line per host with its exit code and last words. 0 when every host did it; the hosts' code when all of them
    failed alike; otherwise 1 (some did, some did not: the lines say which). Interrupted: 4, since a host not
    heard from may or may not have done it."""
    command = words[0]
    targets, make = _fleet(settings, project, hosts, hosts_file, ssh, remote, stdout, stderr, environ, command, ssh_cmd)
    results: dict[str, tuple[int, str]] = {}
    with connections(targets, ssh, ssh_cmd, multiplex=False) as opts:  # one command per host
        ro = make(opts)

        def act(h: Host) -> None:
            proc = ro.ssh_run(h.target, remote.argv(*words), timeout=600)
            out = ro._text(proc.stdout + "\n" + proc.stderr).splitlines()
            if proc.returncode in (SSH_UNREACHABLE, 127) or (proc.returncode != 0 and "can't open file" in proc.stderr):
                results[str(h.target)] = (EXIT_FAILED, _problem(ro, h, proc))
            else:
                said = next((ln for ln in reversed(out) if ln.strip()), "")
                results[str(h.target)] = (_code(proc.returncode), fleet.one_line(said.removeprefix("bluegreen: ")))
            for line in out[-20:] if command == "prune" else []:
                ro.say(line, h.target)

        stopped = _gather(act, ro)
    width = max(len(str(t)) for t in targets)
    for t in targets:
        code, said = results.get(str(t), (EXIT_ATTENTION, f"no answer yet when interrupted by {stopped}: check this host"))
        print(f"{str(t):<{width}}  {'ok' if code == 0 else 'exit ' + str(code):<7}  {said}", file=stdout)
    if stopped:
        print(f"bluegreen: {command} interrupted by {stopped}: the hosts without an answer may or may not have done it; "
              f"`status {project} --hosts ...` shows each host's freeze.", file=stderr)
        return EXIT_ATTENTION
    codes = {t: results[str(t)][0] for t in targets}
    failed = [str(t) for t, c in codes.items() if c != 0]
    if not failed:
        return EXIT_OK
    done = [str(t) for t, c in codes.items() if c == 0]
    print(f"bluegreen: {command} did not succeed on {', '.join(failed)} (above: what each host said)"
          + (f"; {', '.join(done)} did it" if done else "") + ". Run it again for those hosts once their problem is fixed.",
          file=stderr)
    return codes[targets[0]] if not done and len(set(codes.values())) == 1 else EXIT_FAILED
