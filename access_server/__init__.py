"""Access server (HSM1): PSD registry, key installation, master key replacement."""
