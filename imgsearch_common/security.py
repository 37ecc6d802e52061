"""TLS credentials and bearer tokens: read from files at start, checked by servers, sent by clients."""

import collections
import hmac
import ipaddress
import ssl
from collections.abc import Sequence
from pathlib import Path

import grpc
import structlog

from imgsearch_common.config import ConfigError, EnvReader

log = structlog.get_logger(__name__)

AUTHORIZATION_KEY = "authorization"
_BEARER_SCHEME = "bearer"
# Orchestrators and load balancers probe health without a token; reflection is not exempt.
_EXEMPT_METHOD_PREFIX = "/grpc.health.v1.Health/"

_MISSING_TOKEN = "missing bearer token: send the metadata 'authorization: Bearer <token>'"
_MALFORMED_TOKEN = "the authorization metadata must have the form 'Bearer <token>'"
_INVALID_TOKEN = "invalid bearer token"

_PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"
_PEM_PRIVATE_KEY_END = "PRIVATE KEY-----"
_PEM_ENCRYPTED_MARKERS = ("ENCRYPTED PRIVATE KEY", "Proc-Type: 4,ENCRYPTED")


def optional_path(env: EnvReader, name: str) -> Path | None:
    """Return the path in the setting name, or None when it is unset or empty."""
    value = env.str(name, "")
    return Path(value) if value else None


def token_from_env(env: EnvReader, prefix: str, name: str) -> str:
    """Return the bearer token in PREFIX+NAME or in the file that PREFIX+NAME_FILE names, or "" when neither is set.

    Raises ConfigError when both are set, when the file cannot be read or is empty, or when the
    token is not printable ASCII without spaces (a gRPC metadata value cannot carry it otherwise).
    """
    token = env.str(name, "")
    token_file = optional_path(env, name + "_FILE")
    if token and token_file is not None:
        raise ConfigError(f"set {prefix}{name} or {prefix}{name}_FILE, not both")
    if token_file is not None:
        setting = f"{prefix}{name}_FILE"
        token = read_setting_file(setting, token_file).decode("ascii", errors="replace").strip()
        if not token:
            raise ConfigError(f"{setting}: the token file {token_file} is empty")
        check_token(setting, token)
    elif token:
        check_token(prefix + name, token)
    return token


def check_token(setting: str, token: str) -> None:
    """Raise ConfigError naming setting unless token is printable ASCII without spaces."""
    if not token or not all("!" <= character <= "~" for character in token):
        raise ConfigError(
            f"{setting} must be printable ASCII without spaces or control characters "
            "(the value itself is not shown, because it is a secret)"
        )


