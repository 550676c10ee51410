"""Pure protocol core shared by the server side and the virtual card.

APDUs, BER-TLV, status words, GlobalPlatform commands and SCP03. No I/O, no
PKCS#11: functions take bytes (or a PRF callable where a static key must stay
in an HSM) and return bytes.

Modules:

* :mod:`cardcore.apdu`: command/response APDUs (short, extended, chaining).
* :mod:`cardcore.sw`: status words (:class:`~cardcore.sw.SW`) and their meanings.
* :mod:`cardcore.ins`: instruction bytes of the commands (:class:`~cardcore.ins.Ins`).
* :mod:`cardcore.tlv`: strict BER-TLV.
* :mod:`cardcore.scp03`: SCP03 KDF, cryptograms, session keys, host channel
  (:func:`~cardcore.scp03.open_host_channel`, :class:`~cardcore.scp03.HostChannel`
  with checkpoints for pre-wrapped scripts) and card channel.
* :mod:`cardcore.gp`: GlobalPlatform command builders and parsers.
* :mod:`cardcore.kcv`: GlobalPlatform AES key check values.
* :mod:`cardcore.diversify`: per-card key derivation reproducible in an HSM.
* :mod:`cardcore.psd`: this system's PSD conventions (key set roles by KVN,
  :class:`~cardcore.psd.Kvn`; PSD id).
* :mod:`cardcore.processor`: APDU processors that wrap one another between a
  host and a card (formatting, response chaining, command chaining, secure
  messaging); free of dependencies, so the card agent uses them too.
* :mod:`cardcore.host`: a small host driver over a ``transmit`` callable.
* :mod:`cardcore.link`: the link to one card (``CardTransport`` and its two
  errors), shared by the card agent and the virtual card.
"""
