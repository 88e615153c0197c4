"""The config schema (every field once) and the loading of config and sweep files."""
