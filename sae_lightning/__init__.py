"""sae-lightning: train sparse autoencoders on transformer activations (see docs/design.md)."""
