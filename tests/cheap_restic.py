"""restic repositories for the tests, opened with a cheap key.

Every restic command opens the repository's key with scrypt at the cost `restic init` calibrated on this
machine (about half a second of CPU: N=32768, r=8, p=3 here), and a suite runs restic some 270 times. A
test's repository is made once per pytest worker by `restic init` (real restic), its one key rewritten
with N=1024, r=8, p=1 (the same master key, encrypted as restic does: AES-256-CTR and Poly1305-AES,
https://restic.readthedocs.io/en/stable/100_references.html#keys-encryption-and-mac), and copied for each
test that asks. restic reads the parameters from the key file, so everything else is restic's own path;
the tests of a first use (a repository the tool initialises, or must not) keep making their own. The copies
of one worker share the template's repository id and master key (and so restic's cache folder): the tool
never reads the id, and each test has its own copy.
"""

import atexit
import base64
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.poly1305 import Poly1305

CHEAP = {"N": 1024, "r": 8, "p": 1}


def derive(password, salt, n, r, p):
    """restic's user key: scrypt's 64 bytes as (AES key, MAC k, MAC r)."""
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=64, maxmem=1 << 30)
    return key[:32], key[32:48], key[48:]


def mac(k, r, nonce, ciphertext):
    """Poly1305-AES as restic computes it: r clamped, s = AES_k(nonce), over the ciphertext."""
    r = bytearray(r)
    for i in (3, 7, 11, 15):
        r[i] &= 15
    for i in (4, 8, 12):
        r[i] &= 252
    encryptor = Cipher(algorithms.AES(k), modes.ECB()).encryptor()
    s = encryptor.update(nonce) + encryptor.finalize()
    return Poly1305.generate_tag(bytes(r) + s, ciphertext)


def decrypt(keys, data):
    aes, k, r = keys
    nonce, ciphertext, tag = data[:16], data[16:-16], data[-16:]
    if mac(k, r, nonce, ciphertext) != tag:
        raise ValueError("the key file's MAC does not match: wrong password or a damaged key")
    decryptor = Cipher(algorithms.AES(aes), modes.CTR(nonce)).decryptor()
    return decryptor.update(ciphertext) + decryptor.finalize()


def encrypt(keys, plaintext):
    aes, k, r = keys
    nonce = os.urandom(16)
    encryptor = Cipher(algorithms.AES(aes), modes.CTR(nonce)).encryptor()
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    return nonce + ciphertext + mac(k, r, nonce, ciphertext)


def rekey_cheaply(repository, password):
    """Rewrite the repository's only key with CHEAP scrypt parameters (same master key, same password)."""
    (old,) = (Path(repository) / "keys").iterdir()
    key = json.loads(old.read_text())
    master = decrypt(derive(password, base64.b64decode(key["salt"]), key["N"], key["r"], key["p"]),
                     base64.b64decode(key["data"]))
    salt = os.urandom(64)
    key.update(CHEAP, salt=base64.b64encode(salt).decode(),
               data=base64.b64encode(encrypt(derive(password, salt, CHEAP["N"], CHEAP["r"], CHEAP["p"]), master)).decode())
    text = json.dumps(key).encode()
    new = old.with_name(hashlib.sha256(text).hexdigest())      # a file's name is its content's sha256
    new.write_bytes(text)
    new.chmod(old.stat().st_mode & 0o777)
    old.unlink()


class Template:
    """One initialised, cheaply keyed repository per pytest worker (per password), copied on demand."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.made = {}

    def copy_to(self, destination, password):
        if password not in self.made:
            repository = self.folder / f"repo-{len(self.made)}"
            env = {k: v for k, v in os.environ.items() if k not in ("RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND")}
            init = subprocess.run(["restic", "init", "--repo", str(repository), "--quiet"], timeout=120, text=True,
                                  env={**env, "RESTIC_PASSWORD": password}, capture_output=True)
            if init.returncode != 0:
                raise RuntimeError(f"restic init failed: {init.stderr.strip()}")
            rekey_cheaply(repository, password)
            self.made[password] = repository
        shutil.copytree(self.made[password], destination)
        return destination


@functools.cache
def template():
    """This worker's Template, in a private folder removed at exit."""
    folder = tempfile.mkdtemp(prefix="restic-template-")
    atexit.register(shutil.rmtree, folder, True)
    return Template(folder)


def premade(destination, password):
    """A cheaply keyed repository at destination (from this worker's template), unless one is there."""
    if not Path(destination).exists():
        template().copy_to(destination, password)
