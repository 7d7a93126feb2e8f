"""The ``torch`` backend: plain PyTorch, differentiable by autograd, any float dtype.

It is the semantic contract every kernel backend is tested against (tests compare it in
turn with independent float64 formulas). Half-precision inputs are computed in float32.
"""
