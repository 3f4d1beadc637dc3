"""What every model shares: leaf layers (Dense, norms, activations, initialisers), attention, the
token cross-entropy, tree-path helpers, the model-config base, and logical sharding rules with the
mesh helpers. Imports only kernels and third-party packages; models build on it."""
