"""`make image` builds FROM the Containerfile: scripts/build-image.sh makes the base from Debian's
packages (mmdebstrap), pins it by the digest it computed, and runs `buildah bud` of the Containerfile
over it. These tests hold the two files to that: one recipe, a base pinned by digest and refused
otherwise, the hashed lock install, UID 10001, no compiler, nothing of the build in the final stage.

Touches: the two files' text. Does not touch: buildah (`make image` runs it; `make test-image`
checks what it built, tests/test_image.py).
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


def stages(text: str) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for instruction, args in instructions(text):
        if instruction == "FROM":
            out.append([])
        if out:
            out[-1].append((instruction, args))
    return out


def script_var(name: str) -> str:
    match = re.search(rf"^{name}=(.*?)(\s+#.*)?$", SCRIPT, re.MULTILINE)
    assert match, f"{name} is not set in scripts/build-image.sh"
    return match.group(1)


STEPS = instructions(CONTAINERFILE)
BUILD, FINAL = stages(CONTAINERFILE)


def bud_command() -> str:
    command = re.search(r"^bh bud .*?[^\\]$", SCRIPT, re.MULTILINE | re.DOTALL)
    assert command, "scripts/build-image.sh runs no `buildah bud`"
    return command.group(0).replace("\\\n", " ")


def test_make_image_builds_the_containerfile_over_the_base_pinned_by_its_digest() -> None:
    # The Containerfile takes its base only as an argument (no registry default), in both stages.
    assert ("ARG", "BASE") in STEPS and STEPS[0] == ("ARG", "BASE")
    assert BUILD[0] == ("FROM", "${BASE} AS build") and FINAL[0] == ("FROM", "${BASE}")
    bud = bud_command()
    assert '-f "$WORK/context/Containerfile"' in bud and "cp Containerfile \"$WORK/context/Containerfile\"" in SCRIPT
    # Pinned by the digest the script computed, and never pulled: another digest is "image not known".
    assert '--build-arg "BASE=localhost/secure-ml-base@$base_digest"' in bud and "--pull=never" in bud
    assert "--isolation chroot" in bud and "--storage-driver vfs" in SCRIPT
    assert "base_digest=$(bh images --format '{{.Digest}}' localhost/secure-ml-base)" in SCRIPT
    assert "[[ $base_digest =~ ^sha256:[0-9a-f]{64}$ ]]" in SCRIPT
    # ... and checked again on what was built: the manifest names the base it was built on.
    assert 'org.opencontainers.image.base.digest' in SCRIPT and '[ "$built_on" = "$base_digest" ]' in SCRIPT
    # The base is made from Debian's packages by mmdebstrap, with no container registry.
    assert 'mmdebstrap --quiet --variant=minbase --mode=root --include="$PACKAGES"' in SCRIPT
    assert "docker://" not in SCRIPT.split("set -euo pipefail", 1)[1] and "apt-get" not in CONTAINERFILE


def test_the_base_has_no_compiler_and_the_build_checks_it() -> None:
    packages = set(script_var("PACKAGES").split(","))
    assert {"python3", "python3-venv", "ca-certificates", "libatomic1"} <= packages
    assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|make|python3-dev)\b", " ".join(packages))
    runs = " ".join(a for i, a in BUILD if i == "RUN")
    assert "for cc in gcc cc c++ g++ clang ld as make" in runs
    assert "shared libraries missing from the image" in runs


def test_the_final_stage_is_the_base_plus_what_the_build_made_and_nothing_else() -> None:
    # No RUN: the build's mounts (pip's configuration, the local indexes) and caches cannot reach it.
    assert {i for i, _ in FINAL} <= {"FROM", "COPY", "USER", "WORKDIR", "ENV", "LABEL", "CMD"}
    copies = [a for i, a in FINAL if i == "COPY"]
    assert copies and all(a.startswith("--from=build ") for a in copies)
    assert ("USER", "10001:10001") in FINAL
    assert "--chown=10001:10001 /home/secure-ml /home/secure-ml" in " ".join(copies)
    runs = " ".join(a for i, a in BUILD if i == "RUN")
    assert 'echo "secure-ml:x:10001:10001:secure-ml:/home/secure-ml:/usr/sbin/nologin" >> /etc/passwd' in runs
    env = dict(pair.split("=", 1) for a in (a for i, a in FINAL if i == "ENV") for pair in a.split())
    assert env["PATH"].startswith("/opt/venv/bin:") and env["SECURE_ML_HOME"] == "/var/lib/secure-ml"
    assert ("CMD", '["secure-ml", "--help"]') in FINAL


def test_the_context_is_the_project_files_the_containerfile_copies() -> None:
    copied: list[str] = []
    for instruction, args in BUILD:
        if instruction == "COPY" and not args.startswith("--from"):
            copied += shlex.split(args)[:-1]
    assert sorted(copied) == sorted(shlex.split(script_var("PROJECT_FILES").strip("()")))
    assert 'git ls-files -z -- "${PROJECT_FILES[@]}"' in SCRIPT  # tracked files only: no venv, no keys


def test_the_hashed_lock_install() -> None:
    runs = " ".join(a for i, a in BUILD if i == "RUN")
    assert "pip install -q --no-cache-dir --require-hashes --no-deps -r /opt/secure-ml/requirements.lock" in runs
    assert "pip install -q --no-cache-dir --no-deps --no-build-isolation --no-index -e /opt/secure-ml" in runs
    assert "/opt/venv/bin/pip check" in runs and "python3 -m venv /opt/venv" in runs
    # pip's configuration (this machine's indexes and CA) is an argument and a read-only mount, never a file of the image.
    assert ("ARG", "PIP_CONFIG_FILE=/dev/null") in BUILD
    assert "--build-arg PIP_CONFIG_FILE=/mnt/build-pip/pip.conf" in bud_command()
    assert '-v "$WORK/pip:/mnt/build-pip:ro"' in SCRIPT


@pytest.mark.parametrize("drift", [
    ("FROM ${BASE}\n", "FROM docker.io/library/debian:bookworm-slim\n"),   # a registry base, by tag
    ("USER 10001:10001", "USER 0"),
    ("COPY --from=build /opt/dagster /opt/dagster\n", "COPY --from=build /opt/dagster /opt/dagster\nRUN true\n"),
])
def test_a_drifted_containerfile_is_caught(drift: tuple[str, str]) -> None:
    """The checks can fail: each change breaks one of the properties above."""
    drifted = CONTAINERFILE.replace(*drift)
    assert drifted != CONTAINERFILE
    _, final = stages(drifted)
    assert (final[0] != ("FROM", "${BASE}") or ("USER", "10001:10001") not in final
            or not {i for i, _ in final} <= {"FROM", "COPY", "USER", "WORKDIR", "ENV", "LABEL", "CMD"})
