"""Reading encrypted model files of format version 1 (our own AES-256-GCM chunk format, before Tink).

Never written any more; :mod:`mask2former.crypto` dispatches here on the version byte. Layout, integers
big-endian::

    0   8  magic b"M2FENC\\r\\n"
    8   1  format version (1)
    9   1  key derivation (1 = scrypt)
    10  1  scrypt log2(N)      11  1  scrypt r      12  1  scrypt p
    13 16  salt
    29  7  nonce prefix
    36  4  plaintext bytes per chunk
    40 16  key check: HMAC-SHA256(check key, bytes 0..39), first 16 bytes
    56 ..  chunks: AES-256-GCM(ciphertext + 16-byte tag) of each plaintext chunk, nonce
           prefix || index (4 bytes) || last (1 byte), the header as associated data

The writer always used N=2^15, r=8, p=1; any header is held to :func:`mask2former.crypto.scrypt_keys`'s
bounds before a key is derived.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .crypto import DamagedFileError, MAGIC, Passphrase, PathLike, missing_key, not_encrypted, passphrase_bytes, \
    scrypt_keys, wrong_key

KDF_SCRYPT = 1
TAG_BYTES = 16
_PREFIX = struct.Struct(">8sBBBBB16s7sI")  # magic .. chunk size: the bytes the key check covers
HEADER_BYTES = _PREFIX.size + 16
MAX_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class _Opener:
    aead: AESGCM
    prefix: bytes
    chunk_size: int
    header: bytes

    def nonce(self, index: int, last: bool) -> bytes:
        return self.prefix + struct.pack(">IB", index, int(last))


def open_header(handle: BinaryIO, *, path: PathLike, passphrase: Passphrase) -> _Opener:
    """Read the rest of a version-1 header (its first 9 bytes were read) and check the key against it."""
    rest = handle.read(HEADER_BYTES - len(MAGIC) - 1)
    if len(rest) < HEADER_BYTES - len(MAGIC) - 1:
        raise not_encrypted(path)
    header = MAGIC + b"\x01" + rest
    _, _, kdf, log2_n, r, p, salt, prefix, chunk_size = _PREFIX.unpack(header[:_PREFIX.size])
    if kdf != KDF_SCRYPT:
        raise DamagedFileError(f"'{path}' names key derivation {kdf}; format 1 knows scrypt (1) only: it is damaged "
                               "or was tampered with.")
    if not 1 <= chunk_size <= MAX_CHUNK_BYTES:
        raise DamagedFileError(f"'{path}' has an implausible chunk size ({chunk_size} bytes): it is damaged or was "
                               "tampered with.")
    secret = passphrase_bytes(passphrase)
    if secret is None:
        raise missing_key(path)
    key, check_key = scrypt_keys(secret, salt, log2_n=log2_n, r=r, p=p, path=path)
    check = hmac.new(check_key, header[:_PREFIX.size], hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(check, header[_PREFIX.size:]):
        raise wrong_key(path)
    return _Opener(AESGCM(key), prefix, chunk_size, header)


def decrypted_chunks(handle: BinaryIO, *, path: PathLike, passphrase: Passphrase) -> Iterator[bytes]:
    """Plaintext chunks of a version-1 file; the key is checked before the first one is yielded."""
    opener = open_header(handle, path=path, passphrase=passphrase)
    block_size = opener.chunk_size + TAG_BYTES
    index = 0
    block = handle.read(block_size)
    while True:
        following = handle.read(block_size)
        last = not following
        if len(block) < TAG_BYTES:
            raise DamagedFileError(f"'{path}' is truncated: it ends before its final encrypted chunk (chunk {index}).")
        if index >= 2 ** 32:
            raise DamagedFileError(f"'{path}' has more chunks than format 1 allows (2^32): it is damaged.")
        try:
            yield opener.aead.decrypt(opener.nonce(index, last), block, opener.header)
        except InvalidTag:
            raise DamagedFileError(f"'{path}' is damaged, truncated or was tampered with: encrypted chunk {index} "
                                   "fails authentication.") from None
        if last:
            return
        block, index = following, index + 1
