"""rosepo: RosePO post-training of LLM-based sequential recommenders on Ray."""

__version__ = "0.1.0"
