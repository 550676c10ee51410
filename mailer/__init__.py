"""The mailing house (seed 004, B4): ``cms mailer ...``, PIN and PUK letters."""
