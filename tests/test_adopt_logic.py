"""Pure tests of `adopt`'s deciding code: the nginx configuration reader, the lines it inserts into a hand-written
server block (and where, so that nginx's header inheritance does not change), the env-file additions and the
upstream file that replaces the guide's hand-written one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from bluegreen import adopt, nginxconf
from bluegreen import docker as dk
from bluegreen import nginx as ngx
from bluegreen.config import parse_env, project_from_entries
from bluegreen.errors import UsageError

ROUTE = ngx.add_header_line("user-api")

GUIDE_BLOCK = """\
server {
    listen 80;
    server_name api.example.com;

    location / {
        proxy_pass http://user-api;
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
    }
}
"""


def conf(*files: tuple[str, str]) -> adopt.NginxFiles:
    main = ("/etc/nginx/nginx.conf", "http {\n    include /etc/nginx/conf.d/*.conf;\n}\n")
    dump = "".join(f"# configuration file {path}:\n{text}\n" for path, text in (main, *files))
    return adopt.NginxFiles(dump)


def edited(text: str, c: adopt.NginxFiles | None = None) -> tuple[str, list[str]]:
    inserts, manual = adopt.server_edits(text, upstream="user-api", project="user-api",
                                         conf=c or conf(("/etc/nginx/conf.d/user-api.conf", text)))
    return adopt.apply_inserts(text, inserts), manual


def only_insertions(before: str, after: str) -> list[str]:
    """The lines `after` has besides those of `before`, asserting that every line of `before` is kept in order."""
    old, new = before.splitlines(), after.splitlines()
    added, i = [], 0
    for line in new:
        if i < len(old) and line == old[i]:
            i += 1
        else:
            added.append(line.strip())
    assert i == len(old), "a line of the original was changed or dropped"
    return added


# -- the reader ---------------------------------------------------------------------------------------------

def test_reader_follows_quotes_comments_variables_and_nesting():
    text = 'http { # a { comment\n  map $a ${b}x { "}" 1; default \'{\'; }\n  server { location / { return 200 "a;b"; } }\n}\n'
    root = nginxconf.parse(text)
    (http,) = root.children
    assert [c.name for c in http.children] == ["map", "server"]
    assert http.children[0].args == ["$a", "${b}x"] and [c.args for c in http.children[0].children] == [["1"], ["{"]]
    ret = next(d for d in root.walk() if d.name == "return")
    assert ret.args == ["200", "a;b"] and ret.parent.name == "location" and ret.chain()[-1] is root
    assert text[http.start:http.end].startswith("http {") and text[http.start:http.end].endswith("}")


@pytest.mark.parametrize("bad", ["server {", "server { listen 80; }}", 'return "x;', "listen 80", "{ }"])
def test_reader_refuses_what_nginx_would_refuse(bad):
    with pytest.raises(nginxconf.ConfSyntax):
        nginxconf.parse(bad)


@hsettings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab {};#\"'\\$\n x")), max_size=80))
def test_reader_never_fails_otherwise(text):
    try:
        root = nginxconf.parse(text)
    except nginxconf.ConfSyntax:
        return
    for node in root.walk():
        assert 0 <= node.start < node.end <= len(text)


def test_reader_refuses_absurd_nesting():
    with pytest.raises(nginxconf.ConfSyntax):
        nginxconf.parse("a {" * 100 + "}" * 100)


# -- the server block -----------------------------------------------------------------------------------------

def test_the_guide_block_gets_the_route_line_and_keep_alive_and_nothing_else():
    after, manual = edited(GUIDE_BLOCK)
    assert manual == []
    assert only_insertions(GUIDE_BLOCK, after) == [ROUTE, "proxy_http_version 1.1;", 'proxy_set_header Connection "";']
    # The route line at the server level (the location sets no add_header); Connection beside the other headers.
    lines = after.splitlines()
    assert lines[1] == "    " + ROUTE
    assert lines[lines.index("        proxy_set_header X-Forwarded-Proto $scheme;") + 1] == '        proxy_set_header Connection "";'
    assert lines[lines.index("        proxy_pass http://user-api;") + 1] == "        proxy_http_version 1.1;"
    nginxconf.parse(after)
    assert edited(after) == (after, [])  # a second run adds nothing


def test_a_location_with_its_own_add_header_gets_the_route_line_there():
    text = GUIDE_BLOCK.replace("        proxy_pass", "        add_header X-Frame-Options DENY;\n        proxy_pass")
    after, _ = edited(text)
    lines = after.splitlines()
    assert lines[lines.index("        add_header X-Frame-Options DENY;") + 1] == "        " + ROUTE
    assert "    " + ROUTE not in lines


def test_headers_set_in_the_http_block_are_left_to_the_user():
    text = GUIDE_BLOCK.replace("        proxy_set_header", "        # none\n        #proxy_set_header")
    main = ("/etc/nginx/nginx.conf", "http {\n    add_header X-Frame-Options DENY;\n"
            "    proxy_set_header Host $host;\n    include /etc/nginx/conf.d/*.conf;\n}\n")
    files = adopt.NginxFiles("".join(f"# configuration file {p}:\n{t}\n" for p, t in
                                     (main, ("/etc/nginx/conf.d/user-api.conf", text))))
    after, manual = edited(text, files)
    assert only_insertions(text, after) == ["proxy_http_version 1.1;"]
    assert len(manual) == 2 and ROUTE in manual[0] and 'Connection ""' in manual[1]


def test_debian_proxy_params_include_counts_as_the_locations_headers():
    text = "server {\n    listen 80;\n    location / {\n        include proxy_params;\n        proxy_pass http://user-api;\n    }\n}\n"
    files = conf(("/etc/nginx/proxy_params", "proxy_set_header Host $http_host;\nproxy_set_header X-Real-IP $remote_addr;\n"),
                 ("/etc/nginx/sites-enabled/default", text))
    after, manual = edited(text, files)
    assert manual == []
    lines = after.splitlines()
    assert lines[lines.index("        include proxy_params;") + 1] == '        proxy_set_header Connection "";'


def test_a_block_that_proxies_elsewhere_or_is_already_done_is_untouched():
    other = GUIDE_BLOCK.replace("http://user-api;", "http://user-api-old;")
    assert edited(other) == (other, [])
    done = GUIDE_BLOCK.replace("    listen 80;", "    listen 80;\n    " + ROUTE).replace(
        "proxy_pass http://user-api;", 'proxy_pass http://user-api;\n        proxy_http_version 1.1;\n        proxy_set_header Connection "";')
    assert edited(done) == (done, [])
    # A websocket block's own Connection header and HTTP version are the user's: kept, nothing added.
    ws = GUIDE_BLOCK.replace("proxy_pass http://user-api;", "proxy_pass http://user-api/;\n        proxy_http_version 1.0;\n"
                             "        proxy_set_header Connection $connection_upgrade;")
    assert only_insertions(ws, edited(ws)[0]) == [ROUTE]


def test_probe_settings_come_from_the_blocks_listen_and_server_name():
    cfg = project_from_entries("user-api", "user-api.env", parse_env("IMAGE=acme/api\n", "user-api.env"))
    assert adopt.probe_settings(GUIDE_BLOCK, "user-api", cfg) == {"SERVER_NAME": "api.example.com"}
    text = GUIDE_BLOCK.replace("listen 80;", "listen 443 ssl;\n    listen 127.0.0.1:8080;").replace("api.example.com", "_")
    assert adopt.probe_settings(text, "user-api", cfg) == {"NGINX_URL": "http://127.0.0.1:8080"}


# -- the env file and the upstream file -------------------------------------------------------------------------

GUIDE_ENV = "IMAGE=ghcr.io/acme/user-api\nSPRING_PROFILES=prod\nDB_PASSWORD=s3cret\n# HEALTH_TIMEOUT=60\n"


def test_env_additions_keep_every_line_and_add_each_missing_setting_once():
    added, keys = adopt.env_additions(GUIDE_ENV, set_values={"SERVER_NAME": "api.example.com"})
    text = GUIDE_ENV + added
    assert text.startswith(GUIDE_ENV) and "SERVER_NAME=api.example.com\n" in text
    assert "#BLUE_PORT=8081\n" in text and "#PULL=always\n" in text and "HEALTH_TIMEOUT=" not in added
    assert "IMAGE" not in keys and "SPRING_PROFILES" not in keys and "BLUE_PORT" in keys
    entries = parse_env(text, "user-api.env")
    assert {e.key: e.value for e in entries} == {"IMAGE": "ghcr.io/acme/user-api", "SPRING_PROFILES": "prod",
                                                 "DB_PASSWORD": "s3cret", "SERVER_NAME": "api.example.com"}
    assert adopt.env_additions(text, set_values={"SERVER_NAME": "api.example.com"}) == ("", [])


def cfg_of(text: str = GUIDE_ENV):
    return project_from_entries("user-api", "user-api.env", parse_env(text, "user-api.env"))


def deploy_sh_container(tag="v1", image="ghcr.io/acme/user-api", name="user-api-blue"):
    return dk.Container(name=name, id="x", status="running", exit_code=0, image=f"{image}:{tag}")


def test_the_hand_written_upstream_becomes_the_managed_one_on_the_same_port():
    path = Path("/opt/deploy/nginx/conf.d/user-api-upstream.conf")
    change, _ = adopt.upstream_change(cfg_of(), path, "upstream user-api {\n    server 127.0.0.1:8081;\n}\n",
                                      {"user-api-blue": deploy_sh_container()}, Path("/opt/deploy"))
    up = ngx.parse_upstream(change.after)
    assert (up.name, up.port, len(up.token)) == ("user-api", 8081, 32)
    assert "colour=blue tag=v1 " in change.after and "keepalive 16;" in change.after
    assert ngx.route_variable("user-api") in change.after
    # Already managed: nothing to do.
    again, why = adopt.upstream_change(cfg_of(), path, change.after, {}, Path("/opt/deploy"))
    assert again is None and "managed file already" in why


@pytest.mark.parametrize("text,said", [
    (None, "does not exist"),
    ("upstream user-api { least_conn; }\n", "no `upstream NAME"),
    ("upstream user-api { server 127.0.0.1:9000; }\n", "neither BLUE_PORT (8081) nor GREEN_PORT (8082)"),
])
def test_an_upstream_adopt_cannot_take_over_is_refused(text, said):
    with pytest.raises(UsageError) as exc:
        adopt.upstream_change(cfg_of(), Path("/x/user-api-upstream.conf"), text, {}, Path("/x"))
    assert said in exc.value.message and "nothing was changed" in exc.value.message


def test_the_upstream_says_the_tag_deploy_sh_ran_and_reads_a_one_line_file():
    change, _ = adopt.upstream_change(cfg_of(), Path("/x/user-api-upstream.conf"),
                                      "upstream user-api { server 127.0.0.1:8082; }\n",
                                      {"user-api-green": deploy_sh_container("v7", name="user-api-green")}, Path("/x"))
    assert "colour=green tag=v7 " in change.after and ngx.parse_upstream(change.after).port == 8082


def test_split_dump_keeps_each_file():
    dump = "# configuration file /a.conf:\nhttp {}\n\n# configuration file /b conf.conf:\nserver {}\n"
    assert adopt.split_dump(dump) == [("/a.conf", "http {}\n\n"), ("/b conf.conf", "server {}\n")]
    assert re.search("x", "x")


@pytest.mark.parametrize("text", ["upstream user-api { server localhost:8082; }\n# where deploy.sh routes\n",
                                  "upstream user-api {\n    server 127.0.0.1:9999 down;\n}\n"])
def test_an_upstream_file_with_nothing_else_in_it_is_taken_over(text):
    change, _ = adopt.upstream_change(cfg_of(), Path("/x/user-api-upstream.conf"), text, {}, Path("/x"))
    assert change is not None


@pytest.mark.parametrize("text,said", [
    ("upstream user-api { server 127.0.0.1:8081 max_fails=3; }\n", "(set UPSTREAM_MAX_FAILS=3 in user-api.env)"),
    ("upstream user-api { server 127.0.0.1:8081; server 127.0.0.1:8082 backup; }\n", "`server 127.0.0.1:8082 backup;`"),
    ("upstream user-api { server 127.0.0.1:8081; least_conn; }\nmap $a $b { default 1; }\n", "`least_conn;`; `map $a $b { ... }`"),
])
def test_an_upstream_file_holding_more_is_refused_naming_it(text, said):
    with pytest.raises(UsageError) as exc:
        adopt.upstream_change(cfg_of(), Path("/x/user-api-upstream.conf"), text, {}, Path("/x"))
    assert said in exc.value.message and "Nothing was changed" in exc.value.message


def test_an_upstream_name_that_is_not_plain_text_is_refused():
    text = b"upstream user-\xe9 { server 127.0.0.1:8081; }\n".decode("utf-8", "surrogateescape")
    with pytest.raises(UsageError) as exc:
        adopt.upstream_change(cfg_of(), Path("/x/user-api-upstream.conf"), text, {}, Path("/x"))
    assert "not plain text" in exc.value.message and exc.value.message.isprintable()


def test_an_include_glob_does_not_reach_into_subdirectories():
    """nginx's `include conf.d/*.conf` (glob(3)) loads conf.d/x.conf, not conf.d/snippets/headers.conf."""
    files = conf(("/etc/nginx/conf.d/snippets/headers.conf", "add_header X-Frame-Options DENY;\n"),
                 ("/etc/nginx/conf.d/user-api.conf", GUIDE_BLOCK))
    assert not files.http_sets("add_header")
    after, manual = edited(GUIDE_BLOCK, files)
    assert manual == [] and ROUTE in after


def test_an_nginx_conf_the_reader_cannot_follow_leaves_the_header_lines_to_the_user():
    """If nginx.conf itself cannot be read (a dump cut short), whether its http block sets add_header is
    unknown: the route line is left to the user rather than placed where it might stop inherited headers."""
    dump = ("# configuration file /etc/nginx/nginx.conf:\nhttp {\n    add_header X-Frame-Options DENY;\n"
            "    include /etc/nginx/conf.d/*.conf;\n" + "x {" * 70 + "\n"
            "# configuration file /etc/nginx/conf.d/user-api.conf:\n" + GUIDE_BLOCK + "\n")
    files = adopt.NginxFiles(dump)
    after, manual = edited(GUIDE_BLOCK, files)
    assert ROUTE not in after and any(ROUTE in m for m in manual)
