"""secure-ml init | keys init | keys rotate [--reencrypt] | encrypt | decrypt."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from secure_ml.custody import crypto
from secure_ml.custody.integrity import atomic_write
from secure_ml.custody.keys import LocalKeyring
from secure_ml.custody.store import rotate_keys
from secure_ml.errors import BadInput, ConfigurationError
from secure_ml.settings import Settings, init_home


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    init = sub.add_parser("init", help="set up $SECURE_ML_HOME: keyring, directories, Dagster home")
    init.set_defaults(handler=cmd_init)

    keys = sub.add_parser("keys", help="key-encryption keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser("init", help="create the local keyring (0600)").set_defaults(handler=cmd_keys_init)
    rotate = keys_sub.add_parser("rotate", help="re-wrap every artifact under a new key")
    rotate.add_argument("--reencrypt", action="store_true",
                        help="also replace every data key, re-encrypting the data (after a suspected leak)")
    rotate.set_defaults(handler=cmd_keys_rotate)
    keys_sub.add_parser("rotate-pseudonym", help="replace the PII pseudonym key (every pseudonym changes from now on)"
                        ).set_defaults(handler=cmd_keys_rotate_pseudonym)

    for verb, handler in (("encrypt", cmd_encrypt), ("decrypt", cmd_decrypt)):
        p = sub.add_parser(verb, help=f"{verb} a file ('-' for stdin/stdout)")
        p.add_argument("input")
        p.add_argument("output")
        p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
        p.set_defaults(handler=handler)


def cmd_init(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    for line in init_home(settings) or [f"{settings.home} is already set up"]:
        print(line)
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    existed = settings.keyring_path.exists()
    keyring = LocalKeyring.create(settings.keyring_path)
    key_id, _ = keyring.active_key()
    settings.audit_log().record(settings.actor(), "keys.init", subject=key_id,
                                details={"created": not existed})
    print(f"{'keyring exists' if existed else 'created keyring'} {settings.keyring_path} (active key {key_id})")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if settings.environ.get("SECURE_ML_KEK"):
        raise ConfigurationError("keys come from SECURE_ML_KEK: rotate them in your secret store, "
                                 "keeping the old key in SECURE_ML_KEK_RETIRED until `keys rotate` has run")
    store = settings.artifact_store()
    counts = rotate_keys(store, LocalKeyring(settings.keyring_path), reencrypt=args.reencrypt)
    if args.reencrypt:
        print(f"re-encrypted {counts['reencrypted']} artifacts under new data keys ({counts['already_current']} "
              f"done before an interruption, {counts['retired']} old keys retired)")
    else:
        print(f"re-wrapped {counts['rewrapped']} artifacts ({counts['already_current']} already current, "
              f"{counts['retired']} old keys retired)")
    if counts["unreadable"]:
        print(f"{counts['unreadable']} artifacts could not be re-wrapped; see `secure-ml audit tail`", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _input(name: str) -> Iterator[BinaryIO]:
    if name == "-":
        yield sys.stdin.buffer
        return
    path = Path(name)
    if not path.exists():
        raise BadInput(f"input not found: {name}")
    if path.is_dir():
        raise BadInput(f"input is a directory: {name}")
    with path.open("rb") as handle:
        yield handle


@contextlib.contextmanager
def _output(name: str, force: bool) -> Iterator[BinaryIO]:
    """All-or-nothing output: a temp file renamed into place, or copied to stdout on success."""
    if name != "-":
        with atomic_write(name, mode=0o600, overwrite=force) as handle:
            yield handle
        return
    # Nothing reaches stdout until every chunk has authenticated.
    with tempfile.TemporaryFile() as spool:
        yield spool  # type: ignore[misc]
        spool.seek(0)
        while block := spool.read(1 << 20):
            sys.stdout.buffer.write(block)
        sys.stdout.buffer.flush()


def _same_file(a: str, b: str) -> bool:
    return a != "-" and b != "-" and os.path.exists(b) and os.path.samefile(a, b)


def cmd_encrypt(args: argparse.Namespace) -> int:
    if _same_file(args.input, args.output):
        raise BadInput("input and output are the same file")
    keys = Settings.from_env().key_provider()
    with _input(args.input) as src, _output(args.output, args.force) as dst:
        crypto.encrypt_stream(src, dst, keys)
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    if _same_file(args.input, args.output):
        raise BadInput("input and output are the same file")
    keys = Settings.from_env().key_provider()
    with _input(args.input) as src, _output(args.output, args.force) as dst:
        crypto.decrypt_stream(src, dst, keys)
    return 0


def cmd_keys_rotate_pseudonym(args: argparse.Namespace) -> int:
    from secure_ml.data.pseudonym import rotate_pseudonym_key

    key_id, _ = rotate_pseudonym_key(Settings.from_env())
    print(f"new pseudonym key {key_id}: data validated from now on gets new pseudonyms; earlier ones no longer join")
    return 0
