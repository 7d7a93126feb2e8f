"""Integrations with other libraries. Each submodule imports its library itself, so
``import kdfast`` never pulls them in: ``from kdfast.integrations.transformers import DistillationTrainer``.
"""
