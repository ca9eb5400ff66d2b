"""Run the deploy step of the workflows `bluegreen init --ci github` writes, as a GitHub runner would: its `run:`
script under `bash --noprofile --norc -eo pipefail` (GitHub's `shell: bash`), with the step's `env:` evaluated
from the caller's `with:`, the inputs' defaults, the secrets given and the build job's tag, and the variables
the runner sets (GITHUB_ACTIONS, GITHUB_WORKSPACE, GITHUB_STEP_SUMMARY, RUNNER_TEMP, HOME)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Mapping

import yaml

WORKFLOWS = ".github/workflows"
DEPLOY_STEP = "Roll out to every host"
CLEANUP_STEP = "Remove the SSH key"
_EXPR = re.compile(r"\$\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")


def on(doc: dict) -> dict:
    return doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` key as true


def load(repo: Path, name: str) -> dict:
    return yaml.safe_load((repo / WORKFLOWS / name).read_text())


def deploy_step(repo: Path) -> dict:
    steps = load(repo, "deploy-backend.yml")["jobs"]["deploy"]["steps"]
    [step] = [s for s in steps if s.get("name") == DEPLOY_STEP]
    return step


def _text(value: object) -> str:
    """An expression's value as GitHub puts it into the environment (booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def step_env(repo: Path, project: str, *, secrets: Mapping[str, str], tag: str,
             inputs: Mapping[str, object] | None = None) -> dict[str, str]:
    """The deploy step's `env:` as the runner evaluates it for deploy-PROJECT.yml's call. The secrets are the
    repository's (USER_API_SERVER_HOST, ...), mapped through the caller's `secrets:`. An expression this does
    not know fails (KeyError), so a new variable in the workflow cannot slip past the tests."""
    backend = load(repo, "deploy-backend.yml")
    caller = load(repo, f"deploy-{project}.yml")["jobs"]["deploy"]
    context: dict[str, str] = {}
    declared = on(backend)["workflow_call"]["inputs"]
    for name, spec in declared.items():
        if "default" in spec:
            context[f"inputs.{name}"] = _text(spec["default"])
    for name, value in {**caller.get("with", {}), **(inputs or {})}.items():
        assert name in declared, f"input {name} is not declared by deploy-backend.yml"
        context[f"inputs.{name}"] = _text(value)
    repo_secrets = {f"secrets.{k}": v for k, v in secrets.items()}
    for name, value in caller.get("secrets", {}).items():
        context[f"secrets.{name}"] = _EXPR.sub(lambda m: repo_secrets.get(m.group(1), ""), value)
    context["needs.build.outputs.tag"] = tag
    return {k: _EXPR.sub(lambda m: context[m.group(1)], _text(v)) for k, v in deploy_step(repo)["env"].items()}


def _step_process(repo: Path, project: str, *, step: dict, home: Path, summary: Path, secrets: Mapping[str, str],
                  tag: str, inputs: Mapping[str, object] | None, path: str | None,
                  extra_env: Mapping[str, str] | None) -> tuple[list[str], dict[str, str]]:
    env = step_env(repo, project, secrets=secrets, tag=tag, inputs=inputs) if "env" in step else {}
    runner_temp = home / "runner-temp"
    runner_temp.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), GITHUB_ACTIONS="true", CI="true", GITHUB_WORKSPACE=str(repo),
               GITHUB_STEP_SUMMARY=str(summary), RUNNER_TEMP=str(runner_temp),
               PATH=path or os.environ.get("PATH", "/usr/bin:/bin"), **(extra_env or {}))
    script = home / ("step-" + re.sub(r"[^a-z0-9]+", "-", step["name"].lower()) + ".sh")
    script.write_text(step["run"])
    return ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], env


def run_deploy_step(repo: Path, project: str, *, home: Path, summary: Path, secrets: Mapping[str, str], tag: str,
                    inputs: Mapping[str, object] | None = None, path: str | None = None,
                    extra_env: Mapping[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The deploy step's script in `repo` (the checked-out workspace), then the key-removing step that always
    follows it; stdout and stderr together as on the runner, the deploy step's exit code. `extra_env` is for
    stand-ins only (a fake python3's settings), never something the workflow needs."""
    argv, env = _step_process(repo, project, step=deploy_step(repo), home=home, summary=summary, secrets=secrets,
                              tag=tag, inputs=inputs, path=path, extra_env=extra_env)
    proc = subprocess.run(argv, cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    cleanup(repo, home=home, summary=summary, path=path)
    return proc


def start_deploy_step(repo: Path, project: str, *, home: Path, summary: Path, secrets: Mapping[str, str], tag: str,
                      inputs: Mapping[str, object] | None = None, path: str | None = None) -> subprocess.Popen:
    """The deploy step in the background (to cancel it as GitHub does: signals to the step's process)."""
    argv, env = _step_process(repo, project, step=deploy_step(repo), home=home, summary=summary, secrets=secrets,
                              tag=tag, inputs=inputs, path=path, extra_env=None)
    return subprocess.Popen(argv, cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def cleanup(repo: Path, *, home: Path, summary: Path, path: str | None = None) -> None:
    """The `if: always()` step after the deploy step (it removes the key's directory)."""
    steps = load(repo, "deploy-backend.yml")["jobs"]["deploy"]["steps"]
    [step] = [s for s in steps if s.get("name") == CLEANUP_STEP]
    assert step["if"] == "always()"
    argv, env = _step_process(repo, "", step=step, home=home, summary=summary, secrets={}, tag="", inputs=None,
                              path=path, extra_env=None)
    subprocess.run(argv, cwd=repo, env=env, stdin=subprocess.DEVNULL, check=True, timeout=60)
