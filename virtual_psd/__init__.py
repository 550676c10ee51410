"""Virtual PSD: a GlobalPlatform card emulator for tests and demos.

* :class:`virtual_psd.card.VirtualCard`: the card in process
  (``power_on``/``power_off``/``reset``, ``atr``, ``transmit(apdu) -> response``),
  an application registry keyed by AID, all-or-nothing commands over a
  persistent state (:mod:`virtual_psd.state`).
* :mod:`virtual_psd.isd`: the issuer security domain (SCP03, key sets, the
  security executive policy of DESIGN.md §3, default or strict).
* :mod:`virtual_psd.faults`: fault plans (``power-loss@K``, ``tear@K``,
  ``kill@K:PID[:SIG]``, in-process hooks).
* :mod:`virtual_psd.vpcd`: the card as a vsmartcard vpcd client
  (``cms card virtual``).
* :mod:`virtual_psd.factory`: factory state (``cms card init``; ``--strict``
  for a card that manages MK sets only through its MKRK channel).
* :mod:`virtual_psd.agent_source`: the card as a card agent's transport and
  card source (``cms card-agent --virtual``, tests, the demo).
"""
