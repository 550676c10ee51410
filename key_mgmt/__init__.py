"""Key management server (HSM2): key blocks, versions, ceremonies, transfer to HSM1."""
