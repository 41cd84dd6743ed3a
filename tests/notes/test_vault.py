"""The vault writer never clobbers the owner's writing, never writes twice, never leaves the vault."""

from __future__ import annotations

import datetime as dt
import os

import pytest
import yaml

from idp_pipelines.notes import vault as v
from idp_pipelines.notes.vault import GeneratedFile, Note, VaultError, write_notes


def note(commits: list[str], path: str = "Dev Log/2024-05-01.md") -> Note:
    props = {"type": "dev-log", "date": dt.date(2024, 5, 1), "tags": ["dev-log", "repo/lab"],
             "repos": ["[[Repos/lab|lab]]"], "commits": len(commits), "generator": v.GENERATOR}
    return Note(path, props, (("commits", "\n".join(f"- {c}" for c in commits)), ("links", "- see [[Repos/lab]]")),
                preamble="# Dev log 2024-05-01\n\n")


def test_round_trip_keeps_the_owners_text_and_properties_byte_for_byte(tmp_path):
    vault = tmp_path / "vault"
    first = write_notes(vault, [note(["a1 first"])])
    assert first.created == ["Dev Log/2024-05-01.md"]
    path = vault / "Dev Log" / "2024-05-01.md"
    text = path.read_text()
    assert text.startswith("---\ntype: \"dev-log\"\ndate: 2024-05-01\n")
    fm = yaml.safe_load(text.split("---\n")[1])
    assert fm["tags"] == ["dev-log", "repo/lab"] and fm["repos"] == ["[[Repos/lab|lab]]"] and fm["commits"] == 1
    assert "%% idp:begin commits sha256=" in text and "%% idp:end commits %%" in text

    # the owner writes outside the blocks, adds properties and a tag
    owned_top = "My notes for the day: the GPU fan is loud.\n"
    owned_end = "\n## Thoughts\nTry a smaller batch. 100% sure? [[Ideas]]\n"
    edited = (text.replace("# Dev log 2024-05-01\n", "# Dev log 2024-05-01\n" + owned_top)
              .replace("tags:\n", "mood: \"tired\"  # my own\ntags:\n  - personal\n") + owned_end)
    path.write_text(edited)

    second = write_notes(vault, [note(["a1 first", "b2 second", "c3 third"])])
    assert second.updated == [str("Dev Log/2024-05-01.md")] and not second.edited_blocks
    new = path.read_text()
    assert owned_top in new and new.endswith(owned_end)
    assert 'mood: "tired"  # my own\n' in new
    fm = yaml.safe_load(new.split("---\n")[1])
    assert fm["commits"] == 3 and fm["mood"] == "tired" and fm["tags"] == ["dev-log", "repo/lab", "personal"]
    assert new.count("- a1 first") == 1 and "- c3 third" in new and new.count("%% idp:begin commits") == 1

    mtime = path.stat().st_mtime_ns
    third = write_notes(vault, [note(["a1 first", "b2 second", "c3 third"])])
    assert third.written == [] and third.unchanged == ["Dev Log/2024-05-01.md"]
    assert path.stat().st_mtime_ns == mtime  # no rewrite, no mtime churn


def test_a_block_edited_by_hand_is_left_as_is_and_reported(tmp_path):
    vault = tmp_path / "vault"
    write_notes(vault, [note(["a1 first"])])
    path = vault / "Dev Log" / "2024-05-01.md"
    path.write_text(path.read_text().replace("- a1 first", "- a1 first (this one broke the build!)"))
    owner_version = path.read_text()
    report = write_notes(vault, [note(["a1 first", "b2 second"])])
    assert report.edited_blocks == {"Dev Log/2024-05-01.md": ["commits"]}
    new = path.read_text()
    assert "(this one broke the build!)" in new and "b2 second" not in new
    assert yaml.safe_load(new.split("---\n")[1])["commits"] == 2  # properties still follow the data
    assert new.split("---\n", 2)[2] == owner_version.split("---\n", 2)[2]

    # the owner deletes the block (markers included): the generator writes it again
    start, end = new.index("%% idp:begin commits"), new.index("%% idp:end commits %%") + len("%% idp:end commits %%")
    path.write_text(new[:start] + new[end:])
    again = write_notes(vault, [note(["a1 first", "b2 second"])])
    assert not again.edited_blocks and "- b2 second" in path.read_text()
    assert path.read_text().count("%% idp:begin commits") == 1


