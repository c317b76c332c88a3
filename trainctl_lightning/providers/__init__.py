"""Providers: where instances come from. One module per provider, imported only when used.

``get_provider("local")`` is the embedded default (this machine, no cloud account);
``get_provider("aws")`` needs boto3 (installed with trainctl-lightning).
"""

from __future__ import annotations

import importlib
from typing import Any

from trainctl_lightning.errors import ConfigError
from trainctl_lightning.providers.api import (
    AgentLaunch,
    CreatePlan,
    Instance,
    InstanceSpec,
    InstanceState,
    Provider,
    standard_tags,
)

#: Provider name -> "module:Class", imported lazily so that no cloud SDK loads unless used.
REGISTRY: dict[str, str] = {
    "local": "trainctl_lightning.providers.local:LocalProvider",
    "aws": "trainctl_lightning.providers.aws:AWSProvider",
}
DEFAULT_PROVIDER = "local"


def provider_names() -> list[str]:
    return sorted(REGISTRY)


def get_provider(name: str | None = None, **options: Any) -> Provider:
    """The provider called ``name`` (default ``local``), constructed with ``options``.

    Raises:
        ConfigError: no provider has that name, or its module cannot be imported.
    """
    name = name or DEFAULT_PROVIDER
    target = REGISTRY.get(name)
    if target is None:
        raise ConfigError(f"unknown provider {name!r}: choose one of {', '.join(provider_names())}")
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"the {name} provider cannot be loaded ({exc}); reinstall trainctl-lightning") from None
    return getattr(module, cls_name)(**options)


__all__ = [
    "DEFAULT_PROVIDER",
    "REGISTRY",
    "AgentLaunch",
    "CreatePlan",
    "Instance",
    "InstanceSpec",
    "InstanceState",
    "Provider",
    "get_provider",
    "provider_names",
    "standard_tags",
]
