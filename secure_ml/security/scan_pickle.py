"""Pickle streams read opcode by opcode, never loaded, and their imports judged against an allow-list.

    stream = walk_pickle(data)                 # PickleStream: start, end, protocol, imports, problems
    stream = walk_pickle(reader, offset=4096)  # any object with read/seek/tell (an mmap, a file)
    bad = disallowed(stream)                   # imports outside the allow-list, plus unresolved globals

Every opcode is walked (pickletools' opcode table; big arguments skipped, not read), in any protocol, to its STOP. The names a loader
would import come from GLOBAL and INST, and from STACK_GLOBAL resolved through a small emulation
of the unpickler's stack and memo (string pushes, GET/PUT/MEMOIZE, marks, DUP, POP): a
STACK_GLOBAL whose operands are not known strings is itself a problem, as are extension codes
(EXT1/2/4, which name callables through a registry). A stream that is truncated, holds an unknown
opcode or unbalances its stack raises :class:`UnreadablePickle` (a BadInput): the caller blocks.

The allow-list is torch's tensor rebuilders, storages and dtypes, numpy's array reconstruction,
and plain containers: the names ``torch.load(weights_only=True)`` and ``numpy`` need. Anything
else, however harmless it looks, blocks: deny-lists miss what they did not think of.
"""

from __future__ import annotations

import io
import pickletools
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from secure_ml.errors import BadInput

_TORCH_TYPES = ("BFloat16", "Bool", "Byte", "Char", "ComplexDouble", "ComplexFloat", "Double", "Float", "Half",
                "Int", "Long", "Short")
_TORCH_DTYPES = ("bfloat16", "bool", "complex128", "complex32", "complex64", "float16", "float32", "float64",
                 "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "int16", "int32", "int64",
                 "int8", "qint32", "qint8", "quint2x4", "quint4x2", "quint8", "uint8", "uint16", "uint32", "uint64",
                 "half", "float", "double", "long", "int", "short", "cfloat", "cdouble")
