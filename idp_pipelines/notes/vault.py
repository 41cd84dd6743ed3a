"""Write generated notes into an Obsidian vault without ever clobbering the owner's writing.

The generator owns only what sits between its markers (Obsidian comments, so they do not render):

    %% idp:begin commits sha256=0123456789abcdef %%
    ...generated text...
    %% idp:end commits %%

The hash is of the text it last wrote. If the text between the markers no longer matches, the owner
edited it: the block is left as is and reported. Everything outside the blocks is never touched, nor are
frontmatter properties the generator does not set (`tags` keeps the owner's extra tags). Unchanged notes
are not rewritten; writes are atomic (temp file + rename, fsync'd when replacing a note). A note the owner deleted is remembered in
`.idp/notes.json` and not recreated unless asked. Every path is checked to stay inside the vault.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from idp_pipelines.files import atomic_write
from idp_pipelines.locks import file_lock

GENERATOR = "idp_pipelines/knowledge/v1"
# libyaml's safe loader when PyYAML was built with it (its wheels are): ~10x faster on a vault of notes
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
STATE_DIR = ".idp"
STATE_FILE = "notes.json"
# a first generation of 100 000 commits' notes takes about a minute; waiting far longer means a stuck run
LOCK_TIMEOUT_S = 1800.0


class VaultError(ValueError):
    """A note could not be written where asked (outside the vault, through a symlink, bad name)."""


# ------------------------------------------------------------------------------------------- names

# Obsidian refuses * " \ / < > : | ? in file names, # ^ [ ] | break wikilinks and %% starts a comment
_BAD_CHARS = re.compile(r'[*"\\/<>:|?#^\[\]%]')
_BIDI = dict.fromkeys(map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f"), " ")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def clean_text(text: str) -> str:
    """Text without control characters (newlines and tabs become spaces) or bidi overrides."""
    text = unicodedata.normalize("NFC", text)
    if text.isprintable():  # the common case, in C: no control, format (bidi) or unassigned character
        return text
    text = text.translate(_BIDI)
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") and ch != "\u00a0" else ch
                   for ch in text)


def safe_name(text: str, *, max_bytes: int = 100, fallback: str = "untitled") -> str:
    """One file or folder name from any text: no separators, no link syntax, no leading dot, bounded."""
    name = _BAD_CHARS.sub("-", clean_text(text))
    name = re.sub(r"\s+", " ", name).strip(" .")
    if not name:
        name = fallback
    if name.lower().split(".")[0] in _RESERVED:
        name += "-"
    raw = name.encode("utf-8")
    if len(raw) > max_bytes:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = raw[:max_bytes - 9].decode("utf-8", "ignore").rstrip(" .") + "-" + digest
    return name


def safe_folder(text: str) -> str:
    """A folder path of the owner's settings ('Dev Log', 'Journal/Dev'): each segment made safe."""
    parts = [safe_name(p) for p in re.split(r"[/\\]+", text) if p.strip(" .")]
    return "/".join(parts)


def join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------- dates

