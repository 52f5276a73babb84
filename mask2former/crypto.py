"""Encrypted model files: checkpoints, ONNX models, engines and quantized models that teams carry between them.

The encryption is Google Tink's streaming AEAD (``AES256_GCM_HKDF_1MB``); this module only turns a
passphrase into a Tink key and frames the file. Chosen over age (``pyrage``) with a passphrase recipient
for what multi-GB checkpoints need:

* **Streaming.** Tink encrypts and decrypts through file objects, one 1 MiB segment in memory at a time, so
  ``torch.save`` streams into an encrypted file and ``decrypt_file`` streams out of one. pyrage's passphrase
  API takes and returns whole ``bytes`` (its streaming ``encrypt_io``/``decrypt_io`` take X25519/SSH keys,
  not passphrases), so a 4 GB checkpoint would need the plaintext and the ciphertext in memory at once.
* **Random access.** Tink's segments are sealed independently under a per-file key (HKDF from the
  key and a random per-file salt), which is what lets Tink's C++/Java/Go APIs seek; the Python binding only
  reads in order, as does pyrage. Readers here that need random access (``torch.load``) get the plaintext in
  memory, as before.
* **Bounded key derivation.** Tink takes a key, not a passphrase, so the one passphrase step is ours: scrypt
  with r=8, p=1 and a cost N read from the header and accepted only within 2^15..2^18 (at most 256 MiB and
  about a second), checked before any work. (age stores only N too and refuses costs by a timing estimate
  of the machine.)
* **Passphrase handling.** The key derivation runs once per process and passphrase for writing (every file
  a process writes shares the salt; Tink gives each file its own key and nonces) and once per salt for
  reading, so a training run that writes a checkpoint every few minutes pays it once.

Format (version 2), integers big-endian::

    0   8  magic b"M2FENC\\r\\n"
    8   1  format version (2)
    9   1  scrypt log2(N); r = 8, p = 1
    10 16  salt
    26 16  key check: HMAC-SHA256(check key, bytes 0..25), first 16 bytes
    42 ..  Tink streaming AEAD ciphertext (AES256_GCM_HKDF_1MB), associated data bytes 0..41

scrypt turns the passphrase and salt into 64 bytes: the Tink key and a check key. The check value tells
"wrong key" from "damaged file" from the 42-byte header alone, before any other work; Tink authenticates
every segment and the end of the stream, so altered, reordered, truncated or extended files are refused.

Version 1 (our own AES-GCM chunk format, before Tink) is still read, never written: see
:mod:`mask2former.crypto_legacy`.

Every refusal is one sentence that names the file and is an :class:`EncryptionError`:
:class:`EncryptionKeyError` when the key is missing or wrong, :class:`DamagedFileError` when the file is
truncated, tampered with, asks for a key derivation out of bounds, or is not of this format. Writers are
atomic (a temporary file renamed into place), so a refused operation never overwrites anything.

``python -m mask2former.crypto {encrypt,decrypt,check,upgrade} SRC [DST]`` does the same from a shell, with
the key from ``$MASK2FORMER_ENCRYPTION_KEY`` or a prompt.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import hashlib
import hmac
import io
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Tuple, Union

__all__ = [
    "KEY_ENV",
    "DamagedFileError",
    "EncryptionError",
    "EncryptionKeyError",
    "check_key",
    "decrypt_file",
    "decrypt_to_bytes",
    "encrypt_file",
    "encrypting_stream",
    "is_encrypted",
    "key_from_environment",
    "open_model_bytes",
    "upgrade_file",
    "write_model_bytes",
]

#: Environment variable the CLI reads the key from when the spec has none.
KEY_ENV = "MASK2FORMER_ENCRYPTION_KEY"
MAGIC = b"M2FENC\r\n"
VERSION = 2
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 17, 8, 1  # 128 MiB; OWASP's minimum for scrypt
MIN_LOG2_N, MAX_LOG2_N = 15, 18
#: No header, of either version, makes a reader derive with more memory (128 * r * N bytes) or work (N * r * p).
MAX_SCRYPT_BYTES = 128 * SCRYPT_R * 2 ** MAX_LOG2_N  # 256 MiB
MAX_SCRYPT_WORK = 2 ** MAX_LOG2_N * SCRYPT_R * SCRYPT_P
SEGMENT_BYTES = 1024 * 1024  # Tink ciphertext segment
_PREFIX = struct.Struct(">8sBB16s")  # magic .. salt: the bytes the key check covers
HEADER_BYTES = _PREFIX.size + 16
_TINK_KEY_URL = "type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey"

PathLike = Union[str, "os.PathLike[str]"]
Passphrase = Union[str, bytes, None]


class EncryptionError(ValueError):
    """A model file that cannot be encrypted or decrypted; the message is one sentence naming the file."""


class EncryptionKeyError(EncryptionError):
    """The key is missing or wrong."""


class DamagedFileError(EncryptionError):
    """Truncated, tampered with, out of bounds, or not a file of this format."""


def key_from_environment() -> Optional[str]:
    """``$MASK2FORMER_ENCRYPTION_KEY``, or None when unset or empty."""
    return os.environ.get(KEY_ENV) or None


def passphrase_bytes(passphrase: Passphrase) -> Optional[bytes]:
    """The passphrase as bytes (UTF-8), or None when it is missing or empty."""
    if passphrase is None or passphrase in ("", b""):
        return None
    return passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)


def missing_key(path: PathLike) -> EncryptionKeyError:
    return EncryptionKeyError(f"'{path}' is encrypted and no encryption key was given: set encryption_key in the "
                              f"spec or the environment variable {KEY_ENV}.")


def wrong_key(path: PathLike) -> EncryptionKeyError:
    return EncryptionKeyError(f"The encryption key is wrong for '{path}': it does not open this file (give the "
                              "key it was encrypted with).")


def not_encrypted(path: PathLike) -> DamagedFileError:
    return DamagedFileError(f"'{path}' is not an encrypted model file (no {MAGIC!r} header, or a header cut short).")


# ------------------------------------------------------------------------------------------ key derivation


def scrypt_keys(secret: bytes, salt: bytes, *, log2_n: int, r: int, p: int, path: PathLike) -> Tuple[bytes, bytes]:
    """64 bytes of scrypt output as (key, check key), refused before any work when the cost is out of bounds.

    The bounds hold for every header of every version, so a crafted or damaged file costs at most
    :data:`MAX_SCRYPT_BYTES` of memory and :data:`MAX_SCRYPT_WORK` of work.
    """
    if not (log2_n >= 1 and r >= 1 and p >= 1 and 128 * r * 2 ** log2_n <= MAX_SCRYPT_BYTES
            and 2 ** log2_n * r * p <= MAX_SCRYPT_WORK):
        raise DamagedFileError(
            f"'{path}' asks for a key derivation out of bounds (scrypt N=2^{log2_n}, r={r}, p={p}; readers accept "
            f"at most {MAX_SCRYPT_BYTES >> 20} MiB and N*r*p <= 2^{MAX_SCRYPT_WORK.bit_length() - 1}): it is "
            "damaged or was tampered with.")
    try:
        return _scrypt(secret, salt, log2_n, r, p)
    except (ValueError, MemoryError) as error:  # bounded above, so only a library limit can get here
        raise DamagedFileError(f"'{path}' has a key derivation this machine cannot run (scrypt N=2^{log2_n}, "
                               f"r={r}, p={p}): {error}.") from None


@functools.lru_cache(maxsize=32)
def _scrypt(secret: bytes, salt: bytes, log2_n: int, r: int, p: int) -> Tuple[bytes, bytes]:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    material = Scrypt(salt=salt, length=64, n=2 ** log2_n, r=r, p=p).derive(secret)
    return material[:32], material[32:]


@functools.lru_cache(maxsize=8)
def _writing_salt(secret: bytes) -> bytes:
    """One salt per passphrase and process: the derivation is paid once, Tink keys each file apart."""
    return os.urandom(16)


def _key_check(check_key: bytes, prefix: bytes) -> bytes:
    return hmac.new(check_key, prefix, hashlib.sha256).digest()[:16]


@functools.lru_cache(maxsize=32)
def _streaming_aead(key: bytes):
    """Tink's StreamingAead for a raw 32-byte key (a one-key keyset, RAW output prefix)."""
    import tink
    from tink import secret_key_access, streaming_aead
    from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2

    streaming_aead.register()
    params = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
        ciphertext_segment_size=SEGMENT_BYTES, derived_key_size=32, hkdf_hash_type=common_pb2.SHA256)
    key_proto = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(version=0, key_value=key, params=params)
    keyset = tink_pb2.Keyset(primary_key_id=1, key=[tink_pb2.Keyset.Key(
        key_data=tink_pb2.KeyData(type_url=_TINK_KEY_URL, value=key_proto.SerializeToString(),
                                  key_material_type=tink_pb2.KeyData.SYMMETRIC),
        status=tink_pb2.ENABLED, key_id=1, output_prefix_type=tink_pb2.RAW)])
    handle = tink.proto_keyset_format.parse(keyset.SerializeToString(), secret_key_access.TOKEN)
    return handle.primitive(streaming_aead.StreamingAead)


