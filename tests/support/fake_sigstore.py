"""A Sigstore of the tests' own, offline: a Fulcio-like CA, a CT log key and a Rekor key, a trusted root JSON that
trusts exactly them, and bundles (v0.3, DSSE or message signature) that sigstore-python verifies against it.

Real Sigstore bundles need Fulcio (a certificate for an OIDC identity) and Rekor (a log entry); neither is
reachable here, so this plays both, as sigstore-python's own tests do with their staging assets: the certificate
carries the SAN and the OIDC issuer extensions and one embedded SCT (RFC 6962, precertificate entry, signed by the
CT key over the TBS without the SCT list), and the log entry is a one-leaf Merkle tree (root = the leaf hash)
with a checkpoint signed as a signed note and an inclusion promise (SET) over RFC 8785 JSON, both by the Rekor key.

    fake = FakeSigstore()
    fake.trusted_root()                                   # bytes of the trusted root JSON
    fake.dsse_bundle(statement_bytes, subject="dev@example.com", issuer="https://issuer.example")
    fake.statement(digest)                                # an in-toto statement whose subject is the digest
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import struct

import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

OIDC_ISSUER = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OIDC_ISSUER_V2 = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
SCT_LIST = ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
BUNDLE_V03 = "application/vnd.dev.sigstore.bundle.v0.3+json"
IN_TOTO = "application/vnd.in-toto+json"
NOW = datetime.datetime(2026, 1, 15, 12, 0, tzinfo=datetime.UTC)


def _spki(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _der_octet_string(data: bytes) -> bytes:
    n = len(data)
    if n < 0x80:
        return b"\x04" + bytes([n]) + data
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x04" + bytes([0x80 | len(length)]) + length + data


def _der_utf8(text: str) -> bytes:
    data = text.encode()
    assert len(data) < 0x80
    return b"\x0c" + bytes([len(data)]) + data


class FakeSigstore:
    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ct_key = ec.generate_private_key(ec.SECP256R1())
        self.rekor_key = ec.generate_private_key(ec.SECP256R1())
        ski = x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{name}.example"),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"{name}-ca")])
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=365)).not_valid_after(NOW + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.log_id = hashlib.sha256(_spki(self.rekor_key)).digest()
        self.ct_log_id = hashlib.sha256(_spki(self.ct_key)).digest()

    # ---- the trusted root ----------------------------------------------------------------------------------
    def trusted_root(self) -> bytes:
        def key(k) -> dict:
            return {"rawBytes": _b64(_spki(k)), "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    "validFor": {"start": "2020-01-01T00:00:00Z"}}

        doc = {
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [{"baseUrl": f"https://rekor.{self.name}.example", "hashAlgorithm": "SHA2_256",
                       "publicKey": key(self.rekor_key), "logId": {"keyId": _b64(self.log_id)}}],
            "certificateAuthorities": [{
                "subject": {"organization": f"{self.name}.example", "commonName": f"{self.name}-ca"},
                "uri": f"https://fulcio.{self.name}.example",
                "certChain": {"certificates": [{"rawBytes": _b64(self.ca_cert.public_bytes(serialization.Encoding.DER))}]},
                "validFor": {"start": "2020-01-01T00:00:00Z"}}],
            "ctlogs": [{"baseUrl": f"https://ctfe.{self.name}.example", "hashAlgorithm": "SHA2_256",
                        "publicKey": key(self.ct_key), "logId": {"keyId": _b64(self.ct_log_id)}}],
            "timestampAuthorities": [],
        }
        return json.dumps(doc, indent=1).encode()

    # ---- Fulcio: a short-lived certificate for an identity, with one embedded SCT ----------------------------
    def _leaf(self, key, subject: str, issuer: str) -> x509.Certificate:
        san = x509.RFC822Name(subject) if "@" in subject and "://" not in subject else \
            x509.UniformResourceIdentifier(subject)

        def build(sct_list: bytes | None) -> x509.Certificate:
            b = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.ca_cert.subject)
                 .public_key(key.public_key()).serial_number(self._serial)
                 .not_valid_before(NOW - datetime.timedelta(minutes=5))
                 .not_valid_after(NOW + datetime.timedelta(minutes=10))
                 .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                                              key_cert_sign=False, crl_sign=False, encipher_only=False,
                                              decipher_only=False), critical=True)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
                 .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                                critical=False)
                 .add_extension(x509.SubjectAlternativeName([san]), critical=True)
                 .add_extension(x509.UnrecognizedExtension(OIDC_ISSUER, issuer.encode()), critical=False)
                 .add_extension(x509.UnrecognizedExtension(OIDC_ISSUER_V2, _der_utf8(issuer)), critical=False))
            if sct_list is not None:
                b = b.add_extension(x509.UnrecognizedExtension(SCT_LIST, _der_octet_string(sct_list)), critical=False)
            return b.sign(self.ca_key, hashes.SHA256())

        self._serial = x509.random_serial_number()
        # The SCT signs the TBS without the SCT list (tbs_precertificate_bytes), which does not depend on the list.
        placeholder = build(self._sct_list(b"\x00" * 8, b"\x30\x00"))
        tbs = placeholder.tbs_precertificate_bytes
        issuer_key_hash = hashlib.sha256(_spki(self.ca_key)).digest()
        ts = int(NOW.timestamp() * 1000) - 60_000
        signed = struct.pack("!BBQH", 0, 0, ts, 1) + issuer_key_hash + len(tbs).to_bytes(3, "big") + tbs + b"\x00\x00"
        sig = self.ct_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        return build(self._sct_list(struct.pack("!Q", ts), sig))

    def _sct_list(self, ts: bytes, sig: bytes) -> bytes:
        sct = b"\x00" + self.ct_log_id + ts + b"\x00\x00" + b"\x04\x03" + struct.pack("!H", len(sig)) + sig
        one = struct.pack("!H", len(sct)) + sct
        return struct.pack("!H", len(one)) + one

    # ---- Rekor: a one-leaf log with a signed checkpoint and an inclusion promise -----------------------------
    def _tlog_entry(self, body: bytes, kind: str) -> dict:
        integrated = int(NOW.timestamp())
        leaf = hashlib.sha256(b"\x00" + body).digest()
        origin = f"rekor.{self.name}.example - 1"
        note = f"{origin}\n1\n{_b64(leaf)}\n"
        note_sig = self.rekor_key.sign(note.encode(), ec.ECDSA(hashes.SHA256()))
        checkpoint = note + "\n" + f"\u2014 rekor.{self.name}.example {_b64(self.log_id[:4] + note_sig)}\n"
        set_payload = rfc8785.dumps({"body": _b64(body), "integratedTime": integrated,
                                     "logID": self.log_id.hex(), "logIndex": 0})
        set_sig = self.rekor_key.sign(set_payload, ec.ECDSA(hashes.SHA256()))
        return {"logIndex": "0", "logId": {"keyId": _b64(self.log_id)},
                "kindVersion": {"kind": kind, "version": "0.0.1"}, "integratedTime": str(integrated),
                "inclusionPromise": {"signedEntryTimestamp": _b64(set_sig)},
                "inclusionProof": {"logIndex": "0", "rootHash": _b64(leaf), "treeSize": "1", "hashes": [],
                                   "checkpoint": {"envelope": checkpoint}},
                "canonicalizedBody": _b64(body)}

    # ---- bundles ---------------------------------------------------------------------------------------------
    def dsse_bundle(self, payload: bytes, subject: str, issuer: str, payload_type: str = IN_TOTO) -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf(key, subject, issuer)
        pae = b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type.encode(), len(payload), payload)
        sig = key.sign(pae, ec.ECDSA(hashes.SHA256()))
        cert_pem_b64 = _b64(cert.public_bytes(serialization.Encoding.PEM))
        body = rfc8785.dumps({"apiVersion": "0.0.1", "kind": "dsse", "spec": {
            "envelopeHash": {"algorithm": "sha256", "value": hashlib.sha256(b"envelope").hexdigest()},
            "payloadHash": {"algorithm": "sha256", "value": hashlib.sha256(payload).hexdigest()},
            "signatures": [{"signature": _b64(sig), "verifier": cert_pem_b64}]}})
        bundle = {"mediaType": BUNDLE_V03,
                  "verificationMaterial": {"certificate": {"rawBytes": _b64(cert.public_bytes(serialization.Encoding.DER))},
                                           "tlogEntries": [self._tlog_entry(body, "dsse")]},
                  "dsseEnvelope": {"payload": _b64(payload), "payloadType": payload_type,
                                   "signatures": [{"sig": _b64(sig), "keyid": ""}]}}
        return json.dumps(bundle).encode()

    def message_bundle(self, digest: str, subject: str, issuer: str) -> bytes:
        """A message-signature bundle over the artifact whose sha256 is ``digest`` (here: the manifest itself)."""
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf(key, subject, issuer)
        raw = bytes.fromhex(digest.split(":", 1)[1])
        sig = key.sign(raw, ec.ECDSA(Prehashed(hashes.SHA256())))
        body = rfc8785.dumps({"apiVersion": "0.0.1", "kind": "hashedrekord", "spec": {
            "data": {"hash": {"algorithm": "sha256", "value": raw.hex()}},
            "signature": {"content": _b64(sig),
                          "publicKey": {"content": _b64(cert.public_bytes(serialization.Encoding.PEM))}}}})
        bundle = {"mediaType": BUNDLE_V03,
                  "verificationMaterial": {"certificate": {"rawBytes": _b64(cert.public_bytes(serialization.Encoding.DER))},
                                           "tlogEntries": [self._tlog_entry(body, "hashedrekord")]},
                  "messageSignature": {"messageDigest": {"algorithm": "SHA2_256", "digest": _b64(raw)},
                                       "signature": _b64(sig)}}
        return json.dumps(bundle).encode()

    @staticmethod
    def statement(digest: str, name: str = "model") -> bytes:
        """An in-toto statement whose subject is ``digest`` (what cosign signs for an image in a bundle)."""
        return json.dumps({"_type": "https://in-toto.io/Statement/v1",
                           "subject": [{"name": name, "digest": {"sha256": digest.split(":", 1)[1]}}],
                           "predicateType": "https://sigstore.dev/cosign/sign/v1", "predicate": {}}).encode()
