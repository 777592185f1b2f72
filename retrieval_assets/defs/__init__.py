"""Dagster definitions only, one folder per stage of the data's walk; loaded by definitions.py."""
