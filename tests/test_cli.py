"""CLI tests through main(): parsing, the shorthand, validation before anything runs, exit codes."""

from __future__ import annotations

import io

import pytest

from bluegreen import __version__
from bluegreen.cli import _with_default_command, main


def run(argv, environ=None):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, environ=environ or {}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["user-api"], ["deploy", "user-api"]),
        (["user-api", "v2"], ["deploy", "user-api", "v2"]),
        (["--root", "/x", "user-api"], ["deploy", "--root", "/x", "user-api"]),
        (["deploy", "user-api"], ["deploy", "user-api"]),
        (["status", "--json"], ["status", "--json"]),
        (["--version"], ["--version"]),
        (["-h"], ["-h"]),
        ([], []),
    ],
)
def test_shorthand(argv, expected):
    assert _with_default_command(argv, ["deploy", "status"]) == expected


def test_version_and_help(capsys):
    code, _, _ = run(["--version"])
    assert code == 0 and capsys.readouterr().out.strip() == f"bluegreen {__version__}"
    code, _, _ = run(["deploy", "--help"])
    assert code == 0 and "exit codes:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["../x"], ["a;b", "v1"], ["--", "--privileged"], ["ok", "--privileged=true"], ["ok", "v1\nrm"]])
def test_dangerous_input_exits_2_before_anything_runs(argv, tmp_path, capsys):
    # BLUEGREEN_DOCKER points at a binary that does not exist: if anything ran, the error would differ.
    code, out, err = run(argv, {"BLUEGREEN_ROOT": str(tmp_path), "BLUEGREEN_DOCKER": "/nonexistent/docker"})
    err += capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_missing_env_file_is_a_config_error(tmp_path):
    code, _, err = run(["user-api", "v1"], {"BLUEGREEN_ROOT": str(tmp_path)})
    assert code == 2 and "user-api.env: no such file" in err and err.startswith("bluegreen: ")


def test_bad_config_value_names_file_and_key(tmp_path):
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "user-api.env").write_text("IMAGE=acme/api\nHEALTH_TIMEOUT=soon\n")
    code, _, err = run(["user-api"], {"BLUEGREEN_ROOT": str(tmp_path)})
    assert code == 2 and "user-api.env: HEALTH_TIMEOUT: must be a number of seconds" in err


def test_missing_docker_binary_is_a_clear_message(tmp_path):
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "user-api.env").write_text("IMAGE=acme/api\n")
    code, _, err = run(["user-api"], {"BLUEGREEN_ROOT": str(tmp_path), "BLUEGREEN_DOCKER": "/nonexistent/docker"})
    assert code == 2 and "Executable `/nonexistent/docker` not found" in err and "Traceback" not in err


def test_dry_run_prints_the_plan_and_changes_nothing(tmp_path):
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "user-api.env").write_text("IMAGE=acme/api\nDB_PASSWORD=s3cret\nHELTH_TIMEOUT=5\n")
    before = sorted(p.name for p in (tmp_path / "projects").iterdir())
    code, out, err = run(["user-api", "v7", "--dry-run"], {"BLUEGREEN_ROOT": str(tmp_path), "BLUEGREEN_DOCKER": "/nonexistent/docker"})
    assert code == 0, err
    assert "docker pull acme/api:v7" in out and "user-api-blue" in out and "s3cret" not in out + err
    assert "did you mean HEALTH_TIMEOUT?" in err
    assert sorted(p.name for p in (tmp_path / "projects").iterdir()) == before
    assert not (tmp_path / "nginx").exists()


def test_verbose_shows_a_traceback(tmp_path):
    code, _, err = run(["user-api", "-v"], {"BLUEGREEN_ROOT": str(tmp_path)})
    assert code == 2 and "Traceback" in err


def test_a_config_error_is_journaled_as_refused(tmp_path):
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "user-api.env").write_text("IMAGE=acme/api\nBLUE_PORT=1\nGREEN_PORT=1\n")
    code, _, err = run(["user-api", "v9"], {"BLUEGREEN_ROOT": str(tmp_path)})
    assert code == 2 and "BLUE_PORT and GREEN_PORT must differ" in err
    from bluegreen import journal

    (entry,) = journal.read(tmp_path / "projects" / "user-api.journal")
    assert (entry.tag, entry.result, entry.exit_code) == ("v9", "refused", 2)
    assert "must differ" in entry.message
