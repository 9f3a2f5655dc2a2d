"""Helpers the tests share. Tests import them from here, never from another test module or a conftest."""
