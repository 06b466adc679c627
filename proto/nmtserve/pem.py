"""Whether PEM files will do for gRPC's TLS, asked of OpenSSL through the ssl module: gRPC reads them only as it binds
a port or connects, and then says "cannot bind" or fails each connection, not which file is wrong.

The server's and the client's settings both use these, each naming a file by its own setting.
"""

from __future__ import annotations

import os
import ssl

FilePath = str | os.PathLike[str]  # as the ssl module takes file names


class _Encrypted(Exception):
    """The key file asked for a passphrase."""


def _refuse_passphrase() -> str:
    raise _Encrypted  # OpenSSL would otherwise prompt on the terminal for it


def certificate_problems(name: str, path: FilePath) -> list[str]:
    """Why the file named `name` cannot be used as PEM certificates (empty where it can)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError:
        pass  # nothing it could read: no PEM certificate, as below
    except OSError as error:
        return [f"{name} {path}: cannot be read: {error.strerror}"]
    if not context.cert_store_stats()["x509"]:  # also where the file held only revocation lists
        return [f"{name} {path}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)"]
    return []


def key_problems(cert_name: str, cert: FilePath, key_name: str, key: FilePath) -> list[str]:
    """Why the key file cannot be used with the certificate chain, a file of PEM certificates (empty where it can)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=_refuse_passphrase)
    except _Encrypted:
        return [f"{key_name} {key}: encrypted, and gRPC takes no passphrase (decrypt it: openssl pkey -in {key} -out "
                "plain.key)"]
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            return [f"{key_name} {key}: not the private key of {cert_name} {cert}"]
        return [f"{key_name} {key}: holds no PEM private key"]
    except OSError as error:
        return [f"{key_name} {key}: cannot be read: {error.strerror}"]
    return []


def chain_problems(cert_name: str, cert: FilePath, key_name: str, key: FilePath) -> list[str]:
    """Why a certificate chain and its private key cannot be used together (empty where they can)."""
    return certificate_problems(cert_name, cert) or key_problems(cert_name, cert, key_name, key)
