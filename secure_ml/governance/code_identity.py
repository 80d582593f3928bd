"""Which code a step ran, and who wrote it: the one place that asks git.

    code = code_identity.current(repo)        # CodeVersion(commit, dirty, author_email, author_name)
    code.author_email, code.author_name       # both: a policy matches either against a person's aliases
    code_identity.commit_of(repo)             # just the commit (no subprocess; reads .git)

Outside a git checkout (a wheel, a container image) everything is ``unknown``/None, never an error.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

UNKNOWN = "unknown"
#: a git object id: SHA-1 (40 hex) or SHA-256 (64 hex) repositories
GIT_COMMIT = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")


@dataclass(frozen=True)
class CodeVersion:
    commit: str = UNKNOWN
    dirty: bool | None = None
    author_email: str | None = None
    author_name: str | None = None

    def as_record(self) -> dict[str, object]:
        """The training record's ``code`` section (``author`` is the email, as git identifies people)."""
        return {"commit": self.commit, "dirty": self.dirty, "author": self.author_email,
                "author_name": self.author_name}


def _git(repo: Path, *args: str) -> str:
    git = shutil.which("git")
    if git is None:
        raise OSError("git is not installed")
    done = subprocess.run([git, "-C", str(repo), *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise OSError(done.stderr.strip())
    return done.stdout.strip()


def current(repo: Path) -> CodeVersion:
    """The checked-out commit, whether tracked files differ from it, and its author."""
    if not (repo / ".git").exists():
        return CodeVersion()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = _git(repo, "rev-parse", "HEAD")
        email, name = author_of(repo, commit)
        dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
        return CodeVersion(commit, dirty, email, name)
    return CodeVersion()


def author_of(repo: Path, commit: str) -> tuple[str | None, str | None]:
    """(author email, author name) of ``commit``; (None, None) when unknown or not a commit id."""
    if not commit or not GIT_COMMIT.match(commit.lower()):
        return None, None
    try:
        email, _, name = _git(repo, "show", "-s", "--format=%ae%x00%an", commit).partition("\0")
    except (OSError, subprocess.SubprocessError):
        return None, None
    return email or None, name or None


def commit_of(repo: Path) -> str:
    """The checked-out commit, read from .git (no subprocess); empty when not a git checkout."""
    git = repo / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return ""
