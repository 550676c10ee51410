"""Helpers for tests that run real processes: PKI, SoftHSM2 tokens, p11-kit, the proxy.

- ``tests.support.pki``: ``make_pki`` (a development CA and identity
  certificates), ``foreign_identity`` (a certificate from another CA),
  ``expired_identity`` (a certificate of our CA that is no longer valid).
- ``tests.support.softhsm``: ``make_softhsm`` (SoftHSM2 tokens with random
  PINs in 0600 files) and ``P11KitServer`` (the same tokens served through
  ``p11-kit server``, which a test may kill and restart).
- ``tests.support.hsm_proxy``: ``ProxyEnv`` (PKI + tokens + policy + config in
  one directory), ``ProxyProcess`` (``python -m cms.cli hsm-proxy serve`` as a
  subprocess, started with a ready file and waited for until its health is
  SERVING) with per-identity clients, and ``write_endpoints`` for the ``cms``
  client commands.

Other modules here serve other areas (``pcsc``: a private pcscd; ``postgres``:
a throw-away PostgreSQL). Nothing here mocks PKCS#11 or gRPC: tests use them for real.
"""
