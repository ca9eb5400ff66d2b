"""Start-up: `--version` and `--help` load no deploy machinery, and each command only what it runs (issue #15)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_build import build, pythons

REPO = Path(__file__).resolve().parent.parent
# The oldest Python promised (3.9) and the newest here, or this one where pyenv has none.
_BY_VERSION = sorted(pythons(), key=lambda p: tuple(int(x) for x in p.parent.parent.name.split(".")[:2]))
EDGES = sorted({str(p) for p in (_BY_VERSION[:1] + _BY_VERSION[-1:])} or {sys.executable})

# What a deploy loads and neither --version nor --help may: the deploy machinery, HTTP and TLS, subprocesses.
DEPLOY_MACHINERY = ("bluegreen.deploy", "bluegreen.docker", "bluegreen.nginx", "bluegreen.doctor", "bluegreen.attempt",
                    "bluegreen.config", "bluegreen.runner", "bluegreen.http_client", "bluegreen.status", "urllib.request",
                    "http.client", "ssl", "email", "subprocess", "socket", "json", "dataclasses")
SETUP_COMMANDS = ("bluegreen.init", "bluegreen.setup", "bluegreen.doctor", "bluegreen.adopt", "bluegreen.backup",
                  "bluegreen.rollout", "bluegreen.fleet", "bluegreen.fleetcmd", "bluegreen.prune", "bluegreen.attempt",
                  "bluegreen.hooks", "bluegreen.notify")

# Prints the modules that running cli.main(argv) added to those the interpreter had (a .pth may load some first).
_LOADED = r"""
import io, json, sys
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)
from bluegreen.cli import main
out = io.StringIO()
sys.stdout, real = out, sys.stdout
codes = [main(json.loads(a), environ={"BLUEGREEN_ROOT": sys.argv[2]}) for a in sys.argv[3:]]
sys.stdout = real
print(json.dumps({"codes": codes, "out": out.getvalue(), "loaded": sorted(set(sys.modules) - before)}))
"""


def loaded(*argvs: list, root: Path, python: str = sys.executable) -> dict:
    proc = subprocess.run([python, "-I", "-c", _LOADED, str(REPO), str(root), *(json.dumps(a) for a in argvs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("python", EDGES)
def test_version_and_help_load_no_deploy_machinery(python, tmp_path):
    found = loaded(["--version"], ["--help"], root=tmp_path, python=python)
    assert found["codes"] == [0, 0]
    assert found["out"].startswith("bluegreen ") and "exit codes:" in found["out"]  # both really ran
    assert "bluegreen.cli" in found["loaded"]
    assert sorted(set(DEPLOY_MACHINERY) & set(found["loaded"])) == []


@pytest.mark.parametrize("python", EDGES)
def test_version_alone_loads_only_the_package_and_its_errors(python, tmp_path):
    found = loaded(["--version"], root=tmp_path, python=python)
    assert found["codes"] == [0] and found["out"] == "bluegreen " + _version() + "\n"
    assert [m for m in found["loaded"] if m.startswith("bluegreen")] == ["bluegreen", "bluegreen.cli", "bluegreen.colours",
                                                                         "bluegreen.errors"]
    assert "argparse" not in found["loaded"]


def test_status_loads_no_setup_or_fleet_command(tmp_path):
    (tmp_path / "projects").mkdir()
    found = loaded(["status"], root=tmp_path)
    assert found["codes"] == [0] and "no projects under" in found["out"]
    assert "bluegreen.status" in found["loaded"]  # it ran
    assert sorted(set(SETUP_COMMANDS) & set(found["loaded"])) == []
    assert sorted({"urllib.request", "http.client", "ssl", "email", "secrets"} & set(found["loaded"])) == []


def test_an_error_message_imports_nothing_after_the_command_failed(tmp_path):
    """The pyz may be replaced on disk while a command runs (a rollout renames a new one into place); an import
    from it after that fails, so the error paths print with what cli loaded at start-up."""
    import io

    from bluegreen import cli

    err = io.StringIO()
    code = cli.main(["history", "Bad/Name"], environ={"BLUEGREEN_ROOT": str(tmp_path)}, stderr=err)
    assert code == 2 and err.getvalue().startswith("bluegreen: ") and "Traceback" not in err.getvalue()
    found = loaded(["history", "Bad/Name"], root=tmp_path)  # a fresh interpreter: what that error loaded
    assert found["codes"] == [2] and "bluegreen.deploy" not in found["loaded"], found["loaded"]


def test_the_parser_of_one_command_is_the_full_parsers(capsys):
    from bluegreen.cli import build_parser

    full, names = build_parser()
    for name in names:
        lean, lean_names = build_parser(only={name})
        assert lean_names == names
        assert _sub(lean, name).format_help() == _sub(full, name).format_help()
        assert _sub(lean, name).get_default("func") is _sub(full, name).get_default("func") is not None
    assert build_parser(only=set())[0].format_help() == full.format_help()


@pytest.mark.parametrize("python", EDGES)
def test_the_pyz_answers_version_and_help_without_the_deploy_machinery(python, tmp_path):
    pyz = build(tmp_path / "bluegreen.pyz", python=python)  # its own bytecode, as the hosts' build
    for argv, forbidden in ((["--version"], DEPLOY_MACHINERY + ("argparse",)), (["--help"], DEPLOY_MACHINERY)):
        proc = subprocess.run([python, "-X", "importtime", str(pyz), *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", proc.stderr, re.M))
        assert "bluegreen.cli" in imported  # -X importtime saw the archive's modules
        assert sorted(set(forbidden) & imported) == [], argv


def _sub(parser, name: str):
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action.choices[name]


def _version() -> str:
    from bluegreen import __version__

    return __version__
