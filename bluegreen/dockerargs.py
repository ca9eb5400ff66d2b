"""DOCKER_ARGS: `docker run`'s flag grammar (pflag) from a table of its flags, and what bluegreen refuses.

docker parses its options with pflag: `--long`, `--long=value`, `--long value` (the next word, whatever it
is, for a flag that takes a value), `-x=value`, and short clusters `-abc` in which the first flag that takes
a value eats the rest of the cluster (`-tp8080:80` is `-t -p 8080:80`) or, at the end, the next word. The
first word that is no option is the image. We parse the same way, so that no spelling gets past the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# `docker run` flags of docker 20.10 to 28 (`docker run --help`, plus the hidden aliases --net, --net-alias,
# --dns-opt, the Windows-only ones and --annotation): long name -> (shorthand, takes a value).
RUN_FLAGS: dict[str, tuple[str, bool]] = {
    "add-host": ("", True), "annotation": ("", True), "attach": ("a", True), "blkio-weight": ("", True),
    "blkio-weight-device": ("", True), "cap-add": ("", True), "cap-drop": ("", True), "cgroup-parent": ("", True),
    "cgroupns": ("", True), "cidfile": ("", True), "cpu-count": ("", True), "cpu-percent": ("", True),
    "cpu-period": ("", True), "cpu-quota": ("", True), "cpu-rt-period": ("", True), "cpu-rt-runtime": ("", True),
    "cpu-shares": ("c", True), "cpus": ("", True), "cpuset-cpus": ("", True), "cpuset-mems": ("", True),
    "detach": ("d", False), "detach-keys": ("", True), "device": ("", True), "device-cgroup-rule": ("", True),
    "device-read-bps": ("", True), "device-read-iops": ("", True), "device-write-bps": ("", True),
    "device-write-iops": ("", True), "disable-content-trust": ("", False), "dns": ("", True),
    "dns-opt": ("", True), "dns-option": ("", True), "dns-search": ("", True), "domainname": ("", True),
    "entrypoint": ("", True), "env": ("e", True), "env-file": ("", True), "expose": ("", True),
    "gpus": ("", True), "group-add": ("", True), "health-cmd": ("", True), "health-interval": ("", True),
    "health-retries": ("", True), "health-start-interval": ("", True), "health-start-period": ("", True),
    "health-timeout": ("", True), "help": ("", False), "hostname": ("h", True), "init": ("", False),
    "interactive": ("i", False), "io-maxbandwidth": ("", True), "io-maxiops": ("", True), "ip": ("", True),
    "ip6": ("", True), "ipc": ("", True), "isolation": ("", True), "kernel-memory": ("", True),
    "label": ("l", True), "label-file": ("", True), "link": ("", True), "link-local-ip": ("", True),
    "log-driver": ("", True), "log-opt": ("", True), "mac-address": ("", True), "memory": ("m", True),
    "memory-reservation": ("", True), "memory-swap": ("", True), "memory-swappiness": ("", True),
    "mount": ("", True), "name": ("", True), "net": ("", True), "net-alias": ("", True), "network": ("", True),
    "network-alias": ("", True), "no-healthcheck": ("", False), "oom-kill-disable": ("", False),
    "oom-score-adj": ("", True), "pid": ("", True), "pids-limit": ("", True), "platform": ("", True),
    "privileged": ("", False), "publish": ("p", True), "publish-all": ("P", False), "pull": ("", True),
    "quiet": ("q", False), "read-only": ("", False), "restart": ("", True), "rm": ("", False),
    "runtime": ("", True), "security-opt": ("", True), "shm-size": ("", True), "sig-proxy": ("", False),
    "stop-signal": ("", True), "stop-timeout": ("", True), "storage-opt": ("", True), "sysctl": ("", True),
    "tmpfs": ("", True), "tty": ("t", False), "ulimit": ("", True), "use-api-socket": ("", False),
    "user": ("u", True), "userns": ("", True), "uts": ("", True), "volume": ("v", True),
    "volume-driver": ("", True), "volumes-from": ("", True), "workdir": ("w", True),
}
SHORT_FLAGS = {short: name for name, (short, _) in RUN_FLAGS.items() if short}
_BOOL_VALUES = ("1", "t", "T", "true", "TRUE", "True", "0", "f", "F", "false", "FALSE", "False")  # Go's ParseBool

_ENV_WHY = "app environment belongs in the env file itself (as KEY=VALUE lines), never in argv"
_OWN_WHY = "bluegreen sets it itself"
# Flags refused whatever their value: long name -> why. (Documented in the DOCKER_ARGS row of the reference.)
REFUSED: dict[str, str] = {
    "name": f"{_OWN_WHY}: the container is PROJECT-blue or PROJECT-green",
    "publish": f"{_OWN_WHY}: each colour is published on 127.0.0.1 only, on BLUE_PORT or GREEN_PORT",
    "publish-all": f"{_OWN_WHY}: each colour is published on 127.0.0.1 only, on BLUE_PORT or GREEN_PORT",
    "detach": f"{_OWN_WHY} (--detach=false would make `docker run` wait for the container to exit)",
    "attach": f"{_OWN_WHY}: the container runs detached",
    "rm": "a container that removes itself when it stops cannot be kept for inspection or restarted",
    "restart": f"{_OWN_WHY}: --restart unless-stopped",
    "env": _ENV_WHY,
    "env-file": _ENV_WHY,
    "label-file": "bluegreen cannot see which labels the file sets, and its bluegreen.* labels are its own",
    "cidfile": "docker refuses to run when that file exists, so the second deploy would fail",
    "pull": "bluegreen pulls the image itself and records that digest; --pull could run a different image",
    "help": "it prints docker's help instead of starting a container",
}
OWN_LABEL_PREFIX = "bluegreen."
# --network values that would bypass the 127.0.0.1 port nginx proxies to.
_NO_PUBLISH_NETWORKS = ("host", "none")


@dataclass(frozen=True)
class Option:
    """One parsed option: its long name, its value (None for a boolean without `=`) and the word it came from."""

    name: str
    value: str | None
    word: int  # 0-based index of the word in DOCKER_ARGS
    short: bool = False  # spelled -x rather than --name

    def spelled(self) -> str:
        """The flag as written, with its other spelling: `-p (--publish)`, `--publish (-p)`, `--name`."""
        short = RUN_FLAGS[self.name][0]
        if self.short:
            return f"-{short} (--{self.name})"
        return f"--{self.name} (-{short})" if short else f"--{self.name}"


class ArgsError(ValueError):
    """DOCKER_ARGS cannot be parsed; the message names the word and flag, never a value."""


def parse(args: Sequence[str]) -> tuple[list[Option], list[str]]:
    """Options and the words after them (image, command, or a `--`), as docker's pflag reads them."""
    options: list[Option] = []
    i = 0
    while i < len(args):
        word = args[i]
        at = i
        i += 1
        if len(word) < 2 or not word.startswith("-"):
            return options, list(args[at:])  # the image, then the command: docker stops parsing here
        if word == "--":
            return options, list(args[at:])  # `--` ends the options; kept so that callers see it
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if name not in RUN_FLAGS:
                raise ArgsError(f"word {at + 1} is {_flag_name('--', name)}, which is not a `docker run` option "
                                f"bluegreen knows, so it cannot tell what follows it")
            takes_value = RUN_FLAGS[name][1]
            if eq:
                options.append(Option(name, value, at))
            elif not takes_value:
                options.append(Option(name, None, at))
            elif i < len(args):
                options.append(Option(name, args[i], at))
                i += 1
            else:
                raise ArgsError(f"--{name} (word {at + 1}) needs a value")
            continue
        cluster = word[1:]
        while cluster:
            char, cluster = cluster[0], cluster[1:]
            name = SHORT_FLAGS.get(char)
            if name is None:
                raise ArgsError(f"word {at + 1} holds {_flag_name('-', char)}, which is not a `docker run` option "
                                f"bluegreen knows, so it cannot tell what follows it")
            if len(cluster) > 1 and cluster[0] == "=":
                options.append(Option(name, cluster[1:], at, True))
                cluster = ""
            elif not RUN_FLAGS[name][1]:
                options.append(Option(name, None, at, True))
            elif cluster:
                options.append(Option(name, cluster, at, True))
                cluster = ""
            elif i < len(args):
                options.append(Option(name, args[i], at, True))
                i += 1
            else:
                raise ArgsError(f"-{char} (--{name}, word {at + 1}) needs a value")
    return options, []


