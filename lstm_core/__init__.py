"""LSTM Studio's core: data, models, training, evaluation, tuning and run directories (no Streamlit here)."""
from .config import PRESETS, ConfigError, TrainConfig, preset

__all__ = ["PRESETS", "ConfigError", "TrainConfig", "preset"]
