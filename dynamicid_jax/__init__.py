"""DynamicID in JAX/Flax: identity-preserving, multi-person, editable generation on SD1.5."""

__version__ = "0.1.0"
