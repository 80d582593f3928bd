"""Streaming authenticated encryption: AES-256-GCM in the STREAM construction.

    from secure_ml.custody.crypto import encrypt_stream, decrypt_stream
    with open("in", "rb") as src, open("out.smle", "wb") as dst:
        encrypt_stream(src, dst, keys)          # keys: a secure_ml.keys.KeyProvider
    with open("out.smle", "rb") as src, open("back", "wb") as dst:
        decrypt_stream(src, dst, keys)

File format, version 1 (all integers big-endian)::

    fixed header   magic "SMLENC" | version u8 | algorithm u8 | chunk size u32 | nonce prefix 7B
    key slot       key-id length u8 | key id | wrap nonce 12B | wrapped data key 48B
    chunks         AES-256-GCM(data key, nonce = prefix | counter u32 | last u8, aad = fixed header)

Each artifact has its own random data key. The fixed header is the associated data of every
chunk, so a header edit, truncation (the last chunk is flagged), reordering, duplication or
splicing (the counter is in the nonce, the key is per artifact) fails authentication. The key
slot is sealed by the key-encryption key with the fixed header and key id as associated data, so
rotating the key-encryption key rewrites only the key slot (see :func:`rewrap`); the data chunks
are copied untouched. Memory is bounded by the chunk size.
"""

from __future__ import annotations

import functools
import io
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secure_ml.custody.integrity import _DirectReader, direct_reader, finish_direct_read
from secure_ml.errors import BadInput, IntegrityError, KeyUnavailable

MAGIC = b"SMLENC"
FORMAT_VERSION = 1
ALGORITHM_AES256GCM_STREAM = 1
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 1 << 26
_FIXED = struct.Struct(">6sBBI7s")
_TAG = 16
_WRAPPED_LEN = 32 + _TAG
_COPY_BLOCK = 1 << 20


class KeySource(Protocol):
    """What encryption needs from a key provider (see secure_ml.keys)."""

    def active_key(self) -> tuple[str, bytes]: ...

    def key(self, key_id: str) -> bytes: ...


@dataclass(frozen=True)
class Header:
    """A parsed artifact header; ``fixed`` is the authenticated prefix."""

    fixed: bytes
    chunk_size: int
    nonce_prefix: bytes
    key_id: str
    wrap_nonce: bytes
    wrapped_key: bytes

    @property
    def size(self) -> int:
        return len(self.fixed) + 1 + len(self.key_id.encode()) + 12 + _WRAPPED_LEN


def _key_slot(fixed: bytes, key_id: str, kek: bytes, data_key: bytes) -> bytes:
    kid = key_id.encode("ascii")
    wrap_nonce = os.urandom(12)
    wrapped = AESGCM(kek).encrypt(wrap_nonce, data_key, fixed + kid)
    return bytes([len(kid)]) + kid + wrap_nonce + wrapped


def _read_exact(src: BinaryIO, size: int) -> bytes:
    data = src.read(size)
    while data is not None and len(data) < size:
        more = src.read(size - len(data))
        if not more:
            break
        data += more
    return data or b""


def read_header(src: BinaryIO) -> Header:
    """Parse and sanity-check a header; raises BadInput for anything that is not one of ours."""
    fixed = _read_exact(src, _FIXED.size)
    if not fixed:
        raise BadInput("empty input: not a secure-ml encrypted artifact")
    if not fixed.startswith(MAGIC[: len(fixed)]) or len(fixed) < len(MAGIC):
        raise BadInput("not a secure-ml encrypted artifact (bad magic; is it plaintext?)")
    if fixed[:6] != MAGIC:
        raise BadInput("not a secure-ml encrypted artifact (bad magic; is it plaintext?)")
    if len(fixed) < _FIXED.size:
        raise IntegrityError("artifact truncated inside its header")
    _, version, algorithm, chunk_size, nonce_prefix = _FIXED.unpack(fixed)
    if version != FORMAT_VERSION:
        raise BadInput(f"unsupported artifact format version {version} (this build reads 1)")
    if algorithm != ALGORITHM_AES256GCM_STREAM:
        raise BadInput(f"unsupported artifact algorithm {algorithm}")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise IntegrityError(f"artifact header has an impossible chunk size {chunk_size}")
    kid_len_byte = _read_exact(src, 1)
    if not kid_len_byte:
        raise IntegrityError("artifact truncated inside its header")
    kid = _read_exact(src, kid_len_byte[0])
    rest = _read_exact(src, 12 + _WRAPPED_LEN)
    if len(kid) < kid_len_byte[0] or len(rest) < 12 + _WRAPPED_LEN:
        raise IntegrityError("artifact truncated inside its header")
    try:
        key_id = kid.decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError("artifact header has a malformed key id") from None
    return Header(fixed, chunk_size, nonce_prefix, key_id, rest[:12], rest[12:])


