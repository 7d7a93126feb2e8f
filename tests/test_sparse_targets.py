"""fused_linear_kd with sparse teacher targets (ids, weights) against a float64 dense formula
restricted to the cached support, on every backend (triton under TRITON_INTERPRET=1, cuda on a GPU)."""
from __future__ import annotations

import pytest
import torch
from conftest import interpreting_triton

import kdfast
from kdfast import _ext

N, V, HS, K = 37, 300, 24, 8


def dense_loss64(sh, sw, sb, ids, weights, labels, temperature, kind, kd_weight, mlm_weight, row_weights):
    """Float64: KD rows are the labelled ones; p̂ = Σ_k w_k onehot(id_k) built entry by entry."""
    s = sh @ sw.T + sb
    kept = labels != -100
    p_hat = torch.zeros_like(s)
    for n in range(s.shape[0]):
        for k in range(ids.shape[1]):
            if ids[n, k] >= 0:
                p_hat[n, ids[n, k]] += weights[n, k]
    log_q = torch.log_softmax(s / temperature, 1)
    rows = -(p_hat * log_q).sum(1)
    if kind == "kl":
        rows = rows + torch.where(p_hat > 0, p_hat * p_hat.log(), torch.zeros_like(p_hat)).sum(1)
    rows = rows * row_weights
    kd = rows[kept].sum() * temperature**2 / int(kept.sum())
    mlm = -torch.log_softmax(s[kept], 1).gather(1, labels[kept][:, None]).mean()
    return kd_weight * kd + mlm_weight * mlm


def make_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(N, HS, generator=g)
    sw = torch.randn(V, HS, generator=g) * 0.5
    sb = torch.randn(V, generator=g) * 0.1
    ids = torch.randint(0, V, (N, K), generator=g)
    ids[:, 1] = ids[:, 0]                       # duplicate ids (repeated samples)
    ids[::3, -2:] = -1                          # padding
    ids[5] = -1                                 # a row without support (S = 0)
    weights = torch.rand(N, K, generator=g) ** 3 * 0.3
    weights[::4, 2] = 0.0                       # zero weights on valid ids
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    row_weights = torch.rand(N, generator=g) + 0.5
    return sh, sw, sb, ids, weights, labels, row_weights


def backends():
    out = [pytest.param("torch"), pytest.param("cpu")]
    out.append(pytest.param("triton", marks=pytest.mark.skipif(
        not interpreting_triton(), reason="Triton runs on CPU only under TRITON_INTERPRET=1")))
    out.append(pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or _ext.CUDA is None, reason="needs a CUDA device and kdfast._cuda")))
    return out


def rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kind,temperature", [("soft_ce", 1.0), ("kl", 2.0), ("soft_ce", 0.5)])
def test_sparse_targets_match_float64_dense_on_support(backend, kind, temperature, monkeypatch):
    monkeypatch.setenv("KDFAST_VOCAB_CHUNK_ROWS", "16")  # several chunks, the last one partial
    sh, sw, sb, ids, weights, labels, row_weights = make_inputs(1)
    device = "cuda" if backend == "cuda" else "cpu"
    args64 = [x.double().requires_grad_(True) for x in (sh, sw, sb)]
    ref = dense_loss64(*args64, ids, weights.double(), labels, temperature, kind, 0.7, 0.4, row_weights.double())
    ref_grads = torch.autograd.grad(ref, args64)
    inputs = [x.to(device).requires_grad_(True) for x in (sh, sw, sb)]
    out = kdfast.fused_linear_kd(inputs[0], inputs[1], student_bias=inputs[2], labels=labels.to(device),
                                 temperature=temperature, kd_weight=0.7, mlm_weight=0.4, kind=kind,
                                 row_weights=row_weights.to(device), backend=backend,
                                 teacher_targets=(ids.to(device), weights.to(device)))
    grads = torch.autograd.grad(out.loss, inputs)
    assert rel_err(out.loss, ref) < 1e-5
    for name, got, want in zip(("student_hidden", "student_weight", "student_bias"), grads, ref_grads):
        assert rel_err(got, want) < 1e-5, name


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_full_support_targets_equal_the_teacher_head(backend):
    """Targets holding the whole teacher distribution (K = V) give the dense-teacher loss."""
    sh, sw, sb, _, _, labels, _ = make_inputs(2)
    th, tw = torch.randn(N, 16), torch.randn(V, 16)
    probs = torch.softmax((th @ tw.T) / 2.0, 1)
    ids = torch.arange(V).expand(N, V)
    dense = kdfast.fused_linear_kd(sh, sw, th, tw, labels=labels, temperature=2.0, backend=backend)
    sparse = kdfast.fused_linear_kd(sh, sw, labels=labels, temperature=2.0, backend=backend,
                                    teacher_targets=(ids, probs))
    assert rel_err(sparse.loss, dense.loss) < 1e-5


@pytest.mark.parametrize("change,message", [
    (dict(ids=torch.full((N, K), V)), "values in [0, 300) or -1"),
    (dict(ids=torch.zeros(N, K, dtype=torch.float32)), "teacher_targets[0] (ids): expected dtype"),
    (dict(ids=torch.zeros(N + 1, K, dtype=torch.long)), "expected shape [N=37, K >= 1]"),
    (dict(weights=-torch.ones(N, K)), "expected values >= 0"),
    (dict(weights=torch.full((N, K), float("nan"))), "finite values"),
    (dict(weights=torch.ones(N, K + 1)), "teacher_targets[1] (weights): expected shape"),
    (dict(teacher_hidden=torch.randn(N, 4)), "without teacher_hidden"),
    (dict(kind="jsd"), "kind: expected one of"),
])
def test_sparse_targets_bad_input_is_named(change, message):
    sh, sw, _, ids, weights, labels, _ = make_inputs(3)
    ids, weights = change.pop("ids", ids), change.pop("weights", weights)
    with pytest.raises((ValueError, TypeError)) as err:
        kdfast.fused_linear_kd(sh, sw, labels=labels, teacher_targets=(ids, weights), **change)
    assert message in str(err.value)


def test_neither_teacher_nor_targets_is_refused():
    sh, sw, *_ = make_inputs(4)
    with pytest.raises(ValueError, match="teacher_targets: expected"):
        kdfast.fused_linear_kd(sh, sw)
