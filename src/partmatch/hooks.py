"""Project hooks."""

from __future__ import annotations

import logging

from kedro.framework.hooks import hook_impl

from partmatch import config

logger = logging.getLogger(__name__)


class ParameterValidationHook:
    """Validate every parameter section as soon as the context exists, before any run or node starts."""

    @hook_impl
    def after_context_created(self, context) -> None:
        """Fail fast with the key's dotted name when a parameter has a wrong type or an impossible value."""
        config.validate_all(context.params)
        logger.debug("Parameters validated: %s", sorted(config.SECTIONS))
