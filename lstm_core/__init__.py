"""LSTM Studio's core: data, models, training, evaluation, tuning and run directories (no Streamlit here)."""
from pathlib import Path

from .config import PRESETS, ConfigError, TrainConfig, preset

# The checkout this package runs from: background processes start there, and the benchmarks and tests find
# the app's scripts from it.
REPO = Path(__file__).resolve().parent.parent

__all__ = ["PRESETS", "REPO", "ConfigError", "TrainConfig", "preset"]
