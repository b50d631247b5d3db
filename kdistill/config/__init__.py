"""Configuration: OmegaConf structured configs (schema.py) loaded strictly (loading.py)."""

from kdistill.config.loading import load_config, train_config
from kdistill.config.schema import RunConfig, TrainConfig

__all__ = ["RunConfig", "TrainConfig", "load_config", "train_config"]
