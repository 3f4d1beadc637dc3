"""What every model shares: leaf layers (Dense, norms, activations, initialisers, the shape legend),
attention, the token cross-entropy (chunked), tokenizers, WordNet's lemmatiser, reading training-run
checkpoints, the model-config base, logical sharding rules with the mesh helpers, and the command lines'
error handling. Imports only kernels and third-party packages; models build on it."""
