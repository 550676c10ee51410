"""Card management system: HSM-backed master key installation, replacement and issuance.

The contracts live in ``protos/cms/v1``; their Python code is generated into
``cms.v1`` by ``cms/protogen.py`` (run by setup and by ``scripts/bootstrap``).
"""

import os as _os

__version__ = "0.1.0"

# TLS 1.3 only, for every gRPC server and client in our processes. grpcio has
# no minimum-version setting; gRPC core's TLS 1.2 cipher list is the one knob,
# and it does not govern TLS 1.3 suites. Listing only a PSK suite (no endpoint
# here has a PSK) leaves TLS 1.2 nothing to negotiate, so handshakes are TLS
# 1.3 or fail. Must be set before gRPC initializes; an operator may override.
_os.environ.setdefault("GRPC_SSL_CIPHER_SUITES", "PSK-AES128-CBC-SHA")
