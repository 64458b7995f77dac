"""Policy settings by subject, one class each, joined into ``settings.Settings``."""
