"""Integrations with third-party libraries; each module imports its library only when used."""
