"""Training jobs: what a PyTorchJob may hold (rules) and where one runs (backends: here or on the cluster)."""
