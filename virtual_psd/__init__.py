"""Virtual PSD: a GlobalPlatform card emulator for tests and demos.

* :class:`virtual_psd.card.VirtualCard`: the card in process
  (``power_on``/``power_off``/``reset``, ``atr``, ``transmit(apdu) -> response``),
  a container that selects applets by AID and routes commands to the
  selected one, all or nothing over a persistent state.
* :mod:`virtual_psd.applet`: what an applet is and what it may touch while it
  processes a command.
* :mod:`virtual_psd.state`: the state file, one section per applet.
* :mod:`virtual_psd.isd`: the issuer security domain, one applet (SCP03, key
  sets, the security executive policy of docs/flows.md, flow A, default or
  strict).
* :mod:`virtual_psd.faults`: fault plans (``power-loss@K``, ``tear@K``,
  ``kill@K:PID[:SIG]``, in-process hooks).
* :mod:`virtual_psd.vpcd`: the card as a vsmartcard vpcd client
  (``cms card virtual``).
* :mod:`virtual_psd.factory`: factory state (``cms card init``; ``--strict``
  for a card that manages MK sets only through its MKRK channel).
* :mod:`virtual_psd.agent_source`: the card as a card agent's transport and
  card source (``cms card-agent --virtual``, tests, the demo).
"""
