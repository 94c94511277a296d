"""The devices file's text (collector.devices): line edits that keep what the operator wrote,
checked by parsing the result again, and tomlkit where they do not fit. Sans-IO, except the
last test, which changes devices through the API all at once."""

from __future__ import annotations

import itertools
import time
import tomllib

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.devices import (
    DeviceRegistry,
    DevicesError,
    DevicesFileError,
    edit_devices,
    edit_devices_text,
    new_devices_text,
)

from .helpers import api, start_collector

HAND_WRITTEN = """\
# the fleet, kept by hand
title = "north site"

# the greenhouse, north side
[devices."greenhouse-1"]
secret = "old-1"  # rotated every spring
location = "north"

[devices.greenhouse-2]
secret = 'old-2'

[devices."pump.3"]
secret = "old-3"

[other]
keep = [1, 2]
"""


def devices_in(text: str) -> dict:
    return tomllib.loads(text).get("devices", {})


def test_a_new_secret_changes_only_its_value():
    wanted = {"greenhouse-1": "new-1", "greenhouse-2": "old-2", "pump.3": "old-3"}
    out = edit_devices_text(HAND_WRITTEN, wanted)
    assert out == HAND_WRITTEN.replace('secret = "old-1"', 'secret = "new-1"')
    assert devices_in(out)["greenhouse-1"] == {"secret": "new-1", "location": "north"}


def test_a_removed_device_loses_its_table_and_keeps_the_comments_above_it():
    out = edit_devices_text(HAND_WRITTEN, {"greenhouse-2": "old-2", "pump.3": "old-3"})
    assert out is not None
    assert "greenhouse-1" not in out and "location" not in out
    assert out.startswith("# the fleet, kept by hand\ntitle")
    assert "# the greenhouse, north side\n[devices.greenhouse-2]" in out
    assert tomllib.loads(out)["other"] == {"keep": [1, 2]}
    # the last device before another table
    out = edit_devices_text(HAND_WRITTEN, {"greenhouse-1": "old-1", "greenhouse-2": "old-2"})
    assert out is not None and "pump.3" not in out and "'old-2'\n\n[other]" in out


def test_a_new_device_is_appended_quoted_where_toml_needs_it():
    wanted = {"greenhouse-1": "old-1", "greenhouse-2": "old-2", "pump.3": "old-3"}
    wanted |= {"new_4": 'with "quotes" \\ and ü', "a:b.c": "x"}
    out = edit_devices_text(HAND_WRITTEN, wanted)
    assert out is not None and out.startswith(HAND_WRITTEN)
    assert out.endswith(
        '\n[devices.new_4]\nsecret = "with \\"quotes\\" \\\\ and ü"\n'
        '\n[devices."a:b.c"]\nsecret = "x"\n'
    )
    assert {d: t["secret"] for d, t in devices_in(out).items()} == wanted


def test_crlf_line_ends_are_kept():
    text = '[devices.a]\r\nsecret = "1"\r\n\r\n[devices.b]\r\nsecret = "2"\r\n'
    out = edit_devices_text(text, {"a": "9"})
    assert out == '[devices.a]\r\nsecret = "9"\r\n\r\n'


@pytest.mark.parametrize(
    "text",
    [
        '[devices]\na = { secret = "1" }\nb = { secret = "2" }\n',  # inline tables
        'devices.a.secret = "1"\ndevices.b.secret = "2"\n',  # dotted keys
        '[devices.a]\nsecret = """1"""\n[devices.b]\nsecret = "2"\n',  # a multi-line string
        '[devices.a]\n"secret" = "1"\n[devices.b]\nsecret = "2"\n',  # a quoted key
    ],
)
def test_files_the_line_edits_do_not_fit_are_edited_through_tomlkit(text):
    wanted = {"a": "new", "c": "3"}
    assert edit_devices_text(text, wanted) is None
    out = edit_devices(text, wanted)
    assert {d: t["secret"] for d, t in devices_in(out).items()} == wanted


