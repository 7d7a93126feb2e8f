"""The bottom layer: what every other part of kdfast may use and that uses nothing of kdfast —
torchrun processes (``distributed``), files that appear whole (``io``), where a number was taken
(``environment``) and content hashes (``fingerprint``)."""
