"""Cached sparse teacher targets: built once over a statically masked corpus, served to training
(docs/teacher_cache.md)."""
