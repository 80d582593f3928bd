"""`secure-ml encrypt | decrypt | init` through the installed CLI, in a subprocess.

Touches: the real `secure-ml` entry point with a real home (keyring 0600), files and pipes
('-' for stdin/stdout), SIGKILL mid-stream. For every bad input it checks the CLI contract:
exit code (1 failed verification, 2 bad usage/input/configuration), exactly one line on stderr,
no traceback, nothing on stdout, and nothing written at OUT.
`pipeline run` on refused drops (unapproved source, ragged rows; a poisoned drop, marked slow):
one line per failure on stderr, no Dagster log lines or stack traces, everything in the Dagster
event log, and `--debug` showing Dagster's DEBUG log and stack traces.
Does not touch: `keys rotate` (tests/test_keys.py), `audit verify` (tests/test_audit.py), a
successful `pipeline run` (tests/test_dataset_asset.py, tests/test_end_to_end.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from secure_ml.custody import crypto

pytestmark = pytest.mark.slow  # runs the CLI in subprocesses

CLI = str(Path(sys.executable).parent / "secure-ml")
CHUNK = crypto.DEFAULT_CHUNK_SIZE


def run(home: Path, *args: str, stdin: bytes | None = None, **env: str) -> subprocess.CompletedProcess[bytes]:
    environ = {**os.environ, "SECURE_ML_HOME": str(home), "SECURE_ML_ACTOR": "cli-user", **env}
    if "SECURE_ML_KEK" not in env:
        environ.pop("SECURE_ML_KEK", None)
    return subprocess.run([CLI, *args], input=stdin, capture_output=True, env=environ, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], code: int, *needles: str) -> str:
    err = result.stderr.decode()
    assert result.returncode == code, (result.returncode, err)
    assert err.count("\n") == 1 and err.startswith("secure-ml: "), err
    assert "Traceback" not in err
    assert result.stdout == b""
    for needle in needles:
        assert needle in err, err
    return err


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def sealed(home: Path, tmp_path: Path) -> tuple[Path, bytes]:
    """A 2.5-chunk artifact encrypted through the CLI."""
    data = os.urandom(2 * CHUNK + CHUNK // 2)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(data)
    out = tmp_path / "sealed.smle"
    assert run(home, "encrypt", str(plain), str(out)).returncode == 0
    plain.unlink()
    return out, data


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, CHUNK, CHUNK + 1])  # every size around a boundary: test_crypto.py
def test_file_round_trip(home: Path, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "in").write_bytes(data)
    enc = run(home, "encrypt", str(tmp_path / "in"), str(tmp_path / "enc"))
    assert enc.returncode == 0 and enc.stdout == enc.stderr == b""
    assert oct((tmp_path / "enc").stat().st_mode & 0o777) == "0o600"
    assert run(home, "decrypt", str(tmp_path / "enc"), str(tmp_path / "out")).returncode == 0
    assert (tmp_path / "out").read_bytes() == data
    assert not [n for n in listing(tmp_path) if n.startswith(".tmp-")]


@pytest.mark.parametrize("size", [0, CHUNK + 7])
def test_stdin_stdout_round_trip(home: Path, size: int) -> None:
    data = os.urandom(size)
    enc = run(home, "encrypt", "-", "-", stdin=data)
    assert enc.returncode == 0 and enc.stderr == b""
    assert enc.stdout.startswith(crypto.MAGIC)
    dec = run(home, "decrypt", "-", "-", stdin=enc.stdout)
    assert dec.returncode == 0 and dec.stderr == b"" and dec.stdout == data


def test_round_trip_through_a_shell_pipeline(home: Path, tmp_path: Path) -> None:
    data = os.urandom(CHUNK * 2 + 3)
    (tmp_path / "in").write_bytes(data)
    env = {**os.environ, "SECURE_ML_HOME": str(home)}
    env.pop("SECURE_ML_KEK", None)
    encrypt = subprocess.Popen([CLI, "encrypt", str(tmp_path / "in"), "-"], stdout=subprocess.PIPE, env=env)
    decrypt = subprocess.run([CLI, "decrypt", "-", "-"], stdin=encrypt.stdout, capture_output=True, env=env,
                             timeout=60)
    assert encrypt.wait() == 0 and decrypt.returncode == 0 and decrypt.stdout == data


# -- bad input: one line, right exit code, nothing written -------------------------------------------
def test_wrong_key(sealed: tuple[Path, bytes], tmp_path: Path) -> None:
    other_home = tmp_path / "other-home"
    run(other_home, "init")
    out = tmp_path / "out.bin"
    result = run(other_home, "decrypt", str(sealed[0]), str(out))
    assert_one_line_error(result, 2, "key error", "is not in", "missing key, or the wrong keyring")
    assert not out.exists()


def test_missing_key(sealed: tuple[Path, bytes], home: Path, tmp_path: Path) -> None:
    (home / "keys" / "keyring.json").unlink()
    out = tmp_path / "out.bin"
    assert_one_line_error(run(home, "decrypt", str(sealed[0]), str(out)), 2, "no keyring at",
                          "run `secure-ml keys init`")
    assert_one_line_error(run(home, "encrypt", str(sealed[0]), str(out)), 2, "no keyring at")
    assert not out.exists()


@pytest.mark.parametrize("mode", [0o640])  # every mode: test_keys.py
def test_key_file_with_loose_permissions(sealed: tuple[Path, bytes], home: Path, tmp_path: Path, mode: int) -> None:
    keyring = home / "keys" / "keyring.json"
    keyring.chmod(mode)
    out = tmp_path / "out.bin"
    for verb, source in (("decrypt", sealed[0]), ("encrypt", sealed[0])):
        assert_one_line_error(run(home, verb, str(source), str(out)), 2, "accessible to group or others",
                              f"chmod 600 {keyring}")
    assert not out.exists()


def test_truncated_in_the_header_mid_chunk_and_at_a_chunk_boundary(sealed: tuple[Path, bytes], home: Path,
                                                                      tmp_path: Path) -> None:
    blob = sealed[0].read_bytes()
    header = crypto.read_header(sealed[0].open("rb")).size
    cuts = {
        "in the header": (header - 10, "truncated inside its header"),
        "mid-chunk": (header + CHUNK // 3, "chunk 0"),
        "mid-last-chunk": (len(blob) - 5, "chunk 2"),
        "at a chunk boundary": (header + 2 * (CHUNK + 16), "truncated: it ends after chunk 1, which is not the final"),
    }
    for name, (cut, needle) in cuts.items():
        damaged = tmp_path / f"damaged-{name}"
        damaged.write_bytes(blob[:cut])
        out = tmp_path / f"out-{name}"
        assert_one_line_error(run(home, "decrypt", str(damaged), str(out)), 1, "integrity failure", needle)
        assert not out.exists(), name
    assert not [n for n in listing(tmp_path) if n.startswith(("out", ".tmp-"))]
    piped = run(home, "decrypt", "-", "-", stdin=blob[: header + CHUNK + 16])  # nothing reaches stdout either
    assert_one_line_error(piped, 1, "truncated: it ends after chunk 0")


def test_flipped_bits_fail_and_write_nothing(sealed: tuple[Path, bytes], home: Path, tmp_path: Path) -> None:
    blob = sealed[0].read_bytes()
    header = crypto.read_header(sealed[0].open("rb")).size
    for position in (header - 1, header + CHUNK + 20, len(blob) - 1):  # every bit: test_crypto.py
        damaged = bytearray(blob)
        damaged[position] ^= 0x04
        (tmp_path / "damaged").write_bytes(bytes(damaged))
        result = run(home, "decrypt", str(tmp_path / "damaged"), str(tmp_path / "out"))
        assert result.returncode in (1, 2)
        assert_one_line_error(result, result.returncode)
        assert not (tmp_path / "out").exists()


def test_chunks_reordered_duplicated_or_spliced(sealed: tuple[Path, bytes], home: Path, tmp_path: Path) -> None:
    blob = sealed[0].read_bytes()
    header = crypto.read_header(sealed[0].open("rb")).size
    step = CHUNK + 16
    head, c0, c1, c2 = blob[:header], blob[header:header + step], blob[header + step:header + 2 * step], blob[header + 2 * step:]
    (tmp_path / "other-plain").write_bytes(os.urandom(3 * CHUNK))
    run(home, "encrypt", str(tmp_path / "other-plain"), str(tmp_path / "other.smle"))
    other = (tmp_path / "other.smle").read_bytes()
    variants = {
        "reordered": (head + c1 + c0 + c2, "chunk 0 failed authentication"),
        "duplicated": (head + c0 + c0 + c1 + c2, "chunk 1 failed authentication"),
        "spliced": (head + c0 + other[header + step:header + 2 * step] + c2, "chunk 1 failed authentication"),
        "foreign header": (other[:header] + c0 + c1 + c2, "chunk 0 failed authentication"),
    }
    for name, (data, needle) in variants.items():
        (tmp_path / name).write_bytes(data)
        assert_one_line_error(run(home, "decrypt", str(tmp_path / name), str(tmp_path / "out")), 1, needle)
        assert not (tmp_path / "out").exists(), name


def test_unknown_format_version(sealed: tuple[Path, bytes], home: Path, tmp_path: Path) -> None:
    blob = bytearray(sealed[0].read_bytes())
    blob[len(crypto.MAGIC)] = 7
    (tmp_path / "v7").write_bytes(bytes(blob))
    assert_one_line_error(run(home, "decrypt", str(tmp_path / "v7"), str(tmp_path / "out")), 2,
                          "bad input: unsupported artifact format version 7 (this build reads 1)")
    assert not (tmp_path / "out").exists()


def test_plaintext_given_to_decrypt(home: Path, tmp_path: Path) -> None:
    (tmp_path / "plain.csv").write_text("name,age\nalice,30\n")
    result = run(home, "decrypt", str(tmp_path / "plain.csv"), str(tmp_path / "out"))
    assert_one_line_error(result, 2, "not a secure-ml encrypted artifact (bad magic; is it plaintext?)")
    assert not (tmp_path / "out").exists()


def test_empty_input(home: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    assert_one_line_error(run(home, "decrypt", str(tmp_path / "empty"), str(tmp_path / "out")), 2, "empty input")
    assert_one_line_error(run(home, "decrypt", "-", "-", stdin=b""), 2, "empty input")
    assert not (tmp_path / "out").exists()


def test_output_exists_is_not_overwritten_unless_forced(sealed: tuple[Path, bytes], home: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "precious.bin"
    out.write_bytes(b"do not lose me")
    for verb in ("decrypt", "encrypt"):
        result = run(home, verb, str(sealed[0]), str(out))
        assert_one_line_error(result, 2, f"output exists: {out} (use --force to overwrite)")
        assert out.read_bytes() == b"do not lose me"
    forced = run(home, "decrypt", "--force", str(sealed[0]), str(out))
    assert forced.returncode == 0 and out.read_bytes() == sealed[1]
    # --force over a good file with a bad input still leaves the old file whole
    (tmp_path / "junk").write_bytes(b"junk")
    assert_one_line_error(run(home, "decrypt", "--force", str(tmp_path / "junk"), str(out)), 2)
    assert out.read_bytes() == sealed[1]


def test_usage_and_path_errors(home: Path, tmp_path: Path) -> None:
    assert_one_line_error(run(home, "decrypt", str(tmp_path / "absent"), str(tmp_path / "out")), 2, "input not found")
    assert_one_line_error(run(home, "decrypt", str(tmp_path), str(tmp_path / "out")), 2, "input is a directory")
    (tmp_path / "same").write_bytes(b"x")
    assert_one_line_error(run(home, "encrypt", "--force", str(tmp_path / "same"), str(tmp_path / "same")), 2,
                          "input and output are the same file")
    usage = run(home, "encrypt", "only-one-arg")
    assert usage.returncode == 2 and b"usage error" in usage.stderr and b"Traceback" not in usage.stderr
    assert run(home, "frobnicate").returncode == 2
    out_dir = tmp_path / "no-such-dir" / "deeper"
    (tmp_path / "in").write_bytes(b"abc")
    assert run(home, "encrypt", str(tmp_path / "in"), str(out_dir / "x")).returncode == 0  # parents are created


def test_debug_shows_the_traceback(home: Path, tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"plain")
    result = run(home, "--debug", "decrypt", str(tmp_path / "plain"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert b"Traceback" in result.stderr and result.stderr.endswith(b"(bad magic; is it plaintext?)\n")


def test_init_is_idempotent(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    first = run(home, "init")
    assert first.returncode == 0 and b"created keyring" in first.stdout
    again = run(home, "init")
    assert again.returncode == 0 and again.stdout.strip() == f"{home} is already set up".encode()
    assert oct((home / "keys" / "keyring.json").stat().st_mode & 0o777) == "0o600"
    assert b"enabled: false" in (home / "dagster" / "dagster.yaml").read_bytes()


# -- interrupted writes ---------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["encrypt", "decrypt"])
def test_killed_midway_leaves_no_output(home: Path, tmp_path: Path, verb: str) -> None:
    """SIGKILL while streaming a large input from a pipe: OUT never appears (at most a hidden
    .tmp- file is left, never under OUT's name), and stdout never carried unauthenticated bytes."""
    env = {**os.environ, "SECURE_ML_HOME": str(home)}
    env.pop("SECURE_ML_KEK", None)
    block = os.urandom(CHUNK)
    if verb == "decrypt":
        (tmp_path / "big").write_bytes(block * 8)
        subprocess.run([CLI, "encrypt", str(tmp_path / "big"), str(tmp_path / "big.smle")], env=env, check=True)
        block = (tmp_path / "big.smle").read_bytes()
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    for target in (str(outdir / "out.bin"), "-"):
        process = subprocess.Popen([CLI, verb, "-", target], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, env=env)
        assert process.stdin is not None
        process.stdin.write(block[: 4 * CHUNK])  # several chunks in, then the writer stalls
        process.stdin.flush()
        time.sleep(0.5)
        process.send_signal(signal.SIGKILL)
        stdout, _ = process.communicate()
        assert process.returncode == -signal.SIGKILL
        assert stdout == b""
        assert not (outdir / "out.bin").exists()
        assert all(name.startswith(".tmp-out.bin.") for name in listing(outdir))


# -- pipeline run: an ordinary refusal is one line, not Dagster's stack traces ---------------------
def dagster_noise(err: str) -> list[str]:
    return [line for line in err.splitlines()
            if " - dagster - " in line or "Traceback" in line or "Stack Trace" in line or line.startswith("  File ")]


def test_pipeline_run_refusals_are_one_line_each_and_debug_shows_everything(home: Path, tmp_path: Path) -> None:
    import dagster as dg

    unapproved = tmp_path / "partner_feed.csv"
    unapproved.write_text("a,b\n1,2\n")
    denied = run(home, "pipeline", "run", "--data", str(unapproved), SECURE_ML_ACTOR="alice")
    err = denied.stderr.decode()
    assert denied.returncode == 1, err
    assert err.count("\n") == 1 and not dagster_noise(err), err
    assert err.startswith("secure-ml: step dataset failed: denied: drop 'partner_feed-") and "approved source" in err
    assert b"NOT materialized" in denied.stdout
    import re

    run_id = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", denied.stdout.decode())[0]
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:  # the full story stays here
        failures = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    assert [e.dagster_event.step_key for e in failures] == ["dataset"]  # type: ignore[union-attr]

    ragged = tmp_path / "german_credit-ragged.csv"
    ragged.write_text("risk,sex\n1,male\n0\n")
    bad = run(home, "pipeline", "run", "--data", str(ragged), "--json", SECURE_ML_ACTOR="alice")
    err = bad.stderr.decode()
    assert bad.returncode == 1 and err.count("\n") == 1 and not dagster_noise(err), err
    assert err.startswith("secure-ml: step dataset failed: bad input: ") and "ragged" in err
    [failure] = json.loads(bad.stdout)["step_failures"]
    assert failure["kind"] == "refused" and failure["step"] == "dataset"

    debug = run(home, "--debug", "pipeline", "run", "--data", str(unapproved), SECURE_ML_ACTOR="alice")
    err = debug.stderr.decode()
    assert debug.returncode == 1
    assert " - dagster - DEBUG - " in err and "Stack Trace" in err and len(dagster_noise(err)) > 10
    assert err.splitlines()[-1].startswith("secure-ml: step dataset failed: denied: drop 'partner_feed-")


def test_pipeline_run_selecting_an_unknown_asset_is_bad_input(home: Path) -> None:
    result = run(home, "pipeline", "run", "--select", "dataset,nosuch+")
    assert_one_line_error(result, 2, "bad input: --select names 'nosuch', not an asset of the pipeline")


def test_pipeline_run_with_a_broken_configuration_is_one_line(home: Path, tmp_path: Path) -> None:
    import shutil

    from secure_ml.config import SHIPPED_DIR

    config = tmp_path / "config"
    shutil.copytree(SHIPPED_DIR, config, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    text = (config / "automation.yaml").read_text().replace("  interval_seconds: 5\n", "  interval_seconds: soon\n")
    (config / "automation.yaml").write_text(text)
    result = run(home, "pipeline", "run", "--select", "dataset", SECURE_ML_CONFIG=str(config))
    assert_one_line_error(result, 2, f"configuration error: {config / 'automation.yaml'}: landing.interval_seconds: "
                                     "expected an integer, got 'soon'")


@pytest.mark.slow
def test_pipeline_run_a_poisoned_drop_is_one_blocking_check_line(home: Path, tmp_path: Path) -> None:
    import pandas as pd

    from secure_ml.data.poisoning import flip_labels
    from tests.conftest import SAMPLE_CSV

    poisoned, _ = flip_labels(pd.read_csv(SAMPLE_CSV), "risk", 0.10, seed=3)
    drop = tmp_path / "german_credit-poisoned.csv"
    poisoned.to_csv(drop, index=False)
    result = run(home, "pipeline", "run", "--data", str(drop), SECURE_ML_ACTOR="alice")
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("\n") == 1 and not dagster_noise(err), err
    assert err.startswith("secure-ml: blocking check failed: validated_dataset:poisoning_below_limit: ")
    assert "over the threshold" in err
