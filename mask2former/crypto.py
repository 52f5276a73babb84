"""Encrypted model files: checkpoints, ONNX models and quantized models that teams carry between them.

Format (version 1), all integers big-endian::

    0   8  magic  b"M2FENC\\r\\n"
    8   1  format version (1)
    9   1  key derivation (1 = scrypt)
    10  1  scrypt log2(N)      11  1  scrypt r      12  1  scrypt p
    13 16  random salt
    29  7  random nonce prefix
    36  4  plaintext bytes per chunk
    40 16  key check: HMAC-SHA256(check key, bytes 0..39), first 16 bytes
    56 ..  chunks: AES-256-GCM(ciphertext + 16-byte tag) of each plaintext chunk

scrypt turns the passphrase and salt into 64 bytes: an AES-256 key and a check key. The check value lets a
reader tell "wrong key" from "damaged file" from the 56-byte header alone, before any other work. Chunk
``i`` is sealed with the nonce ``prefix || i (4 bytes) || last (1 byte)`` and the header as associated
data (the STREAM construction): reordered, altered, truncated or extended files fail authentication,
because only the real final chunk carries ``last = 1`` and nothing may follow it. Files of any size are
encrypted and decrypted in 1 MiB chunks; :func:`decrypt_to_bytes` holds the whole plaintext (model loaders
need it in memory anyway: ``torch.load`` and ``onnxruntime.InferenceSession`` take bytes).

Every refusal is one sentence that names the file: :class:`EncryptionKeyError` when the key is missing or
wrong, :class:`DamagedFileError` when the file is truncated, tampered with or not of this format. Writers
are atomic (a temporary file renamed into place), so a refused operation never overwrites anything.

``python -m mask2former.crypto {encrypt,decrypt,check} SRC [DST]`` does the same from a shell, with the key
from ``$MASK2FORMER_ENCRYPTION_KEY`` or a prompt.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import hmac
import io
import os
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = [
    "KEY_ENV",
    "DamagedFileError",
    "EncryptingWriter",
    "EncryptionError",
    "EncryptionKeyError",
    "check_key",
    "decrypt_file",
    "decrypt_to_bytes",
    "encrypt_file",
    "is_encrypted",
    "key_from_environment",
    "open_model_bytes",
    "write_model_bytes",
]

#: Environment variable the CLI reads the key from when the spec has none.
KEY_ENV = "MASK2FORMER_ENCRYPTION_KEY"
MAGIC = b"M2FENC\r\n"
VERSION = 1
KDF_SCRYPT = 1
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 15, 8, 1  # 32 MiB and ~0.1 s per derivation
CHUNK_BYTES = 1024 * 1024
TAG_BYTES = 16
_PREFIX = struct.Struct(">8sBBBBB16s7sI")  # magic .. chunk size: the bytes the key check covers
HEADER_BYTES = _PREFIX.size + 16
MAX_CHUNK_BYTES = 64 * 1024 * 1024
_MAX_LOG2_N, _MAX_R, _MAX_P = 22, 32, 16  # a crafted header must not make the reader derive for hours

PathLike = Union[str, "os.PathLike[str]"]
Passphrase = Union[str, bytes, None]


class EncryptionError(ValueError):
    """A model file that cannot be encrypted or decrypted; the message is one sentence naming the file."""


class EncryptionKeyError(EncryptionError):
    """The key is missing or wrong."""


class DamagedFileError(EncryptionError):
    """Truncated, tampered with, or not a file of this format."""


def key_from_environment() -> Optional[str]:
    """``$MASK2FORMER_ENCRYPTION_KEY``, or None when unset or empty."""
    return os.environ.get(KEY_ENV) or None


def _passphrase_bytes(passphrase: Passphrase) -> Optional[bytes]:
    if passphrase is None or passphrase in ("", b""):
        return None
    return passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)


def _missing_key(path: PathLike) -> EncryptionKeyError:
    return EncryptionKeyError(f"'{path}' is encrypted and no encryption key was given: set encryption_key in the "
                              f"spec or the environment variable {KEY_ENV}.")


def _wrong_key(path: PathLike) -> EncryptionKeyError:
    return EncryptionKeyError(f"The encryption key is wrong for '{path}': it does not open this file (give the "
                              "key it was encrypted with).")


# --------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class _Sealer:
    """What seals or opens the chunks of one file."""

    aead: AESGCM
    prefix: bytes
    chunk_size: int
    header: bytes

    def nonce(self, index: int, last: bool) -> bytes:
        if index >= 2 ** 32:
            raise EncryptionError("file too large for one encrypted stream (more than 2^32 chunks)")
        return self.prefix + struct.pack(">IB", index, int(last))


def _derive(secret: bytes, salt: bytes, log2_n: int, r: int, p: int) -> tuple[bytes, bytes]:
    material = Scrypt(salt=salt, length=64, n=2 ** log2_n, r=r, p=p).derive(secret)
    return material[:32], material[32:]


def _key_check(check_key: bytes, prefix: bytes) -> bytes:
    return hmac.new(check_key, prefix, hashlib.sha256).digest()[:16]


def _new_sealer(passphrase: Passphrase, chunk_size: int) -> _Sealer:
    secret = _passphrase_bytes(passphrase)
    if secret is None:
        raise EncryptionKeyError("An empty encryption key was given: encryption needs a non-empty passphrase.")
    if not 1 <= chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_BYTES}, got {chunk_size}")
    salt, prefix = os.urandom(16), os.urandom(7)
    key, check_key = _derive(secret, salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
    head = _PREFIX.pack(MAGIC, VERSION, KDF_SCRYPT, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P, salt, prefix, chunk_size)
    return _Sealer(AESGCM(key), prefix, chunk_size, head + _key_check(check_key, head))


def _open_header(handle: BinaryIO, *, path: PathLike, passphrase: Passphrase) -> _Sealer:
    """Read and check the header; the key is checked here, before any chunk is read."""
    header = handle.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or not header.startswith(MAGIC):
        raise DamagedFileError(f"'{path}' is not an encrypted model file (no {MAGIC!r} header, or a header cut "
                               "short).")
    magic, version, kdf, log2_n, r, p, salt, prefix, chunk_size = _PREFIX.unpack(header[:_PREFIX.size])
    if version != VERSION or kdf != KDF_SCRYPT:
        raise DamagedFileError(f"'{path}' uses encryption format {version} (key derivation {kdf}); this version "
                               f"reads format {VERSION} with scrypt only.")
    if not (log2_n <= _MAX_LOG2_N and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P and 1 <= chunk_size <= MAX_CHUNK_BYTES):
        raise DamagedFileError(f"'{path}' has an implausible encryption header (scrypt N=2^{log2_n}, r={r}, p={p}, "
                               f"chunk {chunk_size} bytes): it is damaged or was tampered with.")
    secret = _passphrase_bytes(passphrase)
    if secret is None:
        raise _missing_key(path)
    key, check_key = _derive(secret, salt, log2_n, r, p)
    if not hmac.compare_digest(_key_check(check_key, header[:_PREFIX.size]), header[_PREFIX.size:]):
        raise _wrong_key(path)
    return _Sealer(AESGCM(key), prefix, chunk_size, header)


# --------------------------------------------------------------------------------------------- writing


class EncryptingWriter:
    """A write-only binary stream that encrypts into ``raw`` (e.g. ``torch.save(payload, writer)``).

    ``close()`` (or leaving the ``with`` block without an exception) seals the final chunk; it does not
    close ``raw``. A writer left by an exception is not finished, and its output does not decrypt.
    """

    def __init__(self, raw: BinaryIO, passphrase: Passphrase, chunk_size: int = CHUNK_BYTES) -> None:
        self._raw = raw
        self._sealer = _new_sealer(passphrase, chunk_size)
        self._buffer = bytearray()
        self._index = 0
        self.closed = False
        raw.write(self._sealer.header)

    def writable(self) -> bool:
        return True

    def write(self, data: Union[bytes, bytearray, memoryview]) -> int:
        if self.closed:
            raise ValueError("write to a closed EncryptingWriter")
        view = memoryview(data).cast("B")
        self._buffer += view
        size = self._sealer.chunk_size
        # keep at least one byte back: the final chunk is only known at close()
        while len(self._buffer) > size:
            self._seal(bytes(self._buffer[:size]), last=False)
            del self._buffer[:size]
        return len(view)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        if not self.closed:
            self._seal(bytes(self._buffer), last=True)
            self._buffer.clear()
            self.closed = True
            self._raw.flush()

    def _seal(self, chunk: bytes, *, last: bool) -> None:
        sealer = self._sealer
        self._raw.write(sealer.aead.encrypt(sealer.nonce(self._index, last), chunk, sealer.header))
        self._index += 1

    def __enter__(self) -> "EncryptingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def _atomic_target(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _write_atomically(dst: PathLike, chunks: Iterator[bytes], passphrase: Passphrase) -> None:
    """Write ``chunks`` (plaintext) to ``dst`` through a temporary file, encrypted when a key is given."""
    target = Path(dst)
    tmp = _atomic_target(target)
    try:
        with open(tmp, "wb") as raw:
            if _passphrase_bytes(passphrase) is None:
                for chunk in chunks:
                    raw.write(chunk)
            else:
                with EncryptingWriter(raw, passphrase) as writer:
                    for chunk in chunks:
                        writer.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _file_chunks(path: PathLike) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            yield block


def encrypt_file(src: PathLike, dst: PathLike, passphrase: Passphrase) -> None:
    """Encrypt ``src`` into ``dst`` (atomic; ``src`` is left as it is). ``dst`` may equal ``src``."""
    if _passphrase_bytes(passphrase) is None:
        raise EncryptionKeyError(f"No encryption key was given to encrypt '{src}': set encryption_key in the spec "
                                 f"or the environment variable {KEY_ENV}.")
    if is_encrypted(src):
        raise EncryptionError(f"'{src}' is already encrypted; encrypting it twice would need two keys to read it.")
    _write_atomically(dst, _file_chunks(src), passphrase)


def write_model_bytes(path: PathLike, data: bytes, passphrase: Passphrase = None) -> None:
    """Write a model (ONNX bytes, a serialized checkpoint) atomically; encrypted when ``passphrase`` is given."""
    view = memoryview(data)
    _write_atomically(path, (view[i:i + CHUNK_BYTES].tobytes() for i in range(0, len(view), CHUNK_BYTES)),
                      passphrase)


# --------------------------------------------------------------------------------------------- reading


def is_encrypted(path: PathLike) -> bool:
    """Whether ``path`` starts with this format's magic bytes."""
    with open(path, "rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def check_key(path: PathLike, passphrase: Passphrase) -> None:
    """Refuse early: :class:`EncryptionKeyError` when ``path`` is encrypted and the key is missing or wrong.

    Plain files pass. Costs one key derivation (~0.1 s); reads only the header.
    """
    with open(path, "rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            return
        handle.seek(0)
        _open_header(handle, path=path, passphrase=passphrase)


def _decrypted_chunks(path: PathLike, passphrase: Passphrase) -> Iterator[bytes]:
    """Plaintext chunks of an encrypted file. The key is checked before the first chunk is yielded; damage
    raises :class:`DamagedFileError` at the chunk where it is found, so callers must not publish output
    before the iterator is exhausted."""
    with open(path, "rb") as handle:
        sealer = _open_header(handle, path=path, passphrase=passphrase)
        block_size = sealer.chunk_size + TAG_BYTES
        index = 0
        block = handle.read(block_size)
        while True:
            following = handle.read(block_size)
            last = not following
            if len(block) < TAG_BYTES:
                raise DamagedFileError(f"'{path}' is truncated: it ends before its final encrypted chunk "
                                       f"(chunk {index}).")
            try:
                yield sealer.aead.decrypt(sealer.nonce(index, last), block, sealer.header)
            except InvalidTag:
                raise DamagedFileError(f"'{path}' is damaged, truncated or was tampered with: encrypted chunk "
                                       f"{index} fails authentication.") from None
            if last:
                return
            block, index = following, index + 1


def decrypt_to_bytes(path: PathLike, passphrase: Passphrase) -> bytes:
    """The plaintext of an encrypted file, authenticated end to end (memory: up to twice the file size while
    the chunks are joined)."""
    out = io.BytesIO()
    for chunk in _decrypted_chunks(path, passphrase):
        out.write(chunk)
    return out.getvalue()


def decrypt_file(src: PathLike, dst: PathLike, passphrase: Passphrase) -> None:
    """Decrypt ``src`` into ``dst``; ``dst`` appears only when all of ``src`` authenticated."""
    if not is_encrypted(src):
        raise DamagedFileError(f"'{src}' is not an encrypted model file (no {MAGIC!r} header).")
    _write_atomically(dst, _decrypted_chunks(src, passphrase), None)


def open_model_bytes(path: PathLike, passphrase: Passphrase = None) -> bytes:
    """The bytes of a model file, decrypted when it is encrypted (then the key must be given and right)."""
    if is_encrypted(path):
        return decrypt_to_bytes(path, passphrase)
    return Path(path).read_bytes()


# ------------------------------------------------------------------------------------------------ shell


def _read_key(prompt_twice: bool) -> str:
    key = key_from_environment()
    if key:
        return key
    if not sys.stdin.isatty():
        raise EncryptionKeyError(f"No encryption key: set the environment variable {KEY_ENV} (no terminal to "
                                 "prompt on).")
    key = getpass.getpass("Encryption key: ")
    if prompt_twice and getpass.getpass("Repeat the key: ") != key:
        raise EncryptionKeyError("The two keys typed differ; nothing was written.")
    return key


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mask2former.crypto",
                                     description="Encrypt, decrypt or check a model file (key from "
                                                 f"${KEY_ENV} or a prompt).")
    parser.add_argument("command", choices=["encrypt", "decrypt", "check"])
    parser.add_argument("src")
    parser.add_argument("dst", nargs="?", help="output file (encrypt, decrypt); default: replace SRC")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            if not is_encrypted(args.src):
                print(f"{args.src}: not encrypted")
                return 0
            decrypt_to_bytes(args.src, _read_key(prompt_twice=False))
            print(f"{args.src}: encrypted; the key opens it and every chunk authenticates")
        elif args.command == "encrypt":
            encrypt_file(args.src, args.dst or args.src, _read_key(prompt_twice=True))
        else:
            decrypt_file(args.src, args.dst or args.src, _read_key(prompt_twice=False))
    except (EncryptionError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