def test_a_note_the_owner_deleted_is_not_recreated_unless_asked(tmp_path):
    vault = tmp_path / "vault"
    write_notes(vault, [note(["a"]), GeneratedFile("Benchmarks/plot.svg", b"<svg/>")])
    (vault / "Dev Log" / "2024-05-01.md").unlink()
    (vault / "Benchmarks" / "plot.svg").unlink()
    report = write_notes(vault, [note(["a", "b"]), GeneratedFile("Benchmarks/plot.svg", b"<svg/>")])
    assert sorted(report.deleted_by_owner) == ["Benchmarks/plot.svg", "Dev Log/2024-05-01.md"]
    assert not (vault / "Dev Log" / "2024-05-01.md").exists()
    back = write_notes(vault, [note(["a", "b"])], recreate=True)
    assert back.created == ["Dev Log/2024-05-01.md"]


def test_owner_yaml_that_does_not_parse_is_left_untouched(tmp_path):
    vault = tmp_path / "vault"
    write_notes(vault, [note(["a"])])
    path = vault / "Dev Log" / "2024-05-01.md"
    broken = path.read_text().replace("commits: 1\n", "commits: 1\nmine: [unclosed\n")
    path.write_text(broken)
    report = write_notes(vault, [note(["a", "b"])])
    assert report.frontmatter_unparsed == ["Dev Log/2024-05-01.md"]
    new = path.read_text()
    assert new.split("---\n")[1] == broken.split("---\n")[1] and "- b" in new


def test_no_temp_files_are_left_and_writes_are_atomic_replacements(tmp_path):
    vault = tmp_path / "vault"
    write_notes(vault, [note(["a"])])
    path = vault / "Dev Log" / "2024-05-01.md"
    inode = path.stat().st_ino
    write_notes(vault, [note(["a", "b"])])
    assert path.stat().st_ino != inode  # replaced by rename, never truncated in place
    assert not [p for p in vault.rglob("*") if p.name.endswith(".idp-tmp")]


@pytest.mark.parametrize("text", ["../../etc/passwd", "/abs/path", "a/b\\c", "x|y#z^[w]", "\x00\x1b[31mred\n",
                                  "..", ".hidden", "CON", "é" * 300, "\u202egnp.exe"])
def test_safe_name_is_one_plain_segment(text):
    name = v.safe_name(text)
    assert name and "/" not in name and "\\" not in name and not name.startswith(".")
    assert not set(name) & set('|#^[]:*?"<>') and len(name.encode()) <= 100
    assert all(ch.isprintable() for ch in name) and "\u202e" not in name and name.lower() != "con"


def test_paths_that_would_leave_the_vault_are_refused(tmp_path):
    vault = tmp_path / "vault"
    (vault / "Dev Log").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", vault / "escape")
    for bad in ["../x.md", "/etc/x.md", "Dev Log/../../x.md", "escape/x.md", "a\\..\\x.md", ""]:
        with pytest.raises(VaultError):
            v.resolve_inside(vault, bad)
    report = write_notes(vault, [note(["a"], path="../evil.md"), note(["a"], path="escape/evil.md"),
                                 note(["a"], path="ok.md")])
    assert len(report.refused) == 2 and report.created == ["ok.md"]
    assert not list((tmp_path / "outside").iterdir()) and not (tmp_path / "evil.md").exists()


def test_obsidian_date_formats_and_daily_paths():
    day = dt.date(2024, 5, 1)
    assert v.format_moment(day, "YYYY-MM-DD") == "2024-05-01"
    assert v.format_moment(day, "dddd, Do MMMM YYYY [week] WW") == "Wednesday, 1st May 2024 week 18"
    assert v.format_moment(day, "ddd D/M/YY") == "Wed 1/5/24"
    assert v.daily_note_path(day) == "Dev Log/2024-05-01.md"
    assert v.daily_note_path(day, "Journal/Dev", "YYYY/MM/YYYY-MM-DD") == "Journal/Dev/2024/05/2024-05-01.md"
    assert v.daily_note_path(day, "../../etc", "[..]/YYYY") == "etc/2024.md"


def test_a_generator_waiting_too_long_for_the_vault_fails_naming_the_lock_and_its_holder(tmp_path, monkeypatch):
    from idp_pipelines.locks import file_lock

    vault = tmp_path / "vault"
    write_notes(vault, [note(["a1 first"])])
    before = (vault / "Dev Log" / "2024-05-01.md").read_bytes()
    monkeypatch.setattr(v, "LOCK_TIMEOUT_S", 0.3)
    lock = vault / v.STATE_DIR / "lock"
    with file_lock(lock, timeout_s=1, what="test", fix="-", holder="another obsidian_notes run"):
        with pytest.raises(VaultError, match=f"for the notes generator's lock on the vault {lock}, held by "
                                             f"another obsidian_notes run .*Fix: wait for the other run"):
            write_notes(vault, [note(["a1 first", "b2 second"])])
    assert (vault / "Dev Log" / "2024-05-01.md").read_bytes() == before  # nothing written meanwhile
    assert write_notes(vault, [note(["a1 first", "b2 second"])]).updated == ["Dev Log/2024-05-01.md"]