def test_a_file_that_is_not_toml_is_refused():
    with pytest.raises(DevicesError, match="not valid TOML"):
        edit_devices("[devices.a\nsecret = 1\n", {"a": "1"})


def test_a_registry_keeps_no_parsed_document(tmp_path):
    path = tmp_path / "devices.toml"
    path.write_text(HAND_WRITTEN)
    registry = DeviceRegistry.load(path)
    assert vars(registry).keys() == {"_secrets", "_save_lock"}
    registry.rotate("pump.3")
    registry.save(path)
    assert path.read_text().replace(registry["pump.3"], "old-3") == HAND_WRITTEN


ids = st.from_regex(r"[A-Za-z0-9_.:\-]{1,12}", fullmatch=True)
secrets_ = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
    min_size=1,
    max_size=12,
)
comments = st.lists(st.from_regex(r"#[ a-z]{0,10}", fullmatch=True), max_size=2)


@st.composite
def files(draw):
    """A devices file as a person might keep one: comments, blank lines, other tables, other
    keys in a device's table, both quote styles; and the devices it holds."""
    held = draw(st.dictionaries(ids, secrets_, max_size=6))
    parts = ["\n".join(draw(comments)) + "\n", 'title = "x"\n' if draw(st.booleans()) else ""]
    for device_id, secret in held.items():
        parts += [line + "\n" for line in draw(comments)]
        bare = "." not in device_id and ":" not in device_id and draw(st.booleans())
        key = device_id if bare else f'"{device_id}"'
        value = (
            f"'{secret}'"
            if "'" not in secret and draw(st.booleans())
            else '"' + secret.replace("\\", "\\\\").replace('"', '\\"') + '"'
        )
        parts.append(f"[devices.{key}]\n")
        if draw(st.booleans()):
            parts.append("note = 1\n")
        parts.append(f"secret = {value}{'  # kept' if draw(st.booleans()) else ''}\n")
        parts.append("\n" * draw(st.integers(0, 2)))
        if draw(st.integers(0, 5)) == 0:
            parts.append("[other]\nkeep = true\n")
    text = "".join(parts)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:  # the same [other] twice
        text = text.replace("[other]\nkeep = true\n", "")
    return text


@settings(max_examples=300, deadline=None)
@given(files(), st.dictionaries(ids, secrets_, max_size=6), st.booleans())
def test_an_edit_holds_exactly_the_devices_wanted_and_keeps_the_rest(text, more, drop_some):
    before = tomllib.loads(text)
    had = {d: t["secret"] for d, t in before.get("devices", {}).items()}
    wanted = {d: s for i, (d, s) in enumerate(had.items()) if not (drop_some and i % 2)}
    wanted |= more
    out = edit_devices(text, wanted)
    after = tomllib.loads(out)
    assert {d: t["secret"] for d, t in after.get("devices", {}).items()} == wanted
    assert {k: v for k, v in after.items() if k != "devices"} == {
        k: v for k, v in before.items() if k != "devices"
    }
    for device_id in wanted.keys() & had.keys():  # other keys of a device's table stay
        assert after["devices"][device_id].get("note") == before["devices"][device_id].get("note")
    lined = edit_devices_text(text, wanted)
    assert lined == out  # files as people keep them take the line edits, not tomlkit
    removed = had.keys() - wanted.keys()
    for line in text.splitlines():  # every comment stays (those of a removed table's own
        if line.startswith("#"):  # key lines go with them)
            assert line in out
    assert not any(f"[devices.{d}]" in out or f'[devices."{d}"]' in out for d in removed)
    # nothing to change: the same text
    assert edit_devices(text, had) == text


def test_comments_after_a_removed_table_stay():
    text = '[devices.a]\nsecret = "1"\n# about b\n\n# ---- site ----\n\n[other]\nx = 1\n# end\n'
    out = edit_devices_text(text, {})
    assert out == "# about b\n\n# ---- site ----\n\n[other]\nx = 1\n# end\n"
    text = '[other]\nx = 1\n\n[devices.a]\nsecret = "1"  # a\n\n# the end of the file\n'
    assert edit_devices_text(text, {}) == "[other]\nx = 1\n\n# the end of the file\n"