# --------------------------------------------------------------------------------------------- writing


def encrypting_stream(raw: BinaryIO, passphrase: Passphrase) -> BinaryIO:
    """A write-only binary stream that encrypts into ``raw`` (e.g. ``torch.save(payload, stream)``).

    Writes the header at once. Closing the stream (or leaving its ``with`` block) seals the end of the
    ciphertext and closes ``raw``; write to a temporary file and rename it only after a clean close.
    """
    secret = passphrase_bytes(passphrase)
    if secret is None:
        raise EncryptionKeyError("An empty encryption key was given: encryption needs a non-empty passphrase.")
    salt = _writing_salt(secret)
    key, check_key = scrypt_keys(secret, salt, log2_n=SCRYPT_LOG2_N, r=SCRYPT_R, p=SCRYPT_P, path="<new file>")
    prefix = _PREFIX.pack(MAGIC, VERSION, SCRYPT_LOG2_N, salt)
    header = prefix + _key_check(check_key, prefix)
    raw.write(header)
    return _streaming_aead(key).new_encrypting_stream(raw, header)


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
            sink = raw if passphrase_bytes(passphrase) is None else encrypting_stream(raw, passphrase)
            with sink:
                for chunk in chunks:
                    sink.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _file_chunks(path: PathLike) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while block := handle.read(SEGMENT_BYTES):
            yield block


