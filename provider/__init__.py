"""The provider system (seed 004, B1-B2): initializes blank cards and writes their packs.

``cms provider ...`` acts as the identity ``provider``: it drives each card
through the HSM proxy's CardKeys service (the card's transport keys never
leave the HSM), has the card's keys certified by the provider root in the
HSM (ProviderCa), and writes the pack file the issuer imports, signed in
the HSM and optionally encrypted to the issuer.
"""
