"""Knowledge core (no Dagster): read git commits, render notes, write them into an Obsidian vault safely."""

from idp_pipelines.notes.git import Commit, FileChange, GitError, RepoUnavailable, sync_repo
from idp_pipelines.notes.render import BenchRun, CommitRow, Layout, RepoInfo, iter_notes
from idp_pipelines.notes.vault import GeneratedFile, Note, VaultError, VaultReport, write_notes

__all__ = [
    "BenchRun", "Commit", "CommitRow", "FileChange", "GeneratedFile", "GitError", "Layout", "Note", "RepoInfo",
    "RepoUnavailable", "VaultError", "VaultReport", "iter_notes", "sync_repo", "write_notes",
]
