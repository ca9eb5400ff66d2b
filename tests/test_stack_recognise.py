"""Real-stack test of issue 11 (one part): bluegreen takes over a host where the guide's deploy.sh runs the app.

deploy.sh started `PROJECT-blue` with `docker run -d --name PROJECT-blue -p BLUE_PORT:8080 IMAGE:v1`: no bluegreen
labels, its port published on every address (0.0.0.0 and ::), a hand-written upstream file and `blue` in the
active file. The pure side of the same is in test_recognise_logic.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import stack as stacklib
from test_stack_day2 import status_json
from test_stack_deploy import inspect, serving


def start_like_deploy_sh(project) -> str:
    """What the guide's deploy.sh leaves on a host after deploying v1: the container, the upstream, the active file."""
    name = f"{project.name}-blue"
    stacklib.docker("run", "-d", "--name", name, "-p", f"{project.blue_port}:8080", project.stack.images["v1"])
    deadline = time.monotonic() + 20
    while stacklib.http_get(f"http://127.0.0.1:{project.blue_port}/api/health", timeout=2)[0] != 200:
        assert time.monotonic() < deadline, stacklib.docker("logs", name, check=False).stdout
        time.sleep(0.1)
    Path(project.upstream_file).write_text(f"upstream {project.name} {{\n    server 127.0.0.1:{project.blue_port};\n}}\n")
    Path(project.env_file).with_suffix(".active").write_text("blue\n")
    project.serve(probe=False)  # the guide's server block: no route header line (its map is bluegreen's)
    return name


def bindings(name: str) -> set:
    data = inspect(name)
    return {(b["HostIp"], b["HostPort"]) for b in (data["HostConfig"]["PortBindings"] or {}).get("8080/tcp") or []}


def test_bluegreen_takes_over_a_container_deploy_sh_started(project):
    project.write_env()
    blue = start_like_deploy_sh(project)
    green = f"{project.name}-green"
    repo = project.stack.image_repo
    assert inspect(blue)["Config"]["Labels"] in (None, {}) and bindings(blue) == {("", str(project.blue_port))}
    assert project.get("/version") == (200, "v1")

    # status: v1 serves from the deploy.sh container, no drift, and a warning about its address. The route cannot
    # be proven through the guide's server block (degraded, as for any server block without the header line);
    # the warning itself is not a failed check.
    item = status_json(project, check=1)
    assert (item["serving"], item["tag"], item["active_file"], item["drift"]) == ("blue", "v1", "blue", [])
    assert item["verdict"] == "degraded" and [c["name"] for c in item["checks"] if not c["ok"]] == ["route"]
    colours = {c["colour"]: c for c in item["colours"]}
    assert (colours["blue"]["state"], colours["blue"]["tag"], colours["blue"]["managed"], colours["blue"]["healthy"]) == (
        "running", "v1", False, True)
    exposed = colours["blue"]["exposed"]
    assert exposed and f"{blue} publishes its port on every address of this host (0.0.0.0:{project.blue_port}" in exposed
    assert "reachable directly, around nginx and bypassing it" in exposed and "other hosts in the VPC" in exposed
    assert colours["green"]["state"] == "absent" and colours["green"]["exposed"] is None
    text = project.run("status", project.name, check=1).stdout
    assert f"warning: {blue} publishes its port on every address" in text and "no drift" in text
    assert f"{blue} 127.0.0.1:{project.blue_port} running, health HTTP 200 tag v1" in text

    # prune: keeps the serving container and its image (dry run: other tests share this registry's images).
    dry = project.run("prune", project.name, "--dry-run", check=True).stdout
    assert "keeping: v1 (serving)" in dry
    assert f"docker image rm {repo}:v1\n" not in dry and f"docker rm --force {blue}" not in dry
    # Nothing in prune's plan names the deploy.sh container or the serving image.
    assert not [ln for ln in dry.splitlines() if ln.startswith("would run") and (blue in ln or ln.endswith(f"{repo}:v1"))]

    # deploy v2 over it: says what it replaces (was ? before), warns about the address, retires it as usual.
    proc = project.run(project.name, "v2", check=True)
    assert f"{project.name} v2 now serves from {green} on 127.0.0.1:{project.green_port} (was v1 in {blue})" in proc.stdout
    warned = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"warning: {blue}, which serves now")]
    assert len(warned) == 1 and f"0.0.0.0:{project.blue_port}" in warned[0], proc.stderr
    assert f"This deploy replaces it: {green} is published on 127.0.0.1:{project.green_port} only" in warned[0]
    assert inspect(blue)["State"]["Status"] == "exited" and serving(project) == "v2"
    assert bindings(green) == {("127.0.0.1", str(project.green_port))}
    (last,) = [json.loads(ln) for ln in project.run("history", project.name, "--json", "-n", "1", check=True).stdout.splitlines()]
    assert (last["tag"], last["from_tag"], last["from_colour"], last["result"]) == ("v2", "v1", "blue", "deployed")

    # The stopped deploy.sh container raises no warning; prune would now remove it but keep v1 for a rollback.
    item = status_json(project, check=1)
    assert [(c["colour"], c["state"], c["tag"], c["managed"], c["exposed"]) for c in item["colours"]] == [
        ("blue", "exited", "v1", False, None), ("green", "running", "v2", True, None)]
    assert item["drift"] == []
    dry = project.run("prune", project.name, "--dry-run", check=True).stdout
    assert "keeping: v2 (serving), v1 (rollback target)" in dry and f"would run: docker rm --force {blue}" in dry
    assert f"docker image rm {repo}:v1\n" not in dry

    # Now that bluegreen writes the upstream (and its route map), the server block can carry the header line.
    project.serve()
    # rollback: the journal has no deploy of v1, but knows it served before v2.
    back = project.run("rollback", project.name, check=True)
    assert f"Rolling back {project.name} from v2 to v1" in back.stderr, back.stderr
    assert f"{project.name} v1 now serves from {blue} on 127.0.0.1:{project.blue_port} (was v2 in {green})" in back.stdout
    assert serving(project) == "v1"
    assert bindings(blue) == {("127.0.0.1", str(project.blue_port))}  # the deploy.sh container was replaced
    assert inspect(blue)["Config"]["Labels"]["bluegreen.tag"] == "v1"

    # Final status: ok (exit 0), nothing published on every address any more.
    item = status_json(project, check=True)
    assert (item["verdict"], item["serving"], item["tag"], item["drift"]) == ("ok", "blue", "v1", [])
    assert [(c["tag"], c["managed"], c["exposed"]) for c in item["colours"]] == [("v1", True, None), ("v2", True, None)]
    text = project.run("status", project.name, check=True).stdout
    assert "every address" not in text and "warning" not in text and "no bluegreen labels" not in text
    # And another rollback goes back to v2, as before.
    assert "from v1 to v2" in project.run("rollback", project.name, "--dry-run", check=True).stderr