def encrypt_file(src: PathLike, dst: PathLike, passphrase: Passphrase) -> None:
    """Encrypt ``src`` into ``dst`` (atomic; ``src`` is left as it is). ``dst`` may equal ``src``."""
    if passphrase_bytes(passphrase) is None:
        raise EncryptionKeyError(f"No encryption key was given to encrypt '{src}': set encryption_key in the spec "
                                 f"or the environment variable {KEY_ENV}.")
    if is_encrypted(src):
        raise EncryptionError(f"'{src}' is already encrypted; encrypting it twice would need two keys to read it.")
    _write_atomically(dst, _file_chunks(src), passphrase)


def write_model_bytes(path: PathLike, data: bytes, passphrase: Passphrase = None) -> None:
    """Write a model (ONNX bytes, a serialized engine) atomically; encrypted when ``passphrase`` is given."""
    view = memoryview(data)
    _write_atomically(path, (view[i:i + SEGMENT_BYTES] for i in range(0, len(view), SEGMENT_BYTES)), passphrase)


# --------------------------------------------------------------------------------------------- reading


def is_encrypted(path: PathLike) -> bool:
    """Whether ``path`` starts with the magic bytes of an encrypted model file (any version)."""
    with open(path, "rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def _read_version(handle: BinaryIO, path: PathLike) -> int:
    start = handle.read(len(MAGIC) + 1)
    if len(start) < len(MAGIC) + 1 or not start.startswith(MAGIC):
        raise not_encrypted(path)
    version = start[-1]
    if version not in (1, VERSION):
        raise DamagedFileError(f"'{path}' uses encryption format {version}; this version reads formats 1 and "
                               f"{VERSION}.")
    return version


def _open_v2_header(handle: BinaryIO, *, path: PathLike, passphrase: Passphrase) -> Tuple[bytes, bytes]:
    """(Tink key, header) of a version-2 file whose first 9 bytes were read; the key is checked here."""
    rest = handle.read(HEADER_BYTES - len(MAGIC) - 1)
    if len(rest) < HEADER_BYTES - len(MAGIC) - 1:
        raise not_encrypted(path)
    header = MAGIC + bytes([VERSION]) + rest
    _, _, log2_n, salt = _PREFIX.unpack(header[:_PREFIX.size])
    if not MIN_LOG2_N <= log2_n <= MAX_LOG2_N:
        raise DamagedFileError(f"'{path}' asks for a key derivation out of bounds (scrypt N=2^{log2_n}; format "
                               f"{VERSION} allows 2^{MIN_LOG2_N}..2^{MAX_LOG2_N}): it is damaged or was tampered "
                               "with.")
    secret = passphrase_bytes(passphrase)
    if secret is None:
        raise missing_key(path)
    key, check_key = scrypt_keys(secret, salt, log2_n=log2_n, r=SCRYPT_R, p=SCRYPT_P, path=path)
    if not hmac.compare_digest(_key_check(check_key, header[:_PREFIX.size]), header[_PREFIX.size:]):
        raise wrong_key(path)
    return key, header


def check_key(path: PathLike, passphrase: Passphrase) -> None:
    """Refuse early: :class:`EncryptionKeyError` when ``path`` is encrypted and the key is missing or wrong.

    Plain files pass. Costs at most one key derivation; reads only the header.
    """
    with open(path, "rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            return
        handle.seek(0)
        if _read_version(handle, path) == 1:
            from . import crypto_legacy

            crypto_legacy.open_header(handle, path=path, passphrase=passphrase)
        else:
            _open_v2_header(handle, path=path, passphrase=passphrase)


def _plaintext_chunks(path: PathLike, passphrase: Passphrase) -> Iterator[bytes]:
    """Plaintext of an encrypted file, in pieces. The key is checked before the first piece is yielded; damage
    raises :class:`DamagedFileError` where it is found, so callers must not publish output before the iterator
    is exhausted."""
    with open(path, "rb") as handle:
        if _read_version(handle, path) == 1:
            from . import crypto_legacy

            yield from crypto_legacy.decrypted_chunks(handle, path=path, passphrase=passphrase)
            return
        key, header = _open_v2_header(handle, path=path, passphrase=passphrase)
        yield from _tink_plaintext(handle, key=key, header=header, path=path)


def _tink_plaintext(handle: BinaryIO, *, key: bytes, header: bytes, path: PathLike) -> Iterator[bytes]:
    from tink import TinkError

    done = 0
    stream = _streaming_aead(key).new_decrypting_stream(handle, header)
    with stream:
        while True:
            try:
                block = stream.read1(SEGMENT_BYTES)
            except TinkError:
                raise DamagedFileError(f"'{path}' is damaged, truncated or was tampered with: its encrypted data "
                                       f"fails authentication after {done} plaintext bytes.") from None
            if not block:
                return
            done += len(block)
            yield block


def decrypt_to_bytes(path: PathLike, passphrase: Passphrase) -> bytes:
    """The plaintext of an encrypted file, authenticated end to end, in memory (one copy of the plaintext plus
    one segment)."""
    out = io.BytesIO()
    for block in _plaintext_chunks(path, passphrase):
        out.write(block)
    return out.getvalue()


def decrypt_file(src: PathLike, dst: PathLike, passphrase: Passphrase) -> None:
    """Decrypt ``src`` into ``dst``; ``dst`` appears only when all of ``src`` authenticated."""
    if not is_encrypted(src):
        raise not_encrypted(src)
    _write_atomically(dst, _plaintext_chunks(src, passphrase), None)


def upgrade_file(src: PathLike, dst: PathLike, passphrase: Passphrase) -> None:
    """Re-encrypt a file of any version into the current one (streamed, no plaintext on disk)."""
    if not is_encrypted(src):
        raise not_encrypted(src)
    check_key(src, passphrase)
    _write_atomically(dst, _plaintext_chunks(src, passphrase), passphrase)


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
                                     description="Encrypt, decrypt, check or upgrade (re-encrypt a format-1 file "
                                                 f"in the current format) a model file; key from ${KEY_ENV} or a "
                                                 "prompt.")
    parser.add_argument("command", choices=["encrypt", "decrypt", "check", "upgrade"])
    parser.add_argument("src")
    parser.add_argument("dst", nargs="?", help="output file (encrypt, decrypt, upgrade); default: replace SRC")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            if not is_encrypted(args.src):
                print(f"{args.src}: not encrypted")
                return 0
            for _ in _plaintext_chunks(args.src, _read_key(prompt_twice=False)):
                pass
            print(f"{args.src}: encrypted; the key opens it and all of it authenticates")
        elif args.command == "encrypt":
            encrypt_file(args.src, args.dst or args.src, _read_key(prompt_twice=True))
        elif args.command == "upgrade":
            upgrade_file(args.src, args.dst or args.src, _read_key(prompt_twice=False))
        else:
            decrypt_file(args.src, args.dst or args.src, _read_key(prompt_twice=False))
    except (EncryptionError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # run the imported module, not this __main__ copy: crypto_legacy raises the imported module's error classes
    from mask2former.crypto import main as _main

    sys.exit(_main())
