"""Benchmark op modules for ``kdfast bench kernels``: one module per op (``vocab_kd``, ``attention_kl``,
``relation_kl``, ``attention_mse``, ``hidden_mse``), each defining

- ``shapes(quick: bool, device: torch.device) -> list[dict]``: the shapes to time (JSON-serialisable);
- ``inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict``: fresh seeded inputs;
- ``impls(device: torch.device) -> dict[str, Callable[[dict], tuple[Tensor, ...]]]``: each runs forward and
  backward once and returns ``(loss, *grads)``. A key ``"name:backend"`` (e.g. ``"kdfast:cpu"``) is
  reported as impl ``name`` on ``backend``; ``"floor"`` is the bare work the op cannot avoid, whose
  outputs are not compared;
- ``reference(inputs: dict) -> tuple[Tensor, ...]``: the same outputs in float64.

Optional: ``DEFAULT_DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}``;
``extra_fields(key, shape, fn, inputs, device) -> dict``: more fields for the result of impl ``key``
(``fn`` its callable) on ``shape``, computed after the timing; ``release_scratch()``: free buffers the
module's impls keep between calls (called before each peak measurement, so the peak counts them).
"""
from __future__ import annotations

OPS = ("vocab_kd", "attention_kl", "relation_kl", "attention_mse", "hidden_mse")
FLOOR = "floor"
