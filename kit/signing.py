"""Ed25519 signatures over bundle.json's exact bytes: keygen, sign, verify, fingerprint.

The manifest names every file under KIT/ with its size and BLAKE3 (runtimes included), so one
signature over its bytes covers the whole of KIT/. The signature is checked on the raw bytes
*before* the JSON parser sees them.

On disk, one line of text each (short, strict, easy to read by hand):
  signer.pub       ed25519:<64 hex digits of the public key>
  bundle.json.sig  <128 hex digits of the signature>
  private key      ed25519-private:<64 hex digits of the seed>   (0600, never on a stick)

Part of the pure core: no printing, no llama_cpp, no textual.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import blake3
import nacl.exceptions
import nacl.signing

from kit.errors import KitError, SignatureError
from kit.fsutil import atomic_write
from kit.manifest import BundleManifest, parse_bundle_manifest, read_manifest_bytes
from kit.paths import KIT_DIRNAME, BundlePaths

SIG_NAME = "bundle.json.sig"
PUB_NAME = "signer.pub"
PUBLIC_PREFIX = "ed25519:"
PRIVATE_PREFIX = "ed25519-private:"
PRIVATE_MODE = 0o600  # created so, never readable by others, not even for a moment
MAX_KEY_FILE = 1024  # a key or signature file is one short line; anything bigger is not one
_HEX = re.compile(r"^[0-9a-f]+$")


class KeyFileError(KitError):
    """A key file is missing, malformed, unsafe to use, or in the wrong place."""

    hint = "create a key pair with `kit keygen PRIVATE_KEY` and keep the private key off the stick"


# ---------------------------------------------------------------- the four primitives

def sign(bundle_json: bytes, private_key: nacl.signing.SigningKey) -> bytes:
    """The 64-byte ed25519 signature of bundle.json's exact bytes."""
    return private_key.sign(bundle_json).signature


