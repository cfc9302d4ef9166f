"""rosepo: RosePO post-training of LLM-based sequential recommenders on Ray.

The Python API of a trained model is `Recommender` (``from rosepo import Recommender``), loaded on
first use so that ``import rosepo`` (and the CLI) stays light.
"""

__version__ = "0.1.0"
__all__ = ["Recommender", "__version__"]


def __getattr__(name: str):
    if name == "Recommender":
        from rosepo.experiments.recommend import Recommender

        return Recommender
    raise AttributeError(f"module 'rosepo' has no attribute {name!r}")