def test_line_separators_that_are_not_newlines_stay_in_their_line():
    text = '# a comment\u2028with a line separator\n[devices.a]\nsecret = "x\u2028y"\n'
    out = edit_devices_text(text, {"a": "z", "b": "w"})
    assert out is not None and out.startswith("# a comment\u2028with a line separator\n")


def test_save_keeps_crlf_and_refuses_a_file_left_invalid(tmp_path):
    path = tmp_path / "devices.toml"
    path.write_bytes(b'# crlf\r\n[devices.a]\r\nsecret = "1"\r\n')
    registry = DeviceRegistry.load(path)
    registry.add("b", "2")
    registry.save(path)
    assert (
        path.read_bytes()
        == b'# crlf\r\n[devices.a]\r\nsecret = "1"\r\n\r\n[devices.b]\r\nsecret = "2"\r\n'
    )
    for broken in (b"[devices.a\n", b"\xff\xfe", b"devices = 5\n"):
        path.write_bytes(broken)
        with pytest.raises(DevicesFileError):  # an OSError: a change that cannot be saved is undone
            registry.save(path)
        assert path.read_bytes() == broken


def test_a_new_file():
    text = new_devices_text({"a": "1", "b.c": 'q"'})
    assert text.startswith("# trio-collector device credentials")
    assert {d: t["secret"] for d, t in devices_in(text).items()} == {"a": "1", "b.c": 'q"'}


async def test_changes_at_once_through_the_api_are_all_saved(nursery, tmp_path):
    path = tmp_path / "devices.toml"
    path.write_text(HAND_WRITTEN)
    collector, _ = await start_collector(nursery, devices=DeviceRegistry.load(path), http_port=0)
    collector.devices_file = path
    secrets: dict[str, str] = {}

    async def add(i: int) -> None:
        status, body = await api(collector, "POST", "/api/devices", {"id": f"new-{i}"})
        assert status == 201
        secrets[f"new-{i}"] = body["secret"]

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(add, i)
        n.start_soon(api, collector, "POST", "/api/devices/pump.3/rotate")
        n.start_soon(api, collector, "DELETE", "/api/devices/greenhouse-2")
    saved = DeviceRegistry.load(path)
    assert dict(saved) == dict(collector.devices)
    assert saved.keys() == {"greenhouse-1", "pump.3", *secrets}
    assert saved["pump.3"] != "old-3" and all(saved[d] == s for d, s in secrets.items())
    assert path.read_text().startswith(HAND_WRITTEN.split("[devices.greenhouse-2]")[0])


async def test_a_reload_never_undoes_a_change_in_flight(nursery, tmp_path, monkeypatch):
    path = tmp_path / "devices.toml"
    path.write_text(HAND_WRITTEN)
    collector, _ = await start_collector(nursery, devices=DeviceRegistry.load(path), http_port=0)
    collector.devices_file = path
    read = DeviceRegistry.read

    def slow_read(p):
        found = read(p)
        time.sleep(0.3)  # a large file: an API change comes in meanwhile
        return found

    monkeypatch.setattr(DeviceRegistry, "read", staticmethod(slow_read))
    answers = {}

    async def change(name, *request):
        answers[name] = await api(collector, *request)

    async with trio.open_nursery() as n:
        n.start_soon(collector.reload_async)
        await trio.sleep(0.05)
        n.start_soon(change, "add", "POST", "/api/devices", {"id": "new-1"})
        n.start_soon(change, "rotate", "POST", "/api/devices/pump.3/rotate")
        n.start_soon(change, "remove", "DELETE", "/api/devices/greenhouse-2")
    assert {k: v[0] for k, v in answers.items()} == {"add": 201, "rotate": 200, "remove": 200}
    assert dict(collector.devices) == dict(read(path))
    assert collector.devices["new-1"] == answers["add"][1]["secret"]
    assert collector.devices["pump.3"] == answers["rotate"][1]["secret"]
    assert "greenhouse-2" not in collector.devices