def _flag_name(dashes: str, name: str) -> str:
    # Only a plausible flag name is shown; anything else may be a value pasted in the wrong place.
    if name and len(name) <= 40 and all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
        return f"'{dashes}{name}'"
    return "an option bluegreen cannot name"


def problem(args: Sequence[str]) -> str | None:
    """Why these DOCKER_ARGS may not be used, or None; the reason never quotes a value."""
    try:
        options, positionals = parse(args)
    except ArgsError as exc:
        return f"{exc}. Use only `docker run` options here, spelled as in `docker run --help`."
    if positionals:
        return ("it holds a word that is not an option (or `--`), which docker would take as the image and its "
                "command; bluegreen gives the image itself. Put only options here.")
    for opt in options:
        flag = opt.spelled()
        if opt.name in REFUSED:
            return f"{flag} may not be set here: {REFUSED[opt.name]}."
        if opt.value is not None and not RUN_FLAGS[opt.name][1] and opt.value not in _BOOL_VALUES:
            return f"{flag} (word {opt.word + 1}) takes true or false after '=', nothing else."
        if opt.name == "label" and opt.value is not None:
            key = opt.value.partition("=")[0].strip().lower()
            if key.startswith(OWN_LABEL_PREFIX):
                return (f"{flag} may not set a {OWN_LABEL_PREFIX}* label: bluegreen's own labels "
                        f"(project, colour, tag) say which container is which.")
        if opt.name in ("network", "net") and opt.value is not None and _bypasses_publish(opt.value):
            return (f"{flag} (word {opt.word + 1}): host networking, no network or another container's network "
                    f"would bypass the 127.0.0.1 port that nginx proxies to.")
    return None


def _bypasses_publish(value: str) -> bool:
    # `--network NAME` or docker's advanced `--network name=NAME,alias=...` (csv, so quotes are dropped).
    names = [value]
    if "=" in value:
        for field in value.replace('"', "").split(","):
            key, _, val = field.partition("=")
            if key.strip().lower() == "name":
                names.append(val)
    for name in names:
        name = name.strip().lower()
        if name in _NO_PUBLISH_NETWORKS or name.startswith("container:"):
            return True
    return False