ALLOWED_IMPORTS: frozenset[str] = frozenset({
    # torch's tensor rebuilders and the types they take (what torch.load(weights_only=True) allows)
    *(f"torch._utils.{name}" for name in (
        "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
        "_rebuild_parameter_with_state", "_rebuild_sparse_tensor", "_rebuild_nested_tensor", "_rebuild_qtensor",
        "_rebuild_meta_tensor_no_storage", "_rebuild_device_tensor_from_numpy",
        "_rebuild_device_tensor_from_cpu_tensor")),
    "torch._tensor._rebuild_from_type_v2", "torch.serialization._get_layout",
    "torch.Size", "torch.Tensor", "torch.device", "torch.nn.parameter.Parameter", "torch.UntypedStorage",
    "torch.storage.UntypedStorage", "torch.storage.TypedStorage",
    *(f"torch.{kind}Storage" for kind in _TORCH_TYPES), *(f"torch.Q{q}Storage" for q in ("Int32", "Int8", "UInt8",
                                                                                       "UInt2x4", "UInt4x2")),
    *(f"torch.{dtype}" for dtype in _TORCH_DTYPES),
    "torch.strided", "torch.sparse_coo", "torch.contiguous_format", "torch.channels_last", "torch.preserve_format",
    "torch.per_tensor_affine", "torch.per_channel_affine",
    # numpy's array and scalar reconstruction
    *(f"{core}.multiarray.{name}" for core in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")),
    *(f"{core}.numeric._frombuffer" for core in ("numpy.core", "numpy._core")),
    "numpy.ndarray", "numpy.dtype",
    # plain containers (and the bytes helper protocol 2 uses for bytes)
    "collections.OrderedDict", "collections.Counter", "builtins.set", "builtins.frozenset", "builtins.slice",
    "builtins.complex", "builtins.bytearray", "builtins.range", "_codecs.encode",
})
# Python 2 names the unpickler maps to today's modules (fix_imports).
RENAMED_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_MARK = object()
_UNKNOWN = object()
MAX_OPCODES = 50_000_000


class UnreadablePickle(BadInput):
    """A stream that is not a complete, well-formed pickle: it cannot be judged, so it blocks."""


class TruncatedPickle(UnreadablePickle):
    """The stream runs past the end of the bytes it was given."""


@dataclass(frozen=True)
class PickleStream:
    start: int
    end: int                       # offset just after STOP
    protocol: int
    imports: tuple[str, ...]       # "module.name" a loader would import, in order, duplicates dropped
    problems: tuple[str, ...]      # what cannot be resolved (a computed STACK_GLOBAL, an extension code)
    persistent_ids: int = 0        # torch's storages arrive as persistent ids


class _Window:
    """read/tell over bytes or a seekable reader, bounded to [start, end)."""

    def __init__(self, source: Any, start: int, end: int) -> None:
        self.source, self.position, self.end = source, start, end

    def read(self, size: int = -1) -> bytes:
        if size > self.end - self.position:
            # An argument longer than what is left: truncated (and never read into memory).
            raise TruncatedPickle(f"pickle is truncated: {size} bytes wanted past the end of the data")
        size = self.end - self.position if size < 0 else size
        if size <= 0:
            return b""
        if isinstance(self.source, (bytes, bytearray, memoryview)):
            data = bytes(self.source[self.position:self.position + size])
        else:
            self.source.seek(self.position)
            data = self.source.read(size)
        self.position += len(data)
        return data

    def readline(self) -> bytes:
        # Protocol 0 arguments end at a newline; read in small steps, never past the window.
        chunks = []
        while self.position < self.end:
            chunk = self.read(min(256, self.end - self.position))
            cut = chunk.find(b"\n")
            if cut >= 0:
                self.position -= len(chunk) - cut - 1
                chunks.append(chunk[:cut + 1])
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def tell(self) -> int:
        return self.position


def _length(source: Any) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    position = source.tell()
    source.seek(0, io.SEEK_END)
    size = int(source.tell())
    source.seek(position)
    return size


_CODE2OP = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
_LENGTH_PREFIX = {pickletools.TAKEN_FROM_ARGUMENT1: (1, "<B"), pickletools.TAKEN_FROM_ARGUMENT4: (4, "<i"),
                  pickletools.TAKEN_FROM_ARGUMENT4U: (4, "<I"), pickletools.TAKEN_FROM_ARGUMENT8U: (8, "<Q")}
MAX_NAME_STRING = 64 * 1024   # longer strings are data, never an import's operand: skipped, not read


def _next_opcode(window: _Window) -> tuple[Any, Any]:
    """One opcode and its argument. Length-prefixed arguments (bytes, long ints, big strings) are
    skipped without reading them, so a 1 GiB array in a pickle costs a seek, not a copy."""
    code = window.read(1)
    if not code:
        raise TruncatedPickle("pickle is truncated: it ends without STOP")
    opcode = _CODE2OP.get(code)
    if opcode is None:
        raise UnreadablePickle(f"unknown opcode {code!r} at byte {window.tell() - 1}")
    spec = opcode.arg
    if spec is None:
        return opcode, None
    if spec.n in _LENGTH_PREFIX:
        width, fmt = _LENGTH_PREFIX[spec.n]
        (size,) = struct.unpack(fmt, window.read(width))
        if size < 0:
            raise UnreadablePickle(f"{opcode.name} argument has a negative length")
        if size > window.end - window.position:
            raise TruncatedPickle(f"pickle is truncated: {opcode.name} argument of {size} bytes runs past the end")
        if opcode.name in _STRING_OPS and size <= MAX_NAME_STRING:
            raw = window.read(size)
            try:
                return opcode, raw.decode("utf-8", "surrogatepass") if "UNICODE" in opcode.name else raw.decode("latin-1")
            except UnicodeDecodeError:
                raise UnreadablePickle(f"{opcode.name} argument is not UTF-8") from None
        window.position += size
        return opcode, _UNKNOWN
    return opcode, spec.reader(window)


def walk_pickle(source: bytes | bytearray | memoryview | BinaryIO | Any, offset: int = 0,
                end: int | None = None) -> PickleStream:
    """Walk one pickle stream from ``offset`` to its STOP; raise UnreadablePickle if it is not one."""
    end = _length(source) if end is None else end
    window = _Window(source, offset, end)
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    imports: dict[str, None] = {}
    problems: dict[str, None] = {}
    protocol, persistent, count, stopped = 0, 0, 0, False

    def pop(n: int = 1) -> list[Any]:
        if n > len(stack) or any(item is _MARK for item in stack[len(stack) - n:]):
            raise UnreadablePickle("pickle pops more than its stack holds")
        taken = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return taken

    def pop_mark() -> None:
        for index in range(len(stack) - 1, -1, -1):
            if stack[index] is _MARK:
                del stack[index:]
                return
        raise UnreadablePickle("pickle pops to a mark it never set")

    def record(module: str, name: str) -> None:
        module = RENAMED_MODULES.get(module, module)
        imports[f"{module}.{name}"] = None

    try:
        while True:
            opcode, arg = _next_opcode(window)
            count += 1
            if count > MAX_OPCODES:
                raise UnreadablePickle(f"pickle has more than {MAX_OPCODES} opcodes")
            name = opcode.name
            if name == "PROTO":
                protocol = int(arg)
                continue
            if name == "STOP":
                pop(1)
                stopped = True
                break
            if name in _STRING_OPS:
                stack.append(arg if arg is _UNKNOWN else str(arg))
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise UnreadablePickle(f"pickle reads memo slot {arg} it never wrote")
                stack.append(memo[arg])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if not stack or stack[-1] is _MARK:
                    raise UnreadablePickle("pickle memoizes from an empty stack")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "POP_MARK":
                pop_mark()
            elif name == "POP":
                if stack and stack[-1] is _MARK:
                    stack.pop()  # the unpickler's POP on an empty frame drops the mark
                else:
                    pop(1)
            elif name == "DUP":
                if not stack or stack[-1] is _MARK:
                    raise UnreadablePickle("pickle duplicates from an empty stack")
                stack.append(stack[-1])
            elif name == "GLOBAL":
                module, _, attribute = str(arg).partition(" ")
                record(module, attribute)
                stack.append(_UNKNOWN)
            elif name == "INST":
                module, _, attribute = str(arg).partition(" ")
                record(module, attribute)
                pop_mark()
                stack.append(_UNKNOWN)
            elif name == "STACK_GLOBAL":
                module, attribute = pop(2)
                if isinstance(module, str) and isinstance(attribute, str):
                    record(module, attribute)
                else:
                    # The operands are computed, not literal: nobody can say what it imports.
                    problems["STACK_GLOBAL with operands that are not literal strings"] = None
                stack.append(_UNKNOWN)
            elif name in ("EXT1", "EXT2", "EXT4"):
                problems[f"{name} {arg}: a callable named through the copyreg extension registry"] = None
                stack.append(_UNKNOWN)
            else:
                if name in ("PERSID", "BINPERSID"):
                    persistent += 1
                before, after = opcode.stack_before, opcode.stack_after
                if pickletools.markobject in before:
                    pop_mark()
                    pop(before.index(pickletools.markobject))
                else:
                    pop(len(before))
                stack.extend(_UNKNOWN for _ in after)
    except UnreadablePickle:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever an argument reader says about bad bytes, the stream is unreadable
        raise UnreadablePickle(f"not a well-formed pickle at byte {offset}: {str(exc)[:160]}") from None
    if not stopped:
        raise UnreadablePickle(f"pickle at byte {offset} ends without STOP (truncated)")
    if count < 2:
        raise UnreadablePickle(f"no pickle at byte {offset}")
    return PickleStream(offset, window.tell(), protocol, tuple(imports), tuple(problems), persistent)


def disallowed(stream: PickleStream, allowed: frozenset[str] = ALLOWED_IMPORTS) -> list[str]:
    """What in the stream blocks: each import outside the allow-list, and each unresolved problem."""
    return [f"imports {name}" for name in stream.imports if name not in allowed] + list(stream.problems)


def walk_stacked(source: Any, offset: int = 0, end: int | None = None, *, limit: int = 64) -> list[PickleStream]:
    """Every pickle laid end to end from ``offset`` (torch's legacy format, joblib, pickles appended
    to pickles); the first must parse, later bytes that are not a pickle are data."""
    end = _length(source) if end is None else end
    streams = [walk_pickle(source, offset, end)]
    while streams[-1].end < end and len(streams) < limit:
        try:
            streams.append(walk_pickle(source, streams[-1].end, end))
        except UnreadablePickle:
            break
    return streams
