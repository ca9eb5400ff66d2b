"""The lines `adopt --force` inserts into hand-written server blocks, checked by real nginx (`nginx -t` in a
private prefix): unusual but valid configurations (one-line blocks, `if` and `limit_except`, quotes and braces
inside words, CRLF, comments after a directive, several server blocks, nested locations, upstream names that
are prefixes of others), then generated ones (hypothesis). Every time: nginx accepts the result, every byte of
the original is kept in order, and a second run inserts nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from bluegreen import adopt, nginxconf
from bluegreen import nginx as ngx

ROUTE = ngx.add_header_line("user-api")
KEEP = list(adopt.KEEPALIVE_LINES)


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found is None:
        pytest.fail("nginx is missing: `bash .ci/install-deps` installs it (these tests check adopt's lines with it)")
    return found


class Nginx:
    """`nginx -t` of one server-block file inside an http block with the upstreams and the route map."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.binary = nginx_binary()
        (base / "tmp").mkdir(parents=True, exist_ok=True)

    def conf(self, http: str = "") -> str:
        tmp = self.base / "tmp"
        return (f"pid {self.base}/nginx.pid;\nerror_log {self.base}/error.log;\nevents {{}}\nhttp {{\n"
                f"    access_log off;\n    client_body_temp_path {tmp}/body;\n    proxy_temp_path {tmp}/proxy;\n"
                f"    fastcgi_temp_path {tmp}/fastcgi;\n    uwsgi_temp_path {tmp}/uwsgi;\n    scgi_temp_path {tmp}/scgi;\n"
                f"    upstream user-api {{ server 127.0.0.1:1; }}\n    upstream user-api-v2 {{ server 127.0.0.1:2; }}\n"
                f"    map $http_x_bluegreen_probe {ngx.route_variable('user-api')} {{ default \"\"; }}\n"
                f"{http}\n    include {self.base}/server.conf;\n}}\n")

    def accepts(self, server: str, http: str = "") -> tuple[bool, str]:
        (self.base / "server.conf").write_bytes(server.encode("utf-8", "surrogateescape"))
        (self.base / "nginx.conf").write_text(self.conf(http))
        proc = subprocess.run([self.binary, "-t", "-p", str(self.base), "-c", str(self.base / "nginx.conf"),
                               "-e", str(self.base / "error.log")], capture_output=True, text=True, timeout=30)
        return proc.returncode == 0, proc.stderr

    def files(self, server: str, http: str = "") -> adopt.NginxFiles:
        main = self.base / "nginx.conf"
        return adopt.NginxFiles(f"# configuration file {main}:\n{self.conf(http)}\n"
                                f"# configuration file {self.base}/server.conf:\n{server}\n")


@pytest.fixture
def nginx(tmp_path):
    return Nginx(tmp_path)


def edit(nginx: Nginx, text: str, http: str = "", upstream: str = "user-api") -> tuple[str, list[str]]:
    inserts, manual = adopt.server_edits(text, upstream=upstream, project="user-api", conf=nginx.files(text, http))
    return adopt.apply_inserts(text, inserts), manual


def kept_in_order(before: str, after: str) -> str:
    """What `after` adds to `before`, asserting that every character of `before` is kept, in order."""
    added, i = [], 0
    for ch in after:
        if i < len(before) and ch == before[i]:
            i += 1
        else:
            added.append(ch)
    assert i == len(before), "a character of the original was changed or dropped"
    return "".join(added)


def adopted(nginx: Nginx, text: str, http: str = "", upstream: str = "user-api") -> tuple[str, list[str]]:
    """The edited text, after checking: nginx accepts it (it accepted the original), nothing of the original
    is lost, and a second run adds nothing."""
    ok, err = nginx.accepts(text, http)
    assert ok, f"the test's own input is not valid nginx:\n{err}"
    after, manual = edit(nginx, text, http, upstream)
    ok, err = nginx.accepts(after, http)
    assert ok, f"nginx refuses the adopted block:\n{err}\n{after}"
    kept_in_order(text, after)
    again, manual_again = edit(nginx, after, http, upstream)
    assert again == after, "a second run changes it again"
    # What is left to do by hand stays (its line numbers move with the lines added above it).
    assert [re.sub(r"line [0-9]+", "line N", m) for m in manual_again] == [re.sub(r"line [0-9]+", "line N", m) for m in manual]
    return after, manual


