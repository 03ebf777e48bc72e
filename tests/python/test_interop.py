"""Interop of keygate with stock Python OAuth/JWT libraries: authlib as the OAuth client,
PyJWT as the resource-server verifier, and PyJWT-signed tokens of an external issuer that
the sidecar is told to trust."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from joserfc.jwk import ECKey

from conftest import ORDERS_RESOURCE

TIMEOUT = 10


def fetch_with_authlib(keygate, client: str, auth_method: str, scope: str = "orders.read") -> dict:
    session = OAuth2Session(
        client_id=keygate.credential(client, "client_id"),
        client_secret=keygate.credential(client, "client_secret"),
        token_endpoint_auth_method=auth_method,
        scope=scope,
    )
    with session:
        return session.fetch_token(
            keygate.token_url,
            grant_type="client_credentials",
            resource=ORDERS_RESOURCE,
            timeout=TIMEOUT,
        )


def assert_token_response(token: dict, scope: str) -> None:
    assert token["token_type"].lower() == "bearer"
    assert isinstance(token["access_token"], str) and token["access_token"].count(".") == 2
    assert int(token["expires_in"]) > 0
    assert set(token.get("scope", scope).split()) == set(scope.split())


def verify_with_pyjwt(keygate, access_token: str, audience: str = ORDERS_RESOURCE) -> dict:
    jwks = jwt.PyJWKClient(keygate.jwks_url, timeout=TIMEOUT)
    signing_key = jwks.get_signing_key_from_jwt(access_token)
    return jwt.decode(
        access_token,
        signing_key.key,
        algorithms=["ES256"],
        audience=audience,
        issuer=keygate.issuer,
        options={"require": ["exp", "iat", "iss", "aud", "sub"]},
    )


@pytest.fixture(scope="module")
def reporting_token(keygate) -> str:
    token = fetch_with_authlib(keygate, "shop/reporting", "client_secret_basic")
    return token["access_token"]


# 1. authlib client credentials ----------------------------------------------------------


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
def test_authlib_client_credentials(keygate, auth_method):
    token = fetch_with_authlib(keygate, "shop/reporting", auth_method)
    assert_token_response(token, "orders.read")
    claims = verify_with_pyjwt(keygate, token["access_token"])
    assert claims["client_id"] == keygate.credential("shop/reporting", "client_id")


def test_authlib_client_credentials_two_scopes(keygate):
    token = fetch_with_authlib(
        keygate, "shop/billing", "client_secret_post", scope="orders.read orders.write"
    )
    assert_token_response(token, "orders.read orders.write")
    claims = verify_with_pyjwt(keygate, token["access_token"])
    assert set(claims["scope"].split()) == {"orders.read", "orders.write"}


def test_authlib_metadata_matches(keygate):
    meta = requests.get(
        f"{keygate.issuer}/.well-known/oauth-authorization-server", timeout=TIMEOUT
    ).json()
    assert meta["issuer"] == keygate.issuer
    assert meta["token_endpoint"] == keygate.token_url
    assert meta["jwks_uri"] == keygate.jwks_url
    methods = set(meta.get("token_endpoint_auth_methods_supported", []))
    assert {"client_secret_basic", "client_secret_post", "private_key_jwt"} <= methods


def test_authlib_wrong_secret_is_invalid_client(keygate):
    from authlib.integrations.base_client.errors import OAuthError

    session = OAuth2Session(
        client_id=keygate.credential("shop/reporting", "client_id"),
        client_secret="not-the-secret",
        token_endpoint_auth_method="client_secret_basic",
    )
    with session, pytest.raises(OAuthError) as err:
        session.fetch_token(
            keygate.token_url, grant_type="client_credentials",
            resource=ORDERS_RESOURCE, timeout=TIMEOUT,
        )
    assert err.value.error == "invalid_client"


def test_token_error_responses(keygate):
    """RFC 6749 5.1/5.2 and RFC 8707 error shapes as a plain HTTP client sees them."""
    auth = (
        keygate.credential("shop/reporting", "client_id"),
        keygate.credential("shop/reporting", "client_secret"),
    )

    def post(data, auth=auth):
        r = requests.post(keygate.token_url, data=data, auth=auth, timeout=TIMEOUT)
        assert r.headers.get("Cache-Control") == "no-store"
        return r

    r = post({"grant_type": "client_credentials", "resource": ORDERS_RESOURCE},
             auth=(auth[0], "wrong"))
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    assert r.headers.get("WWW-Authenticate", "").startswith("Basic")

    r = post({"grant_type": "password"})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"

    r = post({"grant_type": "client_credentials", "resource": "https://unknown.shop.svc"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_target"

    r = post({"grant_type": "client_credentials", "scope": "orders.write",
              "resource": ORDERS_RESOURCE})
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"


# 2. PyJWT verification -----------------------------------------------------------------


def test_pyjwt_verifies_access_token(keygate, reporting_token):
    header = jwt.get_unverified_header(reporting_token)
    assert header["typ"] == "at+jwt"  # RFC 9068 section 2.1
    assert header["alg"] == "ES256"
    assert header.get("kid")

    claims = verify_with_pyjwt(keygate, reporting_token)
    client_id = keygate.credential("shop/reporting", "client_id")
    assert claims["iss"] == keygate.issuer
    assert claims["aud"] in (ORDERS_RESOURCE, [ORDERS_RESOURCE])
    assert claims["client_id"] == client_id
    assert claims["sub"]
    assert claims["jti"]
    assert claims["scope"].split() == ["orders.read"]
    assert claims["iat"] <= time.time() + 5
    # shop/reporting has tokenLifetime: 15m
    assert claims["exp"] - claims["iat"] == 15 * 60


def test_pyjwt_rejects_wrong_audience(keygate, reporting_token):
    with pytest.raises(jwt.InvalidAudienceError):
        verify_with_pyjwt(keygate, reporting_token, audience="https://other.shop.svc")


def test_pyjwt_rejects_wrong_issuer(keygate, reporting_token):
    jwks = jwt.PyJWKClient(keygate.jwks_url, timeout=TIMEOUT)
    key = jwks.get_signing_key_from_jwt(reporting_token).key
    with pytest.raises(jwt.InvalidIssuerError):
        jwt.decode(
            reporting_token, key, algorithms=["ES256"],
            audience=ORDERS_RESOURCE, issuer="http://evil.example",
        )


def test_jwks_keys_are_public_es256(keygate):
    jwks = requests.get(keygate.jwks_url, timeout=TIMEOUT).json()
    assert jwks["keys"]
    for key in jwks["keys"]:
        assert key["kty"] == "EC" and key["crv"] == "P-256"
        assert key.get("kid")
        assert "d" not in key  # never the private part
        jwt.PyJWK(key, algorithm="ES256")  # parses as a usable key


# 3. The sidecar with a keygate token -----------------------------------------------------


def test_sidecar_allows_read(keygate, reporting_token):
    r = requests.get(
        f"{keygate.sidecar}/orders/1",
        headers={"Authorization": f"Bearer {reporting_token}"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["path"] == "/orders/1"
    identity = body["identity"]
    assert identity["x-keygate-client-id"] == keygate.credential("shop/reporting", "client_id")
    assert "orders.read" in identity.get("x-keygate-scopes", "").split()


def test_sidecar_denies_write_with_insufficient_scope(keygate, reporting_token):
    r = requests.post(
        f"{keygate.sidecar}/orders",
        headers={"Authorization": f"Bearer {reporting_token}"},
        json={"item": "x"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 403, r.text
    www = r.headers.get("WWW-Authenticate", "")
    assert www.startswith("Bearer"), www
    assert 'error="insufficient_scope"' in www, www


def test_sidecar_without_token_is_401(keygate):
    r = requests.get(f"{keygate.sidecar}/orders/1", timeout=TIMEOUT)
    assert r.status_code == 401, r.text
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), r.headers


def test_sidecar_public_health(keygate):
    r = requests.get(f"{keygate.sidecar}/healthz", timeout=TIMEOUT)
    assert r.status_code == 200, r.text


# 4. private_key_jwt ----------------------------------------------------------------------


def _assert_warehouse_token(keygate, token: dict) -> None:
    assert_token_response(token, "orders.read")
    claims = verify_with_pyjwt(keygate, token["access_token"])
    assert claims["client_id"] == keygate.credential("shop/warehouse", "client_id")
    r = requests.get(
        f"{keygate.sidecar}/orders/1",
        headers={"Authorization": f"Bearer {token['access_token']}"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text


def test_private_key_jwt_with_authlib(keygate):
    client_id = keygate.credential("shop/warehouse", "client_id")
    # authlib imports a PEM string as an RSA key; hand it the EC key instead.
    key = ECKey.import_key(keygate.credential("shop/warehouse", "private_key.pem"))
    session = OAuth2Session(
        client_id=client_id,
        client_secret=key,
        token_endpoint_auth_method="private_key_jwt",
        scope="orders.read",
    )
    session.register_client_auth_method(PrivateKeyJWT(keygate.token_url, alg="ES256"))
    with session:
        token = session.fetch_token(
            keygate.token_url,
            grant_type="client_credentials",
            resource=ORDERS_RESOURCE,
            timeout=TIMEOUT,
        )
    _assert_warehouse_token(keygate, token)


def test_private_key_jwt_with_pyjwt_and_requests(keygate):
    client_id = keygate.credential("shop/warehouse", "client_id")
    pem = keygate.credential("shop/warehouse", "private_key.pem")
    now = int(time.time())
    assertion = jwt.encode(
        {
            "iss": client_id,
            "sub": client_id,
            "aud": keygate.token_url,
            "iat": now,
            "exp": now + 120,
            "jti": str(uuid.uuid4()),
        },
        pem,
        algorithm="ES256",
    )
    r = requests.post(
        keygate.token_url,
        data={
            "grant_type": "client_credentials",
            "scope": "orders.read",
            "resource": ORDERS_RESOURCE,
            "client_id": client_id,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    _assert_warehouse_token(keygate, r.json())


def test_private_key_jwt_signed_by_other_key_is_rejected(keygate):
    client_id = keygate.credential("shop/warehouse", "client_id")
    other = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    assertion = jwt.encode(
        {"iss": client_id, "sub": client_id, "aud": keygate.token_url,
         "iat": now, "exp": now + 120, "jti": str(uuid.uuid4())},
        other,
        algorithm="ES256",
    )
    r = requests.post(
        keygate.token_url,
        data={
            "grant_type": "client_credentials",
            "resource": ORDERS_RESOURCE,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
        timeout=TIMEOUT,
    )
    assert r.status_code in (400, 401), r.text  # RFC 6749 5.2
    assert r.json()["error"] == "invalid_client"


# 5. External issuer trusted by the sidecar -----------------------------------------------

EXTERNAL_ISSUER = "https://idp.python.test"
EXTERNAL_KID = "py-key-1"


class _JwksServer:
    """Serves one JWKS at /jwks.json on 127.0.0.1 from a background thread."""

    def __init__(self, jwks: dict):
        body = json.dumps(jwks).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path.split("?")[0] != "/jwks.json":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _public_jwk(private_key, kid: str) -> dict:
    jwk = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    jwk.update({"kid": kid, "alg": "ES256", "use": "sig"})
    return jwk


def _trust_issuer(jwks_url: str):
    def customize(config_dir):
        policy = config_dir / "orders-policy.yaml"
        text = policy.read_text()
        issuers = (
            "spec:\n"
            "  issuers:\n"
            f"    - issuer: {EXTERNAL_ISSUER}\n"
            f"      jwksUri: {jwks_url}\n"
        )
        assert text.count("\nspec:\n") == 1
        policy.write_text(text.replace("\nspec:\n", "\n" + issuers, 1))

    return customize


@pytest.fixture(scope="module")
def external_idp():
    key = ec.generate_private_key(ec.SECP256R1())
    with _JwksServer({"keys": [_public_jwk(key, EXTERNAL_KID)]}) as server:
        yield key, server.url


@pytest.fixture
def keygate_with_idp(keygate_factory, external_idp):
    _, jwks_url = external_idp
    return keygate_factory(_trust_issuer(jwks_url))


def _external_token(key, **overrides) -> str:
    now = int(time.time())
    claims = {
        "iss": EXTERNAL_ISSUER,
        "sub": "py-client",
        "aud": ORDERS_RESOURCE,
        "iat": now,
        "exp": now + 300,
        "scope": "orders.read",
        "client_id": "py-client",
        "jti": str(uuid.uuid4()),
    }
    claims.update(overrides)
    return jwt.encode(
        claims, key, algorithm="ES256", headers={"kid": EXTERNAL_KID, "typ": "at+jwt"}
    )


def _get_order(dev, token: str) -> requests.Response:
    return requests.get(
        f"{dev.sidecar}/orders/1",
        headers={"Authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    )


def test_external_issuer_token_accepted(keygate_with_idp, external_idp):
    key, _ = external_idp
    r = _get_order(keygate_with_idp, _external_token(key))
    assert r.status_code == 200, r.text
    identity = r.json()["identity"]
    assert identity["x-keygate-client-id"] == "py-client"
    assert identity["x-keygate-auth-method"] == "external_token"
    assert identity.get("x-keygate-scopes", "").split() == ["orders.read"]


def test_external_issuer_scope_enforced(keygate_with_idp, external_idp):
    key, _ = external_idp
    r = requests.post(
        f"{keygate_with_idp.sidecar}/orders",
        headers={"Authorization": f"Bearer {_external_token(key)}"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 403, r.text
    assert 'error="insufficient_scope"' in r.headers.get("WWW-Authenticate", "")


def test_external_issuer_wrong_key_same_kid_rejected(keygate_with_idp, external_idp):
    key, _ = external_idp
    # Warm the JWKS cache with a good token first, so the bad one is checked against it.
    assert _get_order(keygate_with_idp, _external_token(key)).status_code == 200
    forged = _external_token(ec.generate_private_key(ec.SECP256R1()))
    r = _get_order(keygate_with_idp, forged)
    assert r.status_code == 401, r.text
    assert 'error="invalid_token"' in r.headers.get("WWW-Authenticate", ""), r.headers


def test_external_issuer_expired_rejected(keygate_with_idp, external_idp):
    key, _ = external_idp
    now = int(time.time())
    r = _get_order(keygate_with_idp, _external_token(key, iat=now - 3600, exp=now - 600))
    assert r.status_code == 401, r.text
    assert 'error="invalid_token"' in r.headers.get("WWW-Authenticate", ""), r.headers


def test_external_issuer_wrong_audience_rejected(keygate_with_idp, external_idp):
    key, _ = external_idp
    r = _get_order(keygate_with_idp, _external_token(key, aud="https://other.shop.svc"))
    assert r.status_code == 401, r.text


def test_untrusted_issuer_rejected(keygate_with_idp, external_idp):
    key, _ = external_idp
    r = _get_order(keygate_with_idp, _external_token(key, iss="https://evil.python.test"))
    assert r.status_code == 401, r.text