async def test_a_change_that_cannot_be_saved_is_undone_and_no_other(nursery, tmp_path, monkeypatch):
    path = tmp_path / "devices.toml"
    path.write_text(HAND_WRITTEN)
    registry = DeviceRegistry.load(path)
    collector, _ = await start_collector(nursery, devices=registry, http_port=0)
    collector.devices_file = path
    save, calls = DeviceRegistry.save, []

    def failing_save(self, p, devices=None, *, changes=None):
        calls.append(sorted(changes or devices or self))
        if "new-2" in (changes or devices or self):
            raise OSError(28, "No space left on device")
        save(self, p, devices, changes=changes)

    monkeypatch.setattr(DeviceRegistry, "save", failing_save)
    answers = {}

    async def add(name):
        answers[name] = await api(collector, "POST", "/api/devices", {"id": name})

    async with trio.open_nursery() as n:
        for name in ("new-1", "new-2", "new-3"):
            n.start_soon(add, name)
            await trio.sleep(0.01)
    assert answers["new-2"][0] == 500 and answers["new-2"][1]["error"]["code"] == "save_failed"
    assert answers["new-1"][0] == answers["new-3"][0] == 201
    assert dict(collector.devices) == dict(DeviceRegistry.read(path))
    assert "new-2" not in collector.devices and {"new-1", "new-3"} <= collector.devices.keys()
    assert not any("new-2" in c and "new-3" in c for c in calls)  # one change at a time
    # The file left invalid by hand: a change cannot be saved, so it is not made.
    monkeypatch.setattr(DeviceRegistry, "save", save)
    path.write_text(HAND_WRITTEN + "[oops\n")
    status, body = await api(collector, "POST", "/api/devices/pump.3/rotate")
    assert (status, body["error"]["code"]) == (500, "save_failed")
    assert collector.devices["pump.3"] == "old-3"


async def test_a_cache_save_that_fails_is_tried_again(nursery, autojump_clock, tmp_path, caplog):
    """[cluster] shared_devices keeps the devices file as a copy saved in the background: a
    save that fails is tried again after 1, 2, 4 ... s (at most 60), not only at the next
    change."""
    path = tmp_path / "devices.toml"
    path.write_text(HAND_WRITTEN)
    registry = DeviceRegistry.load(path)
    collector, _ = await start_collector(nursery, devices=registry, http_port=0)
    collector.devices_file = path
    save, tries, saved = collector._save_devices_file, [], trio.Event()

    async def full_disk_at_first(device_id=None):
        tries.append(trio.current_time())
        if len(tries) <= 3:
            raise OSError(28, "No space left on device")
        await save(device_id)
        saved.set()

    collector._save_devices_file = full_disk_at_first
    collector.devices.add("new-1")  # as a shared change is made: in memory at once, the file later
    collector.request_devices_cache_save()
    await saved.wait()  # no deadline: the clock jumps while the save's thread runs
    await trio.sleep(60)
    assert [b - a for a, b in itertools.pairwise(tries)] == pytest.approx([1, 2, 4], abs=0.01)
    assert "new-1" in DeviceRegistry.read(path)
    assert "No space left on device; trying again in 4s" in caplog.text


def test_a_change_keeps_what_another_process_wrote_meanwhile(tmp_path):
    path = tmp_path / "devices.toml"
    path.write_text(HAND_WRITTEN)
    server = DeviceRegistry.load(path)
    other = DeviceRegistry.load(path)  # `collector devices add --devices FILE`, say
    other.add("from-the-cli", "s1")
    other.save(path)
    server.rotate("pump.3")
    server.save(path, changes={"pump.3": server["pump.3"]})
    server.remove("greenhouse-2")
    server.save(path, changes={"greenhouse-2": None})
    saved = DeviceRegistry.read(path)
    assert saved == {"greenhouse-1": "old-1", "pump.3": server["pump.3"], "from-the-cli": "s1"}
