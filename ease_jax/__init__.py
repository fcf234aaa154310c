"""ease_jax: EASE and LNLN for robust multimodal sentiment analysis with missing modalities.

`ease_jax.losses` is importable on its own (it depends only on jax).
"""

__version__ = "0.1.0"