def unwrap_data_key(header: Header, keys: KeySource) -> bytes:
    """Open the key slot; a wrong or missing key-encryption key is a clear one-line error."""
    kek = keys.key(header.key_id)
    try:
        return AESGCM(kek).decrypt(
            header.wrap_nonce, header.wrapped_key, header.fixed + header.key_id.encode()
        )
    except InvalidTag:
        raise IntegrityError(
            f"key '{header.key_id}' does not open this artifact: wrong key, or the header was modified"
        ) from None


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", counter, 1 if last else 0)


def _fill(src: BinaryIO, buf: memoryview) -> int:
    """Fill ``buf`` from ``src`` (short only at end of input); returns the bytes read.

    ``readinto`` a preallocated buffer avoids allocating (and page-faulting) a fresh megabyte
    per chunk, which costs more than the AES-GCM itself; streams without it fall back to read.
    """
    readinto = getattr(src, "readinto", None)
    filled = 0
    size = len(buf)
    while filled < size:
        got: int | None
        if readinto is not None:
            try:
                got = readinto(buf[filled:])
            except (io.UnsupportedOperation, NotImplementedError):  # e.g. a RawIOBase with only read()
                readinto = None
                continue
        else:
            data = src.read(size - filled)
            got = None if data is None else len(data)
            if got:
                buf[filled : filled + got] = data
        if got is None:
            # A non-blocking stream with nothing ready: treating it as the end would seal a
            # silently truncated (yet authentic) artifact.
            raise BadInput("input stream is non-blocking and had no data ready; give a blocking stream")
        if not got:  # end of input
            break
        filled += got
    return filled


NextChunk = Callable[[], "tuple[memoryview, bool]"]


class _Lookahead:
    """Chunks of a stream read one ahead into two reused buffers: only reaching the end of the
    input tells that a chunk is the last (its nonce says so)."""

    def __init__(self, src: BinaryIO, size: int) -> None:
        self._src = src
        self._size = size
        self._current = memoryview(bytearray(size))
        self._following = memoryview(bytearray(size))
        self._length = -1  # nothing read yet

    def next(self) -> tuple[memoryview, bool]:
        if self._length < 0:
            self._length = _fill(self._src, self._current)
        following = _fill(self._src, self._following) if self._length == self._size else 0
        chunk = self._current[: self._length]
        self._current, self._following, self._length = self._following, self._current, following
        return chunk, following == 0


def _chunks(src: BinaryIO | _DirectReader, size: int) -> NextChunk:
    """A function that returns the next chunk of ``size`` bytes (fewer only at the end of the
    input) and whether it is the last; each chunk is valid until the next call. From a direct
    reader whose stage holds a chunk: views of that stage (no copy); else :class:`_Lookahead`."""
    if isinstance(src, _DirectReader) and src.holds(size):
        return functools.partial(src.chunk, size)
    return _Lookahead(src, size).next  # type: ignore[arg-type]


def encrypt_stream(
    src: BinaryIO, dst: BinaryIO, keys: KeySource, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> int:
    """Encrypt everything readable from ``src`` into ``dst``; returns the plaintext size.

    ``dst.write`` receives views of a reused buffer: it must copy or write them out before it
    returns (files, BytesIO and the store's writers do).
    """
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise BadInput(f"chunk size must be between 1 and {MAX_CHUNK_SIZE} bytes")
    key_id, kek = keys.active_key()
    data_key = AESGCM.generate_key(bit_length=256)
    nonce_prefix = os.urandom(7)
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, ALGORITHM_AES256GCM_STREAM, chunk_size, nonce_prefix)
    dst.write(fixed + _key_slot(fixed, key_id, kek, data_key))
    aead = AESGCM(data_key)
    direct = direct_reader(src)
    if direct is None:
        return _encrypt_chunks(_chunks(src, chunk_size), dst, aead, fixed, nonce_prefix, chunk_size)
    try:
        return _encrypt_chunks(_chunks(direct, chunk_size), dst, aead, fixed, nonce_prefix, chunk_size)
    finally:
        finish_direct_read(src, direct)


