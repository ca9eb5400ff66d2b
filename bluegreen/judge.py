"""Step 4's watch and canary windows, one object each: real traffic to the new container judged while the old
container keeps running. Failing raises DeployFailed; the deploy's transaction then switches back.

The rules are pure (bluegreen/watch.py); this module only polls: the log, a promote/abort request, and once a
second both containers and the new one's health."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, List

from bluegreen import safefs
from bluegreen import watch as wt
from bluegreen.errors import CommandError, DeployFailed
from bluegreen.runner import indent

if TYPE_CHECKING:  # the deployer runs this step; no import at run time (deploy imports this module)
    from bluegreen.deploy import Deployer, Plan

POLL = 0.25  # seconds between two reads of the log (the switch back follows within this)
HEALTH_FAILURES = 3  # health checks failed in a row (one a second) that end the window
BLIND_AFTER = 2.0  # seconds after which a log that received no line at all is reported


class Judge:
    """One window: `name` is "watch" (after the full switch) or "canary" (`percent` of the requests)."""

    def __init__(self, deployer: Deployer, plan: Plan, tail: wt.LogTail, *, seconds: float, name: str, what: str,
                 percent: int = 100) -> None:
        self.d, self.plan, self.tail = deployer, plan, tail
        self.seconds, self.name, self.what = seconds, name, what
        cfg = plan.cfg
        self.early_min = wt.early_min_requests(cfg.watch_min_requests, percent)
        self.control = deployer.settings.watch_file(cfg.project)
        self.back = f"{deployer.old_tag or 'the previous version'} ({plan.current_name}, kept running during the {name})"
        self.tally = wt.Tally()
        self.started = 0.0
        self.bad_health = 0
        self.blind_said = False
        self.seen: dict | None = None  # this second's containers by name (None: docker did not answer)

    def run(self) -> bool:
        """Judge for `seconds`. True when it ended keeping the new version without more judging (`promote`, or
        the old container stopped: nothing left to switch back to); False when the window passed."""
        d, cfg, root = self.d, self.plan.cfg, self.d.settings.root
        detail = (f"{self.seconds:g}s of {self.what}: at most {cfg.watch_max_error_rate}% 5xx "
                  f"({wt.rule_text(cfg.watch_min_requests, self.early_min)}), health, crashes")
        with d.progress.step(4, self.name, detail) as notes:
            safefs.unlink(wt.request_path(self.control), root=root)
            safefs.atomic_write(self.control, json.dumps({"pid": os.getpid(), "tag": self.plan.tag, "step": self.name})
                                + "\n", root=root)
            try:
                self.started = d.clock()
                next_check = self.started
                while True:
                    self._read_log()
                    if self._asked(notes):
                        return True
                    if d.clock() >= next_check:
                        next_check += 1.0
                        if self._old_stopped(notes):
                            return True
                        self._check_new()
                    if self.elapsed() >= self.seconds:
                        break
                    d.sleep(min(POLL, max(0.0, self.seconds - self.elapsed())))
                self._end(notes)
                return False
            finally:
                safefs.unlink(self.control, root=root)
                safefs.unlink(wt.request_path(self.control), root=root)

    def elapsed(self) -> float:
        return self.d.clock() - self.started

    def _read_log(self) -> None:
        cfg = self.plan.cfg
        self.tally.add(self.tail.read(), self.plan.target_port)
        if wt.judge_early(self.tally, max_rate=cfg.watch_max_error_rate, min_requests=self.early_min):
            self.fail(f"{wt.describe(self.tally, self.elapsed())} > WATCH_MAX_ERROR_RATE {cfg.watch_max_error_rate}%")
        if not self.blind_said and self.elapsed() >= BLIND_AFTER and self.tail.lines_read == 0:
            # The verify probe went through nginx before the window: its line should be there.
            self.blind_said = True
            hint = self.tail.problem() or f"check that the access_log line of {cfg.project} names it"
            self.d.progress.say(f"warning: nothing has been logged to {self.tail.path} since the switch (not even the "
                                f"verify probe): {hint}. This {self.name} can judge health and crashes only.")

    def _asked(self, notes: List[str]) -> bool:
        """`bluegreen promote` (True) or `bluegreen abort` (raises) from another shell."""
        request = wt.read_request(self.control, self.d.settings.root)
        if request == wt.ABORT:
            self.fail(f"`abort` after {wt.describe(self.tally, self.elapsed())}")
        if request == wt.PROMOTE:
            notes.append(f"promoted after {wt.describe(self.tally, self.elapsed())}")
            return True
        return False

    def _old_stopped(self, notes: List[str]) -> bool:
        """Both containers in one docker call, once a second; True when the old one is gone (the window ends,
        the new version stays). A second in which docker does not answer is no evidence either way."""
        plan = self.plan
        try:
            self.seen = self.d.docker.inspect_many([n for n in (plan.current_name, plan.target_name) if n])
        except CommandError:
            self.seen = None
            return False
        old = self.seen.get(plan.current_name) if plan.current_name else None
        if old is not None and old.running:
            return False
        why = "it disappeared" if old is None else (old.crash_note() or f"it is {old.status}")
        notes.append(f"ended after {wt.describe(self.tally, self.elapsed())}: the old {plan.current_name} stopped ({why})")
        self.d.progress.say(f"warning: {plan.current_name} stopped during the {self.name} ({why}), so there is "
                            f"nothing left to switch back to: {plan.tag} keeps serving, no longer judged.")
        return True

    def _check_new(self) -> None:
        """The new container still runs (as seen by _old_stopped's call) and answers its health check."""
        plan, cfg = self.plan, self.plan.cfg
        if self.seen is not None:
            found = self.seen.get(plan.target_name)
            if found is None or not found.running:
                why = "it disappeared" if found is None else (found.crash_note() or f"it is {found.status}")
                self.fail(f"{plan.target_name} stopped during the {self.name}: {why}")
        probe = self.d.probe(plan.health_url(), timeout=cfg.health_request_timeout, host=cfg.health_host)
        self.bad_health = 0 if probe.status == cfg.health_expect else self.bad_health + 1
        if self.bad_health >= HEALTH_FAILURES:
            self.fail(f"its health check failed {self.bad_health} times in a row (last: {probe.detail})")

    def _end(self, notes: List[str]) -> None:
        """The window passed: the plain share decides, with WATCH_MIN_REQUESTS requests at least."""
        cfg, tally = self.plan.cfg, self.tally
        tally.add(self.tail.read(), self.plan.target_port)
        if wt.judge(tally, max_rate=cfg.watch_max_error_rate, min_requests=cfg.watch_min_requests):
            self.fail(f"{wt.describe(tally, self.elapsed())} > WATCH_MAX_ERROR_RATE {cfg.watch_max_error_rate}% "
                      f"by the end of the {self.name}")
        under = f"; under WATCH_MIN_REQUESTS={cfg.watch_min_requests}: judged"
        few = ("" if tally.requests >= cfg.watch_min_requests else
               f"{under} on strong evidence, health and crashes" if tally.requests >= self.early_min else
               f"{under} by health")
        notes.append(f"{wt.describe(tally, self.elapsed())}{few}")

    def fail(self, why: str) -> None:
        plan = self.plan
        logs = self.d.docker.logs(plan.target_name, tail=20)
        when = "The watch after the switch" if self.name == "watch" else "A canary step"
        raise DeployFailed(
            f"{when} saw {why} from {plan.target_name} ({plan.ref}): switching back to {self.back} and removing "
            f"{plan.target_name} (the lines above say each undo done). Fix the release (its last log lines are below), "
            f"then deploy again.",
            details=f"Last log lines of {plan.target_name}:\n{indent(logs)}",
        )
