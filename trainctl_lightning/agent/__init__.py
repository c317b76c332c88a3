"""The trainctl agent: what runs on every instance (``python -m trainctl_lightning.agent``)."""
