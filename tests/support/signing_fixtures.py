"""Fixtures of the signature tests (tests/test_signing.py, tests/test_bundle_signing.py): two signing keys, a cache,
a sentinel directory outside it, and a Sigstore of the tests' own with its trusted root. A pytest plugin
(tests/conftest.py lists it), so both modules share one definition; ``Key`` is what they sign with."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from loader.cache import Cache
from loader.digest import Digest
from tests.support.fake_sigstore import FakeSigstore


def _new_key(kind: str):
    if kind == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Key:
    def __init__(self, tmp: Path, name: str, kind: str = "ecdsa-p256"):
        self.private = _new_key(kind)
        self.pem = tmp / f"{name}.key"
        self.pub = tmp / f"{name}.pub"
        self.pem.write_bytes(self.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
        self.pub_pem = self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        self.pub.write_bytes(self.pub_pem)
        der = self.private.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
        self.fingerprint = str(Digest.of(der))


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Key]:
    return {"right": Key(tmp_path, "right"), "wrong": Key(tmp_path, "wrong")}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    Cache(root).ensure()
    return root


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    d = tmp_path / "sentinel"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "keep.txt").write_bytes(b"untouched")
    return d


@pytest.fixture(scope="module")
def fake() -> FakeSigstore:
    return FakeSigstore()


@pytest.fixture
def root(tmp_path: Path, fake: FakeSigstore) -> Path:
    path = tmp_path / "trusted_root.json"
    path.write_bytes(fake.trusted_root())
    return path
