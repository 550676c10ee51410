"""How the system runs: the local launcher (cms dev) and Kubernetes manifests."""
