"""TLS, mutual TLS and API keys on a real server over the tiny model.

Certificates are made here with ``cryptography`` (a CA, a server certificate
for 127.0.0.1 / localhost, a client certificate, and a stranger CA with its
own client). Rejections must carry the right codes: a handshake that fails
is UNAVAILABLE, a missing or wrong key UNAUTHENTICATED.
"""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine.async_engine import AsyncEngine
from pagedgen_client import PagedgenClientError, RetryPolicy
from service.server import ServerOptions
from tests.service.conftest import ServerThread, tiny_engine_args

pytestmark = pytest.mark.timeout(60)

NO_RETRY = RetryPolicy(max_attempts=1)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key, issuer: x509.Name | None, issuer_key, *, is_ca: bool = False,
                 server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if not is_ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _authority(name: str, tmp_path, *, with_server: bool) -> dict[str, str]:
    """A CA, a client certificate it signed and, if asked, a server one; PEM file paths."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(name, ca_key, None, ca_key, is_ca=True)
    files = {"ca": ca.public_bytes(serialization.Encoding.PEM)}
    for role in ("client", "server") if with_server else ("client",):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"{name}-{role}", key, ca.subject, ca_key, server=role == "server")
        files[role] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{role}_key"] = _pem_key(key)
    paths = {}
    for what, data in files.items():
        path = tmp_path / f"{name}-{what}.pem"
        path.write_bytes(data)
        paths[what] = str(path)
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    return {"ours": _authority("pagedgen-test-ca", d, with_server=True),
            "stranger": _authority("stranger-ca", d, with_server=False)}


@pytest.fixture
def serve(tiny_model_dir):
    """Start real servers (each over its own engine) with the given options."""
    started = []

    def start(**options) -> ServerThread:
        engine = AsyncEngine(tiny_engine_args(tiny_model_dir, num_kv_blocks=64))
        server = ServerThread(engine, ServerOptions(port=0, **options))
        started.append((server, engine))
        return server

    yield start
    for server, engine in started:
        server.stop(grace=0.5)
        engine.shutdown()


def _generate(client) -> str:
    return client.generate_text("The cat watches", max_tokens=4, ignore_eos=True, temperature=0, timeout=10)


def _rejected(client) -> grpc.StatusCode:
    with pytest.raises(PagedgenClientError) as info:
        _generate(client)
    return info.value.code


def test_tls_serves_verified_clients_and_refuses_plaintext(serve, pki):
    ours = pki["ours"]
    server = serve(tls_cert_file=ours["server"], tls_key_file=ours["server_key"])
    with server.client(root_certificates=ours["ca"]) as client:
        assert len(_generate(client)) > 0
        assert client.health() == "SERVING"
    with server.client(retry=NO_RETRY) as plaintext:
        assert _rejected(plaintext) == grpc.StatusCode.UNAVAILABLE
    with server.client(root_certificates=pki["stranger"]["ca"], retry=NO_RETRY) as distrusting:
        assert _rejected(distrusting) == grpc.StatusCode.UNAVAILABLE      # the server is not who it claims


def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(serve, pki):
    ours, stranger = pki["ours"], pki["stranger"]
    server = serve(tls_cert_file=ours["server"], tls_key_file=ours["server_key"], tls_client_ca_file=ours["ca"])
    with server.client(root_certificates=ours["ca"], private_key=ours["client_key"],
                       certificate_chain=ours["client"]) as member:
        assert len(_generate(member)) > 0
    with server.client(root_certificates=ours["ca"], retry=NO_RETRY) as anonymous:
        assert _rejected(anonymous) == grpc.StatusCode.UNAVAILABLE
    with server.client(root_certificates=ours["ca"], private_key=stranger["client_key"],
                       certificate_chain=stranger["client"], retry=NO_RETRY) as impostor:
        assert _rejected(impostor) == grpc.StatusCode.UNAVAILABLE
    with server.client(retry=NO_RETRY) as plaintext:
        assert _rejected(plaintext) == grpc.StatusCode.UNAVAILABLE


def test_api_key_over_tls(serve, pki):
    ours = pki["ours"]
    server = serve(tls_cert_file=ours["server"], tls_key_file=ours["server_key"], api_key="k3y-for-tests")
    tls = dict(root_certificates=ours["ca"], retry=NO_RETRY)
    with server.client(**tls) as missing, server.client(api_key="wrong", **tls) as wrong, \
            server.client(api_key="k3y-for-tests", **tls) as member:
        assert missing.health() == "SERVING"                               # probes need no key
        assert _rejected(missing) == grpc.StatusCode.UNAUTHENTICATED
        assert _rejected(wrong) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(PagedgenClientError) as info:
            wrong.stats()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and "API key" in info.value.message
        assert len(_generate(member)) > 0
        assert member.stats().num_running == 0
    # Undecodable bytes without the key are refused for the key, not parsed.
    channel = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(open(ours["ca"], "rb").read()))
    with channel:
        with pytest.raises(grpc.RpcError) as raw:
            list(channel.unary_stream("/pagedgen.v1.Generate/Generate")(b"\xff\xff", timeout=5))
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
