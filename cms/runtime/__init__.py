"""Shared service runtime: TLS identities, server scaffolding, config, logs, metrics.

Every server (hsm_proxy, key_mgmt, access_server) is a thin layer over its core
plus this runtime, so they all authenticate, log, report health and shut down
the same way.
"""
