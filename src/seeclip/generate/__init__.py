"""Pseudo-unknown generators: semantic-guided diffusion in feature space (and image space)."""