def _encrypt_chunks(next_chunk: NextChunk, dst: BinaryIO, aead: AESGCM, fixed: bytes, nonce_prefix: bytes,
                    chunk_size: int) -> int:
    reserve = getattr(dst, "reserve", None)  # secure_ml.integrity's streaming writer
    sealed: memoryview | None = None  # for writers that cannot take a chunk in place
    total = 0
    counter = 0
    while True:
        data, last = next_chunk()
        length = len(data)
        nonce = _nonce(nonce_prefix, counter, last)
        room = reserve(length + _TAG) if reserve is not None else None
        if room is not None:  # sealed straight into the writer's direct-I/O stage: no copy
            dst.commit(aead.encrypt_into(nonce, data, fixed, room))  # type: ignore[attr-defined]
        else:
            if sealed is None:
                sealed = memoryview(bytearray(chunk_size + _TAG))
            dst.write(sealed[: aead.encrypt_into(nonce, data, fixed, sealed[: length + _TAG])])
        del data, room  # views of the reader's and the writer's stages: never kept past their turn
        total += length
        if last:
            return total
        counter += 1
        if counter >= 1 << 32:
            raise BadInput("input too large for one artifact (2^32 chunks)")


def decrypt_stream(src: BinaryIO, dst: BinaryIO, keys: KeySource) -> int:
    """Decrypt and authenticate ``src`` into ``dst``; returns the plaintext size.

    Plaintext is written chunk by chunk as each authenticates, so callers that must not leave
    partial output write ``dst`` to a temporary file and rename it only on success (see
    secure_ml.integrity.atomic_write). ``dst.write`` receives views of a reused buffer.
    """
    header = read_header(src)
    aead = AESGCM(unwrap_data_key(header, keys))
    sealed_size = header.chunk_size + _TAG
    direct = direct_reader(src)
    if direct is None:
        return _decrypt_chunks(_chunks(src, sealed_size), dst, aead, header)
    try:
        return _decrypt_chunks(_chunks(direct, sealed_size), dst, aead, header)
    finally:
        finish_direct_read(src, direct)


def _decrypt_chunks(next_chunk: NextChunk, dst: BinaryIO, aead: AESGCM, header: Header) -> int:
    reserve = getattr(dst, "reserve", None)  # secure_ml.integrity's streaming writer
    plain: memoryview | None = None  # for writers that cannot take a chunk in place
    total = 0
    counter = 0
    while True:
        sealed, last = next_chunk()
        length = len(sealed)
        nonce = _nonce(header.nonce_prefix, counter, last)
        try:
            if length < _TAG:
                raise InvalidTag
            room = reserve(length - _TAG) if reserve is not None else None
            if room is None and plain is None:
                plain = memoryview(bytearray(header.chunk_size))
            # In place into the writer's stage: committed only once the tag verified.
            target = room if room is not None else plain[: length - _TAG]  # type: ignore[index]
            size = aead.decrypt_into(nonce, sealed, header.fixed, target)
        except InvalidTag:
            raise _explain_chunk_failure(aead, header, counter, bytes(sealed), last) from None
        if room is None:
            dst.write(target[:size])
        else:
            dst.commit(size)  # type: ignore[attr-defined]
        del sealed, room, target  # views of the reader's and the writer's stages
        total += size
        if last:
            return total
        counter += 1


def _explain_chunk_failure(
    aead: AESGCM, header: Header, counter: int, sealed: bytes, last: bool
) -> IntegrityError:
    if last and len(sealed) < _TAG:
        return IntegrityError(f"artifact truncated: chunk {counter} is incomplete")
    if last:
        try:
            aead.decrypt(_nonce(header.nonce_prefix, counter, False), sealed, header.fixed)
        except InvalidTag:
            pass
        else:
            return IntegrityError(
                f"artifact truncated: it ends after chunk {counter}, which is not the final chunk"
            )
    return IntegrityError(
        f"chunk {counter} failed authentication: the artifact was modified, reordered, spliced or truncated"
    )


def rewrap(src: BinaryIO, dst: BinaryIO, keys: KeySource) -> tuple[str, str]:
    """Copy an artifact with its data key re-wrapped under the active key-encryption key.

    The chunks are copied byte for byte: nothing is decrypted or re-encrypted. Returns the
    (old, new) key ids.
    """
    header = read_header(src)
    data_key = unwrap_data_key(header, keys)
    key_id, kek = keys.active_key()
    dst.write(header.fixed + _key_slot(header.fixed, key_id, kek, data_key))
    while block := src.read(_COPY_BLOCK):
        dst.write(block)
    return header.key_id, key_id


def peek_key_id(src: BinaryIO) -> str:
    """The id of the key-encryption key that wraps this artifact's data key."""
    return read_header(src).key_id


def require_key(keys: KeySource, key_id: str) -> bytes:
    """Fetch a key, mapping any provider failure to KeyUnavailable."""
    try:
        return keys.key(key_id)
    except KeyUnavailable:
        raise
    except Exception as exc:  # a provider bug must not leak key material in a traceback
        raise KeyUnavailable(f"key provider failed for key '{key_id}': {type(exc).__name__}") from None
