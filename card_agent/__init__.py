"""Card agent: relays APDU scripts between a PC/SC reader and the access server.

Layers, each usable without the ones above it:

- ``card_agent.transport``: the ``CardTransport`` protocol and its two errors
  (``cardcore.link``'s); ``card_agent.pcsc`` (pyscard) implements it, and so
  does the in-process virtual card (``virtual_psd.agent_source``, which
  ``--virtual`` finds by name: the agent does not import it).
- ``card_agent.runner``: runs one ApduScript on a transport (no networking).
- ``card_agent.session``: one CardChannel.Connect stream per card contact,
  with an injectable transport and gRPC channel (blocking and asyncio forms).
- ``card_agent.agent``: the loop: reader, card insertion and removal, retries.
- ``card_agent.cli``: ``cms card-agent``.

Only grpcio, protobuf and (for readers) pyscard are needed: nothing here may
import a server dependency.
"""

AGENT_VERSION = "0.1.0"
