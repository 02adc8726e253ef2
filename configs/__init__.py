"""YAML presets, installed as package data: ``--config cpu_tiny`` works from any directory."""
