"""hsm_proxy: the only process that loads a PKCS#11 module.

It owns sessions and logins, serves the ``cms.v1.Hsm`` contract over mutual
TLS, authorizes each call by the caller's identity against a policy and writes
a hash-chained audit record for every operation.
"""
