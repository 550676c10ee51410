"""Pure protocol core shared by the server side and the virtual card.

APDUs, BER-TLV, status words, GlobalPlatform commands and SCP03. No I/O, no
PKCS#11: functions take bytes (or a PRF callable where a static key must stay
in an HSM) and return bytes.
"""
