"""Test doubles for services the machines cannot reach (see each module's docstring)."""
