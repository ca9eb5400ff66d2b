"""Property tests (hypothesis): state files, the upstream parser, lock/freeze files and journal lines of any
bytes or any JSON shape never raise; what parses is usable by every consumer (render, rollback target)."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bluegreen import journal, lock, nginx, state

FAST = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SHAPES = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FILES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([10 ** 400, -(10 ** 400), 2 ** 63, 10 ** 12, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=8,
)
ENTRY_KEYS = sorted(journal.Entry.__dataclass_fields__)
GOOD = {"time": "2026-01-01T00:00:00+00:00", "host": "h", "user": "u", "project": "p", "action": "deploy", "tag": "v1",
        "result": "deployed", "exit_code": 0, "duration": 1.0, "steps": {"pull": 0.1}}


@st.composite
def entry_dicts(draw):
    """Mostly well-formed entries with some fields replaced by any JSON value, some dropped, some added."""
    data = dict(GOOD)
    for key in draw(st.lists(st.sampled_from(ENTRY_KEYS), max_size=4)):
        data[key] = draw(json_values)
    for key in draw(st.lists(st.sampled_from(ENTRY_KEYS), max_size=2)):
        data.pop(key, None)
    data.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2)))
    return data


def _use(entries: list) -> None:
    """What history, status, rollback and prune do with parsed entries."""
    journal.render(entries)
    journal.successful_tags(entries)
    for serving in (None, "v1", "x"):
        journal.rollback_target(entries, serving)
    for e in entries:
        json.loads(e.to_json())


@SHAPES
@given(st.lists(entry_dicts(), max_size=4))
def test_journal_lines_of_any_shape_never_raise(dicts):
    lines = [json.dumps(d) for d in dicts]
    entries = list(journal.parse_lines(lines))
    assert all(isinstance(e, journal.Entry) for e in entries)
    for e in entries:
        assert isinstance(e.tag, str) and isinstance(e.message, str) and isinstance(e.duration, float)
        assert all(isinstance(k, str) for k in e.steps)
    _use(entries)


@SHAPES
@given(st.lists(json_values, max_size=4))
def test_journal_lines_of_any_json_never_raise(values):
    lines = [json.dumps(v) for v in values]
    _use(list(journal.parse_lines(lines)))


@FAST
@given(st.lists(st.text(alphabet=st.characters(), max_size=80), max_size=6))
def test_journal_lines_of_any_text_never_raise(lines):
    _use(list(journal.parse_lines(lines)))


@FAST
@given(st.text(alphabet=string.printable + "\u2028\u00a0\ufffd\x00\x1b", max_size=400))
def test_the_upstream_parser_never_raises_on_text(text):
    nginx.parse_upstream(text)


UPSTREAM_PARTS = ["upstream ", "x", " {", "}", " server ", "127.0.0.1:", "8081", "65536", "99999999999999999999",
                  ";", "\n", "# bluegreen ", "project=", "colour=", "blue", "tag=", "token=", "map ", "$http_x",
                  " down", "\ufffd", "\x00", " ", "#", "\"", "'", "default ", "-", "0x1F", "\u0661"]


@FAST
@given(st.lists(st.sampled_from(UPSTREAM_PARTS), max_size=60))
def test_the_upstream_parser_never_raises_on_near_miss_upstreams(parts):
    nginx.parse_upstream("".join(parts))


@FAST
@given(st.integers(min_value=0, max_value=10 ** 30), st.text(max_size=20), st.text(max_size=20))
def test_the_upstream_parser_never_raises_on_rendered_shapes(port, name, token):
    text = f"upstream {name} {{\n    server 127.0.0.1:{port};\n}}\n# bluegreen project={name} colour=blue tag=v token={token}\n"
    nginx.parse_upstream(text)


def test_the_upstream_parser_reads_back_what_deploy_writes():
    text = nginx.render_upstream(name="app", port=8082, project="app", colour="green", tag="v2", token="0" * 32)
    parsed = nginx.parse_upstream(text)
    assert parsed is not None and parsed.port == 8082


@pytest.fixture(scope="module")
def statedir(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    (root / "projects").mkdir()
    return root


@FILES
@given(st.binary(max_size=300))
def test_state_files_of_any_bytes_never_raise(statedir, raw):
    path = statedir / "projects" / "p.active"
    path.write_bytes(raw)
    assert state.read_active(path) in (None, "blue", "green")
    text = state.read_text(path)
    assert isinstance(text, str)
    nginx.parse_upstream(text)


@FILES
@given(st.binary(max_size=300))
def test_lock_and_freeze_files_of_any_bytes_never_raise(statedir, raw):
    path = statedir / "projects" / "p.lock"
    path.write_bytes(raw)
    holder = lock.read_holder(path)
    assert holder is None or isinstance(holder.pid, int)
    path = statedir / "projects" / "p.freeze"
    path.write_bytes(raw)
    freeze = lock.read_freeze(path)
    assert freeze is not None and isinstance(freeze.describe(), str)


@FILES
@given(st.lists(st.one_of(st.binary(max_size=60), entry_dicts().map(lambda d: json.dumps(d).encode())), max_size=4))
def test_journal_files_of_any_bytes_never_raise(statedir, chunks):
    path = statedir / "projects" / "p.journal"
    path.write_bytes(b"\n".join(chunks))
    _use(journal.read(path))
    _use(journal.read(path, max_bytes=50))
    _use(journal.read_tail(path))