def read_setting_file(setting: str, path: Path) -> bytes:
    """Read the file that a setting names. Raises ConfigError naming the setting and path when it cannot."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{setting}: cannot read {path}: {error.strerror or error}") from None


def server_credentials(
    prefix: str, cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """Build the server's TLS credentials from the settings PREFIX+TLS_CERT, _TLS_KEY and _TLS_CLIENT_CA.

    Returns None when neither cert nor key is set (plaintext). A client_ca turns on mutual TLS: every
    client must present a certificate that it signed. Raises ConfigError naming the setting and path
    of a file that is missing, unreadable or not the expected PEM content.
    """
    names = (f"{prefix}TLS_CERT", f"{prefix}TLS_KEY", f"{prefix}TLS_CLIENT_CA")
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError(
                f"{names[2]} is set but {names[0]} and {names[1]} are not; mutual TLS needs the server's own "
                "certificate and key too"
            )
        return None
    certificate_chain, private_key = _read_key_pair(cert, key, names[0], names[1])
    root_certificates = _read_ca(client_ca, names[2]) if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(private_key, certificate_chain)],
        root_certificates=root_certificates,
        require_client_auth=root_certificates is not None,
    )


def channel_credentials(
    ca: Path | None, cert: Path | None, key: Path | None, names: Sequence[str] = ("tls_ca", "tls_cert", "tls_key")
) -> grpc.ChannelCredentials | None:
    """Build a client's TLS credentials, or return None (plaintext) when ca, cert and key are all None.

    ca is the PEM bundle that verifies the server; without it gRPC's default roots do. cert and key,
    given together, are the client's certificate for mutual TLS. names are the settings or flags
    that gave ca, cert and key, for error messages. Raises ConfigError as server_credentials does.
    """
    if ca is None and cert is None and key is None:
        return None
    root_certificates = _read_ca(ca, names[0]) if ca is not None else None
    certificate_chain = private_key = None
    if cert is not None or key is not None:
        certificate_chain, private_key = _read_key_pair(cert, key, names[1], names[2])
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
    )


def open_channel(
    address: str,
    options: list[tuple[str, int]],
    credentials: grpc.ChannelCredentials | None = None,
    token: str = "",
) -> grpc.Channel:
    """Open a channel to address: TLS when credentials are given, and a bearer token on every call when token is."""
    if credentials is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, credentials, options=options)
    if token:
        channel = grpc.intercept_channel(channel, BearerTokenSender(token))
    return channel


def is_local_address(listen: str) -> bool:
    """Return whether a listen address (host:port or unix:path) is reachable from this machine only."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(listen: str, tls: bool, authenticated: bool) -> None:
    """Log a warning when a server listens beyond loopback without TLS, or without authenticating callers."""
    missing = [name for name, present in (("tls", tls), ("authentication", authenticated)) if not present]
    if missing and not is_local_address(listen):
        log.warning(
            "server_exposed_without_protection",
            listen=listen,
            missing=missing,
            hint="set the TLS_CERT and TLS_KEY settings, and AUTH_TOKEN or TLS_CLIENT_CA",
        )


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Abort every RPC without the metadata `authorization: Bearer <token>` with UNAUTHENTICATED.

    Health checks are exempt. The token is compared in constant time and never logged.
    """

    def __init__(self, token: str):
        self._expected = token.encode("ascii")

    def __repr__(self) -> str:
        return "BearerTokenInterceptor(token=<hidden>)"

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_EXEMPT_METHOD_PREFIX):
            return handler
        problem = self._problem(handler_call_details.invocation_metadata)
        if problem is None:
            return handler
        # The canonical RPC line logs the UNAUTHENTICATED status; this line only adds why.
        log.debug("rpc_rejected_unauthenticated", method=method, reason=problem)
        return _rejecting_handler(handler, problem)

    def _problem(self, metadata) -> str | None:
        values = [value for key, value in metadata or () if key == AUTHORIZATION_KEY]
        if not values:
            return _MISSING_TOKEN
        scheme, _, presented = str(values[0]).strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != _BEARER_SCHEME or not presented:
            return _MALFORMED_TOKEN
        if not hmac.compare_digest(presented.encode("utf-8"), self._expected):
            return _INVALID_TOKEN
        return None


class _ClientCallDetails(
    collections.namedtuple(
        "_ClientCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    """The details of one outgoing call, as a client interceptor passes them on."""


class BearerTokenSender(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """A client interceptor that adds `authorization: Bearer <token>` to the metadata of every call.

    It works on plaintext channels too, unlike gRPC's call credentials, so that a token can be used
    on loopback without TLS.
    """

    def __init__(self, token: str):
        self._header = (AUTHORIZATION_KEY, f"Bearer {token}")

    def __repr__(self) -> str:
        return "BearerTokenSender(token=<hidden>)"

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    intercept_unary_stream = intercept_unary_unary
    intercept_stream_unary = intercept_unary_unary
    intercept_stream_stream = intercept_unary_unary

    def _with_token(self, details: grpc.ClientCallDetails) -> _ClientCallDetails:
        metadata = [item for item in details.metadata or () if item[0] != AUTHORIZATION_KEY]
        return _ClientCallDetails(
            details.method,
            details.timeout,
            metadata + [self._header],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """Return handler with its behaviour replaced by one that aborts with UNAUTHENTICATED."""

    def reject(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind) is not None:
            return handler._replace(**{kind: reject})
    raise ValueError(f"the handler has no behaviour: {handler!r}")


def _read_key_pair(cert: Path | None, key: Path | None, cert_name: str, key_name: str) -> tuple[bytes, bytes]:
    """Read a PEM certificate chain and its private key, and check that they match."""
    if cert is None or key is None:
        set_name, unset_name = (cert_name, key_name) if key is None else (key_name, cert_name)
        raise ConfigError(f"{set_name} is set but {unset_name} is not; set both or neither")
    certificate_chain = read_setting_file(cert_name, cert)
    private_key = read_setting_file(key_name, key)
    if _PEM_CERTIFICATE.encode() not in certificate_chain:
        raise ConfigError(f"{cert_name}: {cert} contains no PEM certificate ({_PEM_CERTIFICATE})")
    if _PEM_PRIVATE_KEY_END.encode() not in private_key:
        raise ConfigError(f"{key_name}: {key} contains no PEM private key")
    if any(marker.encode() in private_key for marker in _PEM_ENCRYPTED_MARKERS):
        raise ConfigError(f"{key_name}: {key} is encrypted; gRPC needs an unencrypted private key")

    # OpenSSL's check that the key belongs to the certificate; gRPC would only fail to bind the port.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(
            f"{cert_name} and {key_name}: {cert} and {key} are not a valid certificate chain and its "
            f"private key ({_ssl_reason(error)})"
        ) from None
    return certificate_chain, private_key


def _read_ca(ca: Path, name: str) -> bytes:
    """Read a PEM bundle of CA certificates and check that OpenSSL can load it."""
    root_certificates = read_setting_file(name, ca)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(f"{name}: {ca} is not a PEM bundle of CA certificates ({_ssl_reason(error)})") from None
    return root_certificates


def _ssl_reason(error: OSError) -> str:
    return getattr(error, "reason", None) or str(error)


def _no_password() -> bytes:
    # Without a callback, OpenSSL would prompt on the terminal for an encrypted key's password.
    return b""
