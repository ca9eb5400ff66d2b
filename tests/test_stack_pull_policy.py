"""PULL=always|missing|never: an image loaded with `docker load` (no registry in its name) deploys
without any network, a digest-pinned local image too, and a pull failure names the policy."""

from __future__ import annotations

import json
import os
import secrets
import tempfile

import pytest

import stack as stacklib
from bluegreen import docker as dk

ID = "sha256:" + "a" * 64
DIGEST = "sha256:" + "b" * 64


# -- pure -------------------------------------------------------------------------------------------------

def test_pull_needed_per_policy():
    local = dk.LocalImage(ID)
    assert dk.pull_needed("always", local) is True
    assert dk.pull_needed("always", None) is True
    assert dk.pull_needed("missing", local) is False
    assert dk.pull_needed("missing", None) is True
    assert dk.pull_needed("never", local) is False
    assert dk.pull_needed("never", None) is None


def test_parse_image_inspect_and_repo_digest():
    text = f'"{ID}" ["reg:5000/acme/app@{DIGEST}","other/app@{DIGEST}"]\n'
    found = dk.parse_image_inspect(text)
    assert found == dk.LocalImage(ID, (f"reg:5000/acme/app@{DIGEST}", f"other/app@{DIGEST}"))
    assert found.digest_for("reg:5000/acme/app") == DIGEST
    assert found.digest_for("acme/app") == ""  # a digest of another repository names nothing under this one
    assert dk.parse_image_inspect(f'"{ID}" null').repo_digests == ()  # a loaded image: no registry digest
    for bad in ("", "[]", "not json", '"sha256:short" []', "\x00\xff"):
        assert dk.parse_image_inspect(bad) is None


def test_pull_policy_problem_for_doctor():
    loaded = [dk.LocalImage(ID)]
    pulled = [dk.LocalImage(ID, (f"reg:5000/acme/app@{DIGEST}",))]
    assert "PULL=always pulls on every deploy" in dk.pull_policy_problem("acme/app", "always", loaded)
    assert dk.pull_policy_problem("reg:5000/acme/app", "always", pulled) is None
    assert dk.pull_policy_problem("acme/app", "always", []) is None  # nothing here: a pull is the only way
    assert "PULL=never, but this host has no image of acme/app" in dk.pull_policy_problem("acme/app", "never", [])
    assert dk.pull_policy_problem("acme/app", "never", loaded) is None
    assert dk.pull_policy_problem("acme/app", "missing", loaded) is None


# -- real stack -------------------------------------------------------------------------------------------

@pytest.fixture
def loaded_image(stack):
    """v1 of the test app, saved, removed and `docker load`ed back under a name with no registry host: docker
    would pull it from Docker Hub, which this machine cannot reach (the air-gapped case)."""
    name = f"bg-loaded-{secrets.token_hex(3)}/app"
    ref = f"{name}:v1"
    tar = tempfile.NamedTemporaryFile(prefix="bg-loaded-", suffix=".tar", delete=False)
    tar.close()
    try:
        stacklib.docker("tag", stack.images["v1"], ref)
        stacklib.docker("save", "-o", tar.name, ref)
        stacklib.docker("rmi", ref)
        assert stacklib.docker("image", "inspect", ref, check=False).returncode != 0
        stacklib.docker("load", "-i", tar.name)
        yield name
    finally:
        os.unlink(tar.name)
        stacklib.docker("rmi", ref, check=False)


def journal(project) -> list[dict]:
    path = os.path.join(project.stack.projects_dir, project.name + ".journal")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_loaded_image_deploys_with_pull_never_and_missing(project, loaded_image):
    project.write_env(IMAGE=loaded_image, PULL="never")
    first = project.run(project.name, "v1", check=True)
    assert "PULL=never: this host has it" in first.stderr and "nothing pulled" in first.stderr
    project.serve()
    assert project.get("/version") == (200, "v1")
    assert journal(project)[-1]["digest"] == ""  # a loaded image has no registry digest (its ID is not one)

    project.write_env(IMAGE=loaded_image, PULL="missing")
    second = project.run(project.name, "v1", check=True)
    assert "PULL=missing: this host has it" in second.stderr
    assert project.get("/version") == (200, "v1")
    assert project.containers() == [f"{project.name}-blue", f"{project.name}-green"]


def test_doctor_facts_for_a_loaded_image(stack, loaded_image):
    from bluegreen.runner import SubprocessRunner

    docker = dk.Docker(SubprocessRunner(), ["docker"])
    local = docker.local_images(loaded_image)
    assert len(local) == 1 and local[0].digest_for(loaded_image) == ""
    assert "PULL=always pulls on every deploy" in dk.pull_policy_problem(loaded_image, "always", local)
    assert docker.local_images(loaded_image + "-absent") == []
    pulled = docker.local_images(stack.image_repo)
    assert pulled and dk.pull_policy_problem(stack.image_repo, "always", pulled) is None


def test_loaded_image_with_pull_always_names_the_policy(project, loaded_image):
    project.write_env(IMAGE=loaded_image)  # PULL defaults to always: today's behaviour
    proc = project.run(project.name, "v1", check=1)
    assert "Could not pull" in proc.stderr and "(PULL=always)" in proc.stderr
    assert "names no registry" in proc.stderr and "PULL=missing" in proc.stderr
    assert "docker login docker.io" not in proc.stderr
    assert project.containers() == []


def test_pull_never_without_the_image_fails_before_starting(project, loaded_image):
    project.write_env(IMAGE=loaded_image, PULL="never")
    proc = project.run(project.name, "v9", check=1)
    assert f"This host has no image {loaded_image}:v9, and PULL=never" in proc.stderr
    assert "docker load" in proc.stderr
    assert "[1/6] pull" in proc.stderr and "[2/6] start" not in proc.stderr
    assert project.containers() == []


def test_digest_pinned_local_image_deploys_with_pull_never(project, stack, loaded_image):
    # A registry image this host pulled once: its registry digest finds it locally, no registry needed.
    found = json.loads(stacklib.docker("image", "inspect", stack.images["v2"]).stdout)[0]
    digest = [d for d in found["RepoDigests"] if d.startswith(stack.image_repo + "@")][0].split("@")[1]
    project.write_env(PULL="never")
    proc = project.run(project.name, digest, check=True)
    assert "nothing pulled" in proc.stderr
    project.serve()
    assert project.get("/version") == (200, "v2")
    assert journal(project)[-1]["digest"] == digest

    # A loaded image's ID is not a digest: `IMAGE@ID` names nothing, and the message says to use the tag.
    image_id = json.loads(stacklib.docker("image", "inspect", f"{loaded_image}:v1").stdout)[0]["Id"]
    project.write_env(IMAGE=loaded_image, PULL="never")
    proc = project.run(project.name, image_id, check=1)
    assert "PULL=never" in proc.stderr and "deploy it by its tag" in proc.stderr
    assert project.get("/version") == (200, "v2")
