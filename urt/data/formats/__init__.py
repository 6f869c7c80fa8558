"""Readers for the raw data formats `urt data convert` understands; see urt.data.convert."""
