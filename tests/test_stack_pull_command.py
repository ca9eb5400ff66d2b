"""`bluegreen pull PROJECT TAG`: the deploy's pull step alone (for a fleet rollout to pull everywhere first):
the image is on the host afterwards, nothing that serves changed, the PULL policy and the lock apply."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import stack as stacklib
from test_stack_deploy import deploy_ok


def test_pull_fetches_the_image_and_changes_nothing_that_serves(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    ref = f"{project.stack.image_repo}:v2"
    stacklib.docker("rmi", "-f", ref, check=False)
    upstream = Path(project.upstream_file).read_bytes()
    proc = project.run("pull", project.name, "v2", check=True)
    assert f"{ref} is on this host (registry digest sha256:" in proc.stdout, proc.stdout + proc.stderr
    assert "[1/6] pull" in proc.stderr
    assert stacklib.docker("image", "inspect", ref, check=False).returncode == 0
    assert project.containers() == [f"{project.name}-blue"] and Path(project.upstream_file).read_bytes() == upstream
    assert project.get("/version") == (200, "v1")
    # PULL=never: a tag this host lacks is refused with the policy named; nothing pulled.
    project.write_env(PULL="never")
    proc = project.run("pull", project.name, "v404", check=1)
    assert "PULL=never" in proc.stderr and "Traceback" not in proc.stderr


def test_pull_waits_for_no_deploy_it_refuses_while_one_runs(project):
    project.write_env()
    lock = Path(project.stack.projects_dir) / f"{project.name}.lock"
    holder = subprocess.Popen(["flock", "-x", str(lock), "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0:  # not taken yet
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc = project.run("pull", project.name, "v1")
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        holder.kill()
        holder.wait()