def verify(bundle_json: bytes, signature: bytes, public_key: nacl.signing.VerifyKey) -> None:
    """Raises SignatureError unless `signature` is `public_key`'s signature of exactly these bytes."""
    try:
        public_key.verify(bundle_json, signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise SignatureError("bundle.json does not match its signature "
                             f"(signer {fingerprint(public_key)})") from None


def fingerprint(public_key: nacl.signing.VerifyKey | bytes) -> str:
    """Short and comparable by eye: 'ed25519:' + the first 16 bytes of BLAKE3(key), in groups of 4."""
    digest = blake3.blake3(bytes(public_key)).hexdigest()[:32]
    return PUBLIC_PREFIX + "-".join(digest[i:i + 4] for i in range(0, 32, 4))


def normalise_fingerprint(text: str) -> str:
    """A fingerprint as typed (any case, with or without prefix and separators), in canonical form."""
    bare = re.sub(r"[\s:-]", "", text.strip().lower().removeprefix(PUBLIC_PREFIX))
    if len(bare) != 32 or not _HEX.match(bare):
        raise KeyFileError(f"{text!r} is not a key fingerprint",
                        "copy it as `kit verify` or `kit keygen` printed it: ed25519:xxxx-xxxx-...")
    return PUBLIC_PREFIX + "-".join(bare[i:i + 4] for i in range(0, 32, 4))


# ---------------------------------------------------------------- key files

def inside_a_stick(path: Path) -> Path | None:
    """The stick (a folder holding KIT/) that `path` would be inside, if any."""
    for folder in Path(path).expanduser().absolute().parents:
        if (folder / KIT_DIRNAME).is_dir() or folder.name == KIT_DIRNAME:
            return folder
    return None


def refuse_on_stick(private_path: Path, stick: Path | None = None) -> None:
    """A private key never lives on a stick: anyone holding the stick could sign with it."""
    found = inside_a_stick(private_path)
    if found is None and stick is not None:
        target = Path(stick).expanduser().absolute()
        if target in Path(private_path).expanduser().absolute().parents:
            found = target
    if found is not None:
        raise KeyFileError(f"the private key {private_path} is inside the stick at {found}",
                        "keep the private key on the build machine, e.g. ~/.config/survival-kit/")


def keygen(private_path: Path, public_path: Path) -> str:
    """A new key pair: the private key written 0600 and atomically; returns the fingerprint."""
    private_path, public_path = Path(private_path), Path(public_path)
    refuse_on_stick(private_path)
    if private_path.exists() or private_path.is_symlink():
        raise KeyFileError(f"{private_path} already exists; refusing to overwrite a key",
                        "choose another path, or delete the old key if you really mean to replace it")
    if public_path.absolute() == private_path.absolute():
        raise KeyFileError("the public and private key paths are the same", "give the public key its own path")
    key = nacl.signing.SigningKey.generate()
    atomic_write(private_path, f"{PRIVATE_PREFIX}{bytes(key).hex()}\n".encode(), mode=PRIVATE_MODE)
    atomic_write(public_path, public_key_text(key.verify_key).encode())
    return fingerprint(key.verify_key)


def public_key_text(public_key: nacl.signing.VerifyKey) -> str:
    return f"{PUBLIC_PREFIX}{bytes(public_key).hex()}\n"


def _read_small(path: Path, what: str, error: type[KitError]) -> str:
    """A one-line key or signature file: a regular file (no link, device or FIFO), small, ASCII."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file (a link, device or FIFO)")
    if st.st_size > MAX_KEY_FILE:
        raise error(f"{what} {path} is {st.st_size} bytes; a real one is one short line")
    try:
        return Path(path).read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not a key file (not plain text)") from None


def _hex_bytes(text: str, prefix: str, n: int, what: str, error: type[KitError]) -> bytes:
    body = text.removeprefix(prefix) if prefix else text
    if (prefix and not text.startswith(prefix)) or len(body) != 2 * n or not _HEX.match(body):
        raise error(f"{what} is malformed: expected {prefix}<{2 * n} lowercase hex digits>")
    return bytes.fromhex(body)


def load_private_key(path: Path) -> nacl.signing.SigningKey:
    path = Path(path).expanduser()
    text = _read_small(path, "the private key", KeyFileError)
    if os.name == "posix" and os.lstat(path).st_mode & 0o077:
        raise KeyFileError(f"the private key {path} can be read by other users",
                        f"restrict it with `chmod 600 {path}` (as ssh insists too)")
    return nacl.signing.SigningKey(_hex_bytes(text, PRIVATE_PREFIX, 32, f"the private key {path}", KeyFileError))


def parse_public_key(text: str, what: str = "the public key",
                     error: type[KitError] = KeyFileError) -> nacl.signing.VerifyKey:
    raw = _hex_bytes(text.strip(), PUBLIC_PREFIX, 32, what, error)
    try:
        return nacl.signing.VerifyKey(raw)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise error(f"{what} is not a valid ed25519 key") from None


def load_public_key(path_or_text: str | Path) -> nacl.signing.VerifyKey:
    """A public key from a signer.pub-style file, or given inline as 'ed25519:<64 hex>'."""
    text = str(path_or_text)
    if text.startswith(PUBLIC_PREFIX) and not Path(text).exists():
        return parse_public_key(text)
    return parse_public_key(_read_small(Path(text).expanduser(), "the public key", KeyFileError),
                            f"the public key {text}")


# ---------------------------------------------------------------- on a stick

def write_signature(kit_dir: Path, bundle_json: bytes, private_key: nacl.signing.SigningKey) -> str:
    """bundle.json.sig and signer.pub beside bundle.json (each atomic); returns the fingerprint."""
    signature = sign(bundle_json, private_key)
    verify(bundle_json, signature, private_key.verify_key)  # never write a signature that fails
    atomic_write(kit_dir / PUB_NAME, public_key_text(private_key.verify_key).encode())
    atomic_write(kit_dir / SIG_NAME, (signature.hex() + "\n").encode())
    return fingerprint(private_key.verify_key)


def remove_signature(kit_dir: Path) -> None:
    """An unsigned rebuild must not leave the previous build's signature behind."""
    for name in (SIG_NAME, PUB_NAME):
        (kit_dir / name).unlink(missing_ok=True)


@dataclass(frozen=True)
class Trust:
    """A stick's manifest with what vouches for it: the exact bytes read, and who signed them."""

    manifest: BundleManifest
    raw: bytes
    signer: str | None  # the signer's fingerprint; None: unsigned

    @property
    def signer_label(self) -> str:
        return self.signer or "unsigned"


def check_stick(bundle: BundlePaths, *, key: nacl.signing.VerifyKey | None = None,
                expected_fingerprint: str | None = None) -> Trust:
    """Read bundle.json, check its signature (if it has one) and only then parse it.

    With `key` or `expected_fingerprint`, the stick must be signed, by that key: a stick re-signed by
    someone else (their own signer.pub beside a valid signature) is refused.
    """
    expected = normalise_fingerprint(expected_fingerprint) if expected_fingerprint else None
    if key is not None:
        expected = fingerprint(key)
    raw = read_manifest_bytes(bundle)
    sig_path, pub_path = bundle.kit / SIG_NAME, bundle.kit / PUB_NAME
    present = [p.name for p in (sig_path, pub_path) if os.path.lexists(p)]
    signer = None
    if len(present) == 1:
        raise SignatureError(f"the stick holds {present[0]} without its partner; its signature cannot be checked")
    if present:
        public = parse_public_key(_read_small(pub_path, "signer.pub", SignatureError), "signer.pub",
                                  SignatureError)
        signature = _hex_bytes(_read_small(sig_path, "bundle.json.sig", SignatureError), "", 64,
                               "bundle.json.sig", SignatureError)
        verify(raw, signature, public)
        signer = fingerprint(public)
    if expected is not None and signer != expected:
        found = f"signed by {signer}" if signer else "unsigned"
        raise SignatureError(f"the stick is {found}, not signed by the expected key {expected}")
    return Trust(parse_bundle_manifest(raw), raw, signer)
