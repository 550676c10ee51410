"""How often a card agent pings the access server, which both ends must agree on.

The agent pings at this interval to find a server that vanished without
closing the connection; the access server refuses a configuration whose
``min_ping_interval_seconds`` would cut such an agent off. The figure lives
here, below both, so that neither service imports the other for it. Standard
library only: the card agent installs without the servers' dependencies.
"""

from __future__ import annotations

# gRPC sends at most two pings while no data flows, which servers tolerate by
# default, so a long HSM operation on the server side is not punished.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
