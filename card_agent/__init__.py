"""Card agent: relays APDU scripts between a PC/SC reader and the access server."""
