"""Definitions shared by every layer: Hyper-V (hvdef) and the platform (platform)."""
