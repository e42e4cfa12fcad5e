"""Named presets: model sizes now; embodiments, servers and experiments as they land."""

from configs.models import MODEL_PRESETS, get_model_config, list_model_presets
from configs.registry import Registry

__all__ = ["MODEL_PRESETS", "Registry", "get_model_config", "list_model_presets"]
