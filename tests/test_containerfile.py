"""The Containerfile (for `docker build` elsewhere) and scripts/build-image.sh (`make image`, the recipe
built and tested here) stay in step: same Debian packages, same project files, same hashed lock
install, same user, same image config, a base pinned by digest and no compiler.

Touches: the two files' text. Does not touch: a container runtime or registry (none runs here).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTAINERFILE = (REPO / "Containerfile").read_text()
SCRIPT = (REPO / "scripts" / "build-image.sh").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def script_var(name: str) -> str:
    match = re.search(rf"^{name}=(.*?)(\s+#.*)?$", SCRIPT, re.M)
    assert match, f"{name} is not set in scripts/build-image.sh"
    return match.group(1)


STEPS = instructions(CONTAINERFILE)


def test_the_base_is_pinned_by_digest_and_every_stage_builds_from_it() -> None:
    arg = next(a for i, a in STEPS if i == "ARG" and a.startswith("BASE="))
    assert re.fullmatch(r"BASE=[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", arg)
    froms = [a for i, a in STEPS if i == "FROM"]
    assert froms[0] == "${BASE} AS base" and all(f.split()[0] in {"${BASE}", "base"} for f in froms)


def apt_packages(text: str) -> set[str]:
    installs = [a for i, a in instructions(text) if i == "RUN" and "apt-get install" in a]
    assert len(installs) == 1
    return {w for w in installs[0].split("apt-get install", 1)[1].split("&&")[0].split() if not w.startswith("-")}


def test_the_same_debian_packages_and_no_compiler() -> None:
    packages = apt_packages(CONTAINERFILE)
    assert packages == set(script_var("PACKAGES").split(","))
    assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|make)\b", " ".join(packages))
    final = CONTAINERFILE.rsplit("\nFROM ", 1)[1]
    assert "for cc in gcc cc c++ g++ clang ld as make" in final
    assert "for cc in gcc cc c++ g++ clang ld as make" in SCRIPT


def test_the_same_project_files() -> None:
    copied: list[str] = []
    for instruction, args in STEPS:
        if instruction == "COPY" and not args.startswith("--from"):
            sources = shlex.split(args)[:-1]
            copied += sources
    script_files = shlex.split(script_var("PROJECT_FILES").strip("()"))
    assert sorted(copied) == sorted(script_files)


def test_the_same_hashed_lock_install() -> None:
    runs = " ".join(a for i, a in STEPS if i == "RUN")
    for flags in ("--no-cache-dir --require-hashes --no-deps -r /opt/secure-ml/requirements.lock",
                  "--no-cache-dir --no-deps --no-build-isolation --no-index -e /opt/secure-ml"):
        assert f"pip install -q {flags}" in runs
        assert f"pip install -q {flags}" in SCRIPT
    assert "pip check" in runs and "in_root pip check" in SCRIPT
    assert "python3 -m venv /opt/venv" in runs and "in_root python3 -m venv /opt/venv" in SCRIPT


def test_the_same_user_and_image_config() -> None:
    uid = script_var("APP_UID")
    assert uid == "10001"
    assert ("USER", f"{uid}:{uid}") in STEPS
    assert f'"secure-ml:x:{uid}:{uid}:secure-ml:/home/secure-ml:/usr/sbin/nologin"' in CONTAINERFILE
    assert '"secure-ml:x:$APP_UID:$APP_UID:secure-ml:/home/secure-ml:/usr/sbin/nologin"' in SCRIPT
    env = dict(pair.split("=", 1) for a in (a for i, a in STEPS if i == "ENV") for pair in a.split())
    script_env = dict(re.findall(r"--config\.env (\w+)=(\S+)", SCRIPT))
    assert env == script_env
    workdir = next(a for i, a in STEPS if i == "WORKDIR")
    assert f"--config.workingdir {workdir}" in SCRIPT
    assert ("CMD", '["secure-ml", "--help"]') in STEPS and "--config.cmd secure-ml --config.cmd --help" in SCRIPT


@pytest.mark.parametrize("drift", ["python3-dev", "gcc"])
def test_a_drifted_package_list_is_caught(drift: str) -> None:
    """The comparison can fail: one package more in the Containerfile than in the script."""
    drifted = CONTAINERFILE.replace("ca-certificates git", f"ca-certificates git {drift}", 1)
    assert drifted != CONTAINERFILE
    assert apt_packages(drifted) != set(script_var("PACKAGES").split(","))