_MOMENT = re.compile(r"\[[^\]]*\]|YYYY|YY|MMMM|MMM|MM|M|Do|DDDD|DDD|DD|D|dddd|ddd|dd|d|E|WW|W|ww|w|GGGG|gggg|Q|.",
                     re.S)
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def format_moment(day: dt.date, fmt: str) -> str:
    """Format a date with Obsidian's (moment.js) tokens: YYYY-MM-DD, ddd, Do MMMM, [literal]...

    English names; week tokens (w, W, gggg) use ISO weeks.
    """
    iso_year, iso_week, iso_day = day.isocalendar()
    table = {
        "YYYY": f"{day.year:04d}", "YY": f"{day.year % 100:02d}",
        "MMMM": _MONTHS[day.month - 1], "MMM": _MONTHS[day.month - 1][:3], "MM": f"{day.month:02d}",
        "M": str(day.month), "Do": _ordinal(day.day), "DD": f"{day.day:02d}", "D": str(day.day),
        "DDDD": f"{day.timetuple().tm_yday:03d}", "DDD": str(day.timetuple().tm_yday),
        "dddd": _DAYS[day.weekday()], "ddd": _DAYS[day.weekday()][:3], "dd": _DAYS[day.weekday()][:2],
        "d": str(iso_day % 7), "E": str(iso_day), "WW": f"{iso_week:02d}", "W": str(iso_week),
        "ww": f"{iso_week:02d}", "w": str(iso_week), "GGGG": f"{iso_year:04d}", "gggg": f"{iso_year:04d}",
        "Q": str((day.month - 1) // 3 + 1),
    }
    out = []
    for tok in _MOMENT.findall(fmt):
        out.append(tok[1:-1] if tok.startswith("[") else table.get(tok, tok))
    return "".join(out)


def daily_note_path(day: dt.date, folder: str = "Dev Log", date_format: str = "YYYY-MM-DD") -> str:
    """The vault-relative path of a day's note, as Obsidian's Daily notes plugin would name it.

    A '/' in the date format makes subfolders, as in Obsidian (`YYYY/MM/YYYY-MM-DD`).
    """
    name = format_moment(day, date_format)
    parts = [safe_name(p) for p in re.split(r"[/\\]+", name) if p.strip(" .")] or [day.isoformat()]
    return join(safe_folder(folder), *parts) + ".md"


def link(path: str, alias: str | None = None) -> str:
    """A wikilink to a vault-relative path (without .md); the alias cannot break the link."""
    target = path[:-3] if path.endswith(".md") else path
    if alias is None:
        return f"[[{target}]]"
    alias = re.sub(r"[|\[\]%<>#^`]", "-", clean_text(alias)).strip() or target
    return f"[[{target}|{alias}]]"


# -------------------------------------------------------------------------------------- the notes


@dataclass(frozen=True)
class Note:
    """A generated note: frontmatter properties, blocks (id, markdown) and text written only at creation."""

    path: str  # vault-relative, posix, ends with .md
    properties: dict[str, Any]
    blocks: tuple[tuple[str, str], ...]
    preamble: str = ""  # e.g. "# 2024-05-01\n": written once, then the owner's


@dataclass(frozen=True)
class GeneratedFile:
    """A file wholly owned by the generator (a plot): rewritten only when its content changes."""

    path: str
    content: bytes


@dataclass
class VaultReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted_by_owner: list[str] = field(default_factory=list)  # not recreated
    edited_blocks: dict[str, list[str]] = field(default_factory=dict)  # note -> block ids left as is
    refused: list[str] = field(default_factory=list)  # "path: reason" (outside the vault, symlink...)
    frontmatter_unparsed: list[str] = field(default_factory=list)

    @property
    def written(self) -> list[str]:
        return self.created + self.updated


# ------------------------------------------------------------------------------------------ blocks

_BLOCK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_BEGIN = re.compile(r"^%% idp:begin (?P<id>[A-Za-z0-9][A-Za-z0-9_.-]*) sha256=(?P<hash>[0-9a-f]{8,64}) %%\r?$", re.M)


def content_hash(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def escape_block_text(content: str) -> str:
    """Generated text may never contain a line that looks like a marker: it would end the block early."""
    return re.sub(r"^%% idp:", r"%% idp\\:", content, flags=re.M)


def render_block(block_id: str, content: str) -> str:
    if not _BLOCK_ID.match(block_id):
        raise VaultError(f"block id {block_id!r} is not a plain name")
    content = escape_block_text(content.strip("\n"))
    inner = content + "\n" if content else ""
    return f"%% idp:begin {block_id} sha256={content_hash(content)} %%\n{inner}%% idp:end {block_id} %%"


@dataclass(frozen=True)
class _Span:
    id: str
    start: int
    end: int  # after the end marker line (without its newline)
    content: str | None  # None: no end marker (broken by hand)
    hash: str


def find_blocks(body: str) -> dict[str, _Span]:
    found: dict[str, _Span] = {}
    pos = 0
    while (m := _BEGIN.search(body, pos)) is not None:
        bid = m.group("id")
        end_re = re.compile(rf"^%% idp:end {re.escape(bid)} %%\r?$", re.M)
        e = end_re.search(body, m.end())
        if e is None:
            found.setdefault(bid, _Span(bid, m.start(), m.end(), None, m.group("hash")))
            pos = m.end()
            continue
        content = body[m.end() + 1:e.start()]
        content = content[:-1] if content.endswith("\n") else content
        found.setdefault(bid, _Span(bid, m.start(), e.end(), content, m.group("hash")))
        pos = e.end()
    return found


def edited(span: _Span) -> bool:
    return span.content is None or not content_hash(span.content).startswith(span.hash[:16])


# ------------------------------------------------------------------------------------- frontmatter


def _yaml_scalar(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if isinstance(v, float) else str(v)
    if isinstance(v, (dt.date, dt.datetime)):
        return v.isoformat()
    # JSON strings are YAML double-quoted scalars: wikilinks, colons and '#' stay text
    return json.dumps(clean_text(str(v)), ensure_ascii=False)


def dump_property(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if not value:
            return f"{key}: []\n"
        return f"{key}:\n" + "".join(f"  - {_yaml_scalar(x)}\n" for x in value)
    s = _yaml_scalar(value)
    return f"{key}: {s}\n" if s else f"{key}:\n"


def split_frontmatter(text: str) -> tuple[str | None, str]:
    """(frontmatter text without the --- lines, or None; the rest of the note)."""
    if not text.startswith("---\n") and not text.startswith("---\r\n"):
        return None, text
    m = re.search(r"^(---|\.\.\.)\r?$\n?", text[4:], re.M)
    if m is None:
        return None, text
    return text[4:4 + m.start()], text[4 + m.end():]


_KEY_LINE = re.compile(r"^(?P<key>[^\s#\-:'\"][^:]*?|'[^']*'|\"[^\"]*\"):(?:\s|$)")


def _segments(fm: str) -> list[tuple[str | None, str]]:
    """Top-level `key: value` segments (with their continuation lines), in order, byte for byte."""
    segs: list[tuple[str | None, str]] = []
    for line in fm.splitlines(keepends=True):
        m = _KEY_LINE.match(line)
        if m:
            segs.append((m.group("key").strip("'\""), line))
        elif segs:
            segs[-1] = (segs[-1][0], segs[-1][1] + line)
        else:
            segs.append((None, line))
    return segs


def merge_frontmatter(existing: str | None, props: dict[str, Any]) -> str | None:
    """The owner's frontmatter with the generated properties set; None if the owner's YAML is broken.

    A property whose value did not change keeps its exact text; the owner's own keys, comments and
    extra tags are kept.
    """
    if existing is None:
        return "".join(dump_property(k, v) for k, v in props.items())
    try:
        parsed = yaml.load(existing, Loader=_YAML_LOADER) if existing.strip() else {}
    except yaml.YAMLError:
        return None
    if parsed is None:
        parsed = {}
    if not isinstance(parsed, dict):
        return None
    segs = _segments(existing)
    if existing and not existing.endswith("\n") and segs:
        segs[-1] = (segs[-1][0], segs[-1][1] + "\n")
    index = {k: i for i, (k, _) in enumerate(segs) if k is not None}
    for key, value in props.items():
        if key == "tags":
            owner = parsed.get("tags")
            owner = [owner] if isinstance(owner, str) else (owner or [])
            value = list(value) + [t for t in owner if isinstance(t, str) and t not in value]
        if key in index:
            if _same(parsed.get(key), value):
                continue
            segs[index[key]] = (key, dump_property(key, value))
        else:
            segs.append((key, dump_property(key, value)))
    return "".join(text for _, text in segs)


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return clean_text(v) if isinstance(v, str) else v


def _same(old: Any, new: Any) -> bool:
    new = _norm(new)
    return type(old) is type(new) and old == new


# ---------------------------------------------------------------------------------------- compose


def compose(existing: str | None, note: Note) -> tuple[str, list[str], bool]:
    """(new text, ids of hand-edited blocks left as is, whether the frontmatter could be merged)."""
    blocks = [(bid, render_block(bid, content)) for bid, content in note.blocks]
    if existing is None:
        fm = merge_frontmatter(None, note.properties)
        body = note.preamble + "\n\n".join(text for _, text in blocks) + "\n"
        return f"---\n{fm}---\n{body}", [], True
    fm_text, body = split_frontmatter(existing)
    spans = find_blocks(body)
    kept: list[str] = []
    edits: list[tuple[int, int, str]] = []
    # a block missing from the note goes after the generated block before it (new blocks keep their order)
    groups: dict[int | None, list[str]] = {}
    anchor: int | None = None
    for bid, text in blocks:
        span = spans.get(bid)
        if span is None:
            groups.setdefault(anchor, []).append(text)
            continue
        anchor = span.end
        if edited(span):
            kept.append(bid)
        elif body[span.start:span.end] != text:
            edits.append((span.start, span.end, text))
    for at, texts in groups.items():
        joined = "\n\n".join(texts)
        if at is not None:
            edits.append((at, at, "\n\n" + joined))
        elif spans:
            first = min(sp.start for sp in spans.values())
            edits.append((first, first, joined + "\n\n"))
        else:
            stripped = len(body.rstrip("\n"))
            edits.append((stripped, len(body), ("\n\n" if stripped else "") + joined + "\n"))
    for start, end, text in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        body = body[:start] + text + body[end:]
    if body and not body.endswith("\n"):
        body += "\n"
    merged = merge_frontmatter(fm_text, note.properties)
    if merged is None:  # the owner's YAML does not parse: leave it exactly as it is
        head = existing[: len(existing) - len(split_frontmatter(existing)[1])]
        return head + body, kept, False
    if fm_text is not None and merged == fm_text:
        head = existing[: len(existing) - len(split_frontmatter(existing)[1])]
        return head + body, kept, True
    return f"---\n{merged}---\n{body}", kept, True


# ------------------------------------------------------------------------------------------ paths


def resolve_inside(vault: Path, rel: str) -> Path:
    """vault/rel, refusing anything that could land outside the vault (.., absolute, symlinks)."""
    if "\0" in rel or "\\" in rel:
        raise VaultError(f"{rel!r}: NUL or backslash in a note path")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or not pure.parts or any(p in ("", ".", "..") for p in pure.parts):
        raise VaultError(f"{rel!r}: not a plain path inside the vault")
    root = Path(os.path.realpath(vault))
    target = root.joinpath(*pure.parts)
    # the deepest existing ancestor decides where mkdir and the write would land
    probe = target.parent
    while not probe.exists() and probe != root:
        probe = probe.parent
    real = Path(os.path.realpath(probe))
    if real != root and root not in real.parents:
        raise VaultError(f"{rel!r}: resolves to {real}, outside the vault {root}")
    if target.is_symlink():
        raise VaultError(f"{rel!r}: is a symlink; the generator does not write through links")
    return target


# ------------------------------------------------------------------------------------------ write


@contextlib.contextmanager
def _vault_lock(vault: Path) -> Iterator[dict]:
    """One generator at a time per vault; yields the state (generated note paths), saved on exit."""
    state_dir = vault / STATE_DIR
    with file_lock(state_dir / "lock", timeout_s=LOCK_TIMEOUT_S, what="the notes generator's lock on the vault",
                   holder="the notes generator (obsidian_notes)", error=VaultError,
                   fix="wait for the other run writing this vault to finish, or stop it; then materialise "
                       "obsidian_notes again"):
        path = state_dir / STATE_FILE
        try:
            state = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            state = {}
        except (OSError, ValueError) as exc:
            raise VaultError(f"cannot read the generator state {path}: {exc}. Fix: delete it (notes the owner "
                             f"deleted may then be recreated).") from None
        before = json.dumps(state, sort_keys=True)
        state.setdefault("generator", GENERATOR)
        state.setdefault("notes", {})
        yield state
        if json.dumps(state, sort_keys=True) != before:
            text = json.dumps(state, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
            atomic_write(path, text.encode("utf-8"))


def write_notes(vault: str | os.PathLike[str], notes: Iterable[Note | GeneratedFile], *, recreate: bool = False,
                fsync: bool = True) -> VaultReport:
    """Create or update each note; report what was written, left alone and refused."""
    vault = Path(vault)
    vault.mkdir(parents=True, exist_ok=True)
    report = VaultReport()
    with _vault_lock(vault) as state:
        known: dict[str, dict] = state["notes"]
        for note in notes:
            try:
                path = resolve_inside(vault, note.path)
            except VaultError as exc:
                report.refused.append(str(exc))
                continue
            try:
                old_bytes = path.read_bytes()
            except FileNotFoundError:
                old_bytes = None
            if old_bytes is None and note.path in known and not recreate:
                report.deleted_by_owner.append(note.path)
                continue
            if isinstance(note, GeneratedFile):
                new_bytes = note.content
            else:
                old = old_bytes.decode("utf-8", "surrogateescape") if old_bytes is not None else None
                text, kept, fm_ok = compose(old, note)
                if kept:
                    report.edited_blocks[note.path] = kept
                if not fm_ok:
                    report.frontmatter_unparsed.append(note.path)
                new_bytes = text.encode("utf-8", "surrogateescape")
            if new_bytes == old_bytes:
                report.unchanged.append(note.path)
            else:
                # fsync where a crash could cost the owner's text (replacing a note); a new note is
                # only generated text, and the rename keeps it all-or-nothing anyway
                atomic_write(path, new_bytes, fsync=fsync and old_bytes is not None)
                (report.created if old_bytes is None else report.updated).append(note.path)
            if note.path not in known:
                known[note.path] = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    return report
