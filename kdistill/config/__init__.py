"""Configuration: the schema (schema.py, whose comments are the keys' help), loaded strictly (loading.py);
built-in recipes by name and `kdistill config`'s annotated YAML (describe.py)."""

from kdistill.config.loading import load_config, train_config
from kdistill.config.schema import RunConfig, TrainConfig

__all__ = ["RunConfig", "TrainConfig", "load_config", "train_config"]
