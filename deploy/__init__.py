"""How the system runs: the local launcher (cms dev) and Kubernetes manifests.

Everything that only the embedded default needs lives here, above the
services: the launcher (``local.py``), the development PKI (``pki.py``), the
SoftHSM2 tokens (``softhsm.py``), the private pcscd (``pcscd.py``) and the demo
(``demo.py``). It may import any service; no service or ``cms`` module imports it.
"""
