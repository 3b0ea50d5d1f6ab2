"""Model configs (``models/``), training recipes (``train/``) and label sets (``labels/``).

Installed as the package ``vtr_configs``; ``retrieval.models.registry.config_root()`` finds it."""
