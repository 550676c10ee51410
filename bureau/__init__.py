"""The personalization bureau (seed 004, B4): ``cms bureau ...``."""