def lines_of(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


# -- where nginx allows the lines ------------------------------------------------------------------------------

@pytest.mark.parametrize("inner", ["if ($request_method = POST)", "limit_except GET"])
def test_a_proxy_pass_inside_if_or_limit_except_gets_its_lines_in_the_location(nginx, inner):
    """proxy_http_version and proxy_set_header are not allowed in `if` or `limit_except`: they go in the
    location around it, which those blocks inherit from."""
    text = ("server {\n    listen 127.0.0.1:1;\n    location / {\n        " + inner + " {\n"
            "            proxy_pass http://user-api;\n        }\n        return 404;\n    }\n}\n")
    after, manual = adopted(nginx, text)
    assert manual == []
    assert set(KEEP + [ROUTE]) <= set(lines_of(after))


def test_the_http_blocks_proxy_http_version_is_the_users(nginx):
    """Like a location's own `proxy_http_version 1.0;`, one in the http block is the user's choice: kept."""
    text = "server {\n    listen 127.0.0.1:1;\n    location / {\n        proxy_pass http://user-api;\n    }\n}\n"
    after, _ = adopted(nginx, text, http="    proxy_http_version 1.0;")
    assert "proxy_http_version 1.1;" not in after


def test_a_connection_header_from_an_include_is_the_users(nginx, tmp_path):
    snippet = tmp_path / "ws_params"
    snippet.write_text("proxy_set_header Upgrade $http_upgrade;\nproxy_set_header Connection upgrade;\n")
    text = (f"server {{\n    listen 127.0.0.1:1;\n    location / {{\n        include {snippet};\n"
            f"        proxy_pass http://user-api;\n    }}\n}}\n")
    main = nginx.base / "nginx.conf"
    nginx.accepts(text)
    files = adopt.NginxFiles(f"# configuration file {main}:\n{nginx.conf()}\n# configuration file {snippet}:\n"
                             f"{snippet.read_text()}\n# configuration file {nginx.base}/server.conf:\n{text}\n")
    inserts, manual = adopt.server_edits(text, upstream="user-api", project="user-api", conf=files)
    assert 'proxy_set_header Connection "";' not in [i.line for i in inserts]


def test_a_route_line_that_a_locations_own_add_header_hides_is_added_there(nginx):
    """The route line in the server block does not reach a location with add_header lines of its own; and once
    it is in one location, another location that needs it is still reported (a second run says so too)."""
    text = ("server {\n    listen 127.0.0.1:1;\n    " + ROUTE + "\n    location / {\n        add_header X-A 1;\n"
            "        proxy_pass http://user-api;\n    }\n}\n")
    after, _ = adopted(nginx, text)
    lines = after.splitlines()
    assert lines[lines.index("        add_header X-A 1;") + 1] == "        " + ROUTE
    two = ("server {\n    listen 127.0.0.1:1;\n    location /a {\n        add_header X-A 1;\n        " + ROUTE + "\n"
           "        proxy_pass http://user-api;\n    }\n    location / {\n        proxy_pass http://user-api;\n    }\n}\n")
    after, manual = adopted(nginx, two, http="    add_header X-Http 1;")
    assert len(manual) == 1 and "line 9" in manual[0] and ROUTE in manual[0]


# -- what the reader must read as nginx does -------------------------------------------------------------------

def test_quotes_and_braces_inside_a_word_are_part_of_it(nginx):
    """nginx starts a quoted string only at the start of a word: `don't` is one word, and so is `x}y`."""
    text = ("server {\n    listen 127.0.0.1:1;\n    location /a { return 200 don't; }\n    location / {\n"
            "        set $a x}y;\n        proxy_pass http://user-api;\n        add_header X-B won't;\n    }\n}\n")
    after, manual = adopted(nginx, text)
    lines = lines_of(after)
    # The location's own add_header: the route line goes beside it.
    assert lines[lines.index("add_header X-B won't;") + 1] == ROUTE
    assert set(KEEP) <= set(lines)


def test_upstream_names_are_matched_as_nginx_does(nginx):
    """user-api is not user-api-v2; nginx matches upstream names (and the scheme) case-insensitively."""
    text = ("server {\n    listen 127.0.0.1:1;\n    location /v2 {\n        proxy_pass http://user-api-v2;\n    }\n"
            "    location / {\n        proxy_pass HTTP://User-API/x/;\n    }\n}\n")
    after, _ = adopted(nginx, text)
    lines = after.splitlines()
    assert lines[lines.index("        proxy_pass http://user-api-v2;") + 1] == "    }"
    assert lines[lines.index("        proxy_pass HTTP://User-API/x/;") + 1] == "        proxy_http_version 1.1;"


# -- what the inserted lines look like -------------------------------------------------------------------------

def test_a_one_line_block_stays_one_line(nginx):
    text = "server { listen 127.0.0.1:1; location / { proxy_pass http://user-api; } }"
    after, _ = adopted(nginx, text)
    assert "\n" not in after
    assert after.startswith("server { " + ROUTE + " listen")


def test_a_comment_after_a_directive_stays_on_its_line(nginx):
    text = ("server { # main {\n    listen 127.0.0.1:1;\n    location / {\n"
            "        proxy_pass http://user-api; # the app }\n    }\n}\n")
    after, _ = adopted(nginx, text)
    lines = after.splitlines()
    assert "        proxy_pass http://user-api; # the app }" in lines and "server { # main {" in lines
    assert lines[lines.index("        proxy_pass http://user-api; # the app }") + 1] == "        proxy_http_version 1.1;"


def test_crlf_lines_get_crlf_lines_and_a_last_line_without_newline_is_kept(nginx):
    text = "server {\r\n\tlisten 127.0.0.1:1;\r\n\tlocation / {\r\n\t\tproxy_pass http://user-api;\r\n\t}\r\n}"
    after, _ = adopted(nginx, text)
    assert "\n" not in after.replace("\r\n", "")
    assert "\r\n\t" + ROUTE + "\r\n" in after and "\r\n\t\tproxy_http_version 1.1;\r\n" in after
    assert after.endswith("}")


def test_several_server_blocks_and_nested_locations(nginx):
    text = ("server {\n    listen 127.0.0.1:1;\n    location / {\n        proxy_pass http://user-api;\n    }\n}\n"
            "server {\n    listen 127.0.0.1:2;\n    add_header X-Frame-Options DENY;\n    location /api/ {\n"
            "        proxy_set_header Host $host;\n        location ~ \\.php$ {\n"
            "            proxy_pass http://user-api;\n        }\n    }\n    location /other {\n"
            "        proxy_pass $scheme://user-api-v2;\n    }\n}\n")
    after, manual = adopted(nginx, text)
    assert manual == [] and after.count(ROUTE) == 2
    lines = after.splitlines()
    assert lines[lines.index("    add_header X-Frame-Options DENY;") + 1] == "    " + ROUTE
    assert lines[lines.index("        proxy_set_header Host $host;") + 1] == '        proxy_set_header Connection "";'


def test_a_huge_file_is_edited_in_bounded_time(nginx):
    """24000 locations (2.4 MB, within the 8 MiB adopt reads): seconds, not hours (anything quadratic in the
    file's size, such as copying the rest of the file per line, takes minutes here)."""
    locations = "".join(f"    location /p{i} {{\n        proxy_pass http://user-api;\n"
                        f"        proxy_set_header Host $host;\n    }}\n" for i in range(24000))
    text = "server {\n    listen 127.0.0.1:1;\n" + locations + "}\n"
    files = nginx.files(text)
    started = time.monotonic()
    inserts, manual = adopt.server_edits(text, upstream="user-api", project="user-api", conf=files)
    after = adopt.apply_inserts(text, inserts)
    assert time.monotonic() - started < 15
    assert len(inserts) == 1 + 2 * 24000 and after.count("proxy_http_version 1.1;") == 24000


# -- generated server blocks -----------------------------------------------------------------------------------

SEPARATORS = st.sampled_from([" ", "\n", "\r\n", "\t", "\n    ", " # a { comment } ;\n", "\n\n"])


@st.composite
def blocks(draw, path: str, depth: int, *, kind: str = "location") -> str:
    """A block nginx accepts: `location PATH { ... }` (or a server's body), with what may appear in it."""
    sep = lambda: draw(SEPARATORS)  # noqa: E731
    items: list[str] = []
    if kind == "server":
        items.append("listen 127.0.0.1:1;")
        items += draw(st.lists(st.sampled_from(["server_name api.example.com;", "add_header X-Frame-Options DENY;",
                                                'proxy_set_header X-Quoted "a\\"b{;";', "proxy_http_version 1.0;"]),
                               max_size=3, unique=True))
    else:
        items += draw(st.lists(st.sampled_from([
            "add_header X-A don't;", "proxy_set_header Host $host;", "proxy_set_header X-Set ${host}x;",
            "proxy_http_version 1.1;", "proxy_set_header Connection $http_connection;", "set $b a}b;",
            "add_header X-B 'c d';"]), max_size=3, unique=True))
        target = draw(st.sampled_from(["http://user-api", "http://user-api-v2", "http://user-api/sub/", "http://$host", None]))
        inner = draw(st.sampled_from([None, "if ($request_method = POST)", "limit_except GET"]))
        if inner is not None and target is not None and "$" not in target and not target.endswith("/"):
            body = "add_header X-If 1; " if inner.startswith("if") and draw(st.booleans()) else ""
            items.append(f"{inner} {{{sep()}{body}proxy_pass {target};{sep()}}}")
        elif target is not None:
            items.append(f"proxy_pass {target};")
    if depth > 0:
        for n in range(draw(st.integers(0, 2))):
            items.append(draw(blocks(f"{path}/l{n}", depth - 1)))
    items = draw(st.permutations(items))
    head = "server" if kind == "server" else f"location {path}"
    return head + " {" + sep() + sep().join(items) + sep() + "}"


@st.composite
def server_files(draw) -> tuple[str, str]:
    servers = [draw(blocks("", 2, kind="server")) for _ in range(draw(st.integers(1, 2)))]
    http = "\n".join(draw(st.lists(st.sampled_from(["    add_header X-Http 1;", "    proxy_set_header X-Http 1;",
                                                     "    proxy_http_version 1.0;"]), max_size=2, unique=True)))
    ending = draw(st.sampled_from(["\n", "", "\r\n", "\n# the end {\n"]))
    return "\n".join(servers) + ending, http


def effective(text: str, skip: set[str]) -> dict:
    """What each block's add_header / proxy_set_header / proxy_http_version are in effect (nginx inherits a
    directive's lines only into a block that sets none of its own), leaving out the lines in `skip`."""
    out = {}

    def own(block, name):
        return [" ".join([d.name, *d.args]) for d in block.children
                if d.name == name and text[d.start:d.end] not in skip]

    def visit(block, inherited, key):
        mine = {}
        for name in ("add_header", "proxy_set_header", "proxy_http_version"):
            mine[name] = own(block, name) or inherited.get(name, [])
        out[key] = mine
        for n, child in enumerate(c for c in block.children if c.is_block):
            visit(child, mine, key + (child.name, n))

    for n, server in enumerate(d for d in nginxconf.parse(text).children if d.name == "server"):
        visit(server, {}, ("server", n))
    return out


@hsettings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                   HealthCheck.function_scoped_fixture])
@given(server_files())
def test_generated_server_blocks_adopt_cleanly(nginx, case):
    text, http = case
    after, manual = adopted(nginx, text, http)
    added = {ROUTE, *KEEP}
    # Inheritance: every block keeps the headers it had (the added lines aside) ...
    assert effective(after, added) == effective(text, added)
    # ... and each server that proxies to user-api gets the route line, or the user is told where to add it.
    for server in (d for d in nginxconf.parse(after).children if d.name == "server"):
        if any(nginxconf.proxies_to(d, "user-api") for d in server.walk()):
            assert ROUTE in after[server.start:server.end] or any(ROUTE in m for m in manual), after
