"""Interop with other ecosystems: Hugging Face export and import."""
