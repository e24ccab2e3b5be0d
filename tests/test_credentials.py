"""v2p.credentials: the secret and TLS rules any remote end uses (PVE today, a vCenter source next), in
that user's own words; PVE's behaviour through them is tests/test_secrets.py's and test_proxmox_target.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from v2p import credentials
from v2p.options import OptionError


def test_a_secrets_file_is_read_in_its_users_words(tmp_path: Path) -> None:
    path = tmp_path / "vcenter-secrets"
    path.write_text("# mine\npassword = s3cret\n")
    path.chmod(0o644)
    with pytest.raises(OptionError, match="the vCenter secrets file is readable by others"):
        credentials.read_secrets_file(path, what="vCenter secrets file", service="vCenter")
    path.chmod(0o600)
    assert credentials.read_secrets_file(path, what="vCenter secrets file") == {"password": "s3cret"}
    env = {"V2P_VC_PASSWORD": "from-env\n"}
    assert credentials.find_secret(env, "V2P_VC_PASSWORD", "password", path, named=False, what="x") == "from-env"
    assert credentials.find_secret({}, "V2P_VC_PASSWORD", "password", path, named=False, what="x") == "s3cret"
    missing = tmp_path / "none"
    assert credentials.find_secret({}, "V2P_VC_PASSWORD", "password", missing, named=False, what="x") is None
    with pytest.raises(OptionError, match="cannot read the vCenter secrets file"):
        credentials.find_secret({}, "V2P_VC_PASSWORD", "password", missing, named=True, what="vCenter secrets file")
    with pytest.raises(OptionError) as caught:
        credentials.clean_secret("a\nb", "$V2P_VC_PASSWORD", token=False, service="vCenter")
    assert "a\nb" not in str(caught.value) and caught.value.hint.startswith("a vCenter secret is")


def test_a_pin_is_one_certificate_and_insecure_only_when_asked() -> None:
    pin = credentials.fingerprint("AB:" * 31 + "AB", "the vCenter", hint="see the vCenter's certificate")
    assert pin == "ab" * 32
    with pytest.raises(OptionError, match="is not a SHA-256"):
        credentials.fingerprint("ab" * 31, "the vCenter", hint="")
    session = credentials.pinned(requests.Session(), "https://vc:443/", pin, insecure=False)
    adapter = session.get_adapter("https://vc:443/sdk")
    assert isinstance(adapter, credentials.FingerprintAdapter) and adapter.fingerprint == pin
    plain = credentials.pinned(requests.Session(), "https://vc:443/", pin, insecure=True)
    assert not isinstance(plain.get_adapter("https://vc:443/sdk"), credentials.FingerprintAdapter)
    assert credentials.verifies(fingerprint=None, insecure=False)
    assert not credentials.verifies(fingerprint=pin, insecure=False)
    assert not credentials.verifies(fingerprint=None, insecure=True)


def test_a_secret_goes_only_to_the_endpoint_it_was_configured_for() -> None:
    here = credentials.Endpoint.of({"host": "VC.example.com", "fingerprint": "AB" * 32}, 443)
    assert here == credentials.Endpoint("vc.example.com", "443", False, "ab" * 32)
    assert here != credentials.Endpoint.of({"host": "vc.example.com", "port": "8443", "fingerprint": "ab" * 32}, 443)
    assert credentials.tls_refusal(requests.exceptions.SSLError("Fingerprints did not match")) == "pin"
    assert credentials.tls_refusal(OSError("certificate verify failed")) == "untrusted"
    assert credentials.tls_refusal(OSError("connection refused")) is None
