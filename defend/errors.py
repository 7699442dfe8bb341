"""The error every user-facing refusal raises (re-exported by defend.config, where callers import it from)."""


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""
