"""The kernels as torch.library custom ops (kdfast/ops/): ``torch.library.opcheck`` (schema, fake
implementation, autograd registration, AOT dispatch with dynamic shapes) for every loss op, on the ``cpu``
backend and, under TRITON_INTERPRET=1, the ``triton`` one; for every kernel op on CPU; and for the Triton
kernel ops (``triton_op``) under TRITON_INTERPRET=1 the checks the interpreter allows."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from alloc_spy import ShapeSpy
from conftest import interpreting_triton

import kdfast.triton as kdfast_triton
from kdfast import _ext, ops

BACKENDS = ["cpu"] + (["triton"] if interpreting_triton() else [])
N, V, HS, HT, K = 11, 37, 8, 12, 3
B, HEADS, L, D_S, D_T = 2, 2, 5, 4, 6


def _leaf(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _labels():
    labels = torch.randint(0, V, (N,))
    labels[::3] = -100
    return labels


def _key_mask():
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, -2:] = False
    return mask


def _vocab_options(backend, kd_weight=1.0, mlm_weight=0.5, topk=None, need=(True, True, True),
                   maps=(None, 1.0, None, 1.0)):
    """Options after the tensors: ..., chunk_rows, (student cap, scale, teacher cap, scale), need."""
    return [backend, -100, 2.0, kd_weight, mlm_weight, "kl", "batchmean", True, topk, 0.5, 4, *maps, list(need)]


def _fused_samples(backend):
    hidden, weight, bias = _leaf(N, HS), _leaf(V, HS), _leaf(V)
    teacher = [torch.randn(N, HT), torch.randn(V, HT), torch.randn(V)]
    ids = torch.randint(-1, V, (N, K))
    weights = torch.rand(N, K)
    mask = torch.rand(N) < 0.7
    yield [hidden, weight, bias, *teacher, _labels(), None, None, None, None, *_vocab_options(backend)]
    yield [hidden, weight, None, *teacher, None, mask, torch.rand(N), None, None,
           *_vocab_options(backend, mlm_weight=0.0, topk=5, need=(True, True, False))]
    yield [hidden, weight, bias, None, None, None, _labels(), None, None, ids, weights, *_vocab_options(backend)]
    yield [hidden, weight, bias, *teacher, _labels(), None, None, None, None,
           *_vocab_options(backend, maps=(3.0, 0.5, 30.0, 2.0))]  # softcapped and rescaled heads


def _fused_backward_samples(backend):
    hidden, weight, bias = torch.randn(N, HS), torch.randn(V, HS), torch.randn(V)
    stored = [torch.randn(N, HS), torch.randn(V, HS), torch.randn(V)]
    for grad_kd, grad_mlm in ((1.0, 0.5), (0.3, 2.0)):  # in the weights' ratio, and not (recomputes the MLM part)
        yield [torch.tensor(grad_kd), torch.tensor(grad_mlm), *stored, hidden, weight, bias, _labels(), None, None,
               None, None, *_vocab_options(backend)]


def _kd_kl_samples(backend):
    mask = torch.rand(N) < 0.6
    for kind, rows in (("kl", None), ("jsd", mask)):
        yield [_leaf(N, V), torch.randn(N, V), rows, backend, 2.0, kind, "batchmean", True, 0.3, 4, True]


def _attention_samples(backend):
    q_s, k_s = _leaf(B, HEADS, L, D_S), _leaf(B, HEADS, L, D_S)
    q_t, k_t = torch.randn(B, HEADS, L, D_T), torch.randn(B, HEADS, L, D_T)
    for mask in (None, _key_mask()):
        yield [q_s, k_s, q_t, k_t, mask, backend]


def _attention_backward_samples(backend):
    for q_s, k_s, q_t, k_t, mask, _ in _attention_samples(backend):
        q_s, k_s = q_s.detach(), k_s.detach()
        _, lse_s, lse_t, rows = torch.ops.kdfast.attention_kl(q_s, k_s, q_t, k_t, mask, backend)
        yield [torch.tensor(1.7), q_s, k_s, q_t, k_t, mask, lse_s, lse_t, rows, backend]


def _relation_samples(backend):
    for mask in (None, _key_mask()):
        yield [_leaf(B, L, 2 * D_S), torch.randn(B, L, 2 * D_T), 2, mask, backend]


def _relation_backward_samples(backend):
    for x_s, x_t, heads, mask, _ in _relation_samples(backend):
        x_s = x_s.detach()
        _, lse_s, lse_t, rows = torch.ops.kdfast.relation_kl(x_s, x_t, heads, mask, backend)
        yield [torch.tensor(0.6), x_s, x_t, heads, mask, lse_s, lse_t, rows, backend]


def _score_mse_samples(backend):
    for q_s, k_s, q_t, k_t, mask, _ in _attention_samples(backend):
        yield [q_s, k_s, q_t, k_t, mask, mask is None, backend, [True, True]]


def _hidden_samples(backend):
    mask = _key_mask()
    yield [_leaf(B, L, HS), torch.randn(B, L, HT), _leaf(HT, HS), _leaf(HT), mask, backend, [True, True, True]]
    yield [_leaf(B, L, HT), torch.randn(B, L, HT), None, None, None, backend, [True, False, False]]


def _row_kernel_samples(layout: str):
    def samples(backend):
        s, t = torch.randn(N, V) * 3, torch.randn(N, V) * 3
        t[::4, ::7] = float("-inf")  # top-k teacher entries
        if layout == "vocab":
            s, t = s.t().contiguous().t(), t.t().contiguous().t()
        labels = torch.randint(0, V, (N,))
        labels[::3] = -1
        for kind in ("kl", "jsd"):
            yield [s.clone(), t, labels, torch.rand(N), torch.rand(N), 2.0, kind, 0.3]
    return samples


def _kl_rows_samples(backend):
    """attention_kl_rows[_triton]: Q/K heads with and without a mask, and k = q on relation-head views."""
    for q_s, k_s, q_t, k_t, mask, _ in _attention_samples(backend):
        yield [q_s.detach(), k_s.detach(), q_t, k_t, mask]
    for x_s, x_t, heads, mask, _ in _relation_samples(backend):
        yield [_relation_view(x_s.detach(), heads), None, _relation_view(x_t, heads), None, mask]


def _relation_view(x, heads):
    return x.unflatten(2, (heads, -1)).transpose(1, 2)


def _kl_rows_backward_samples(rows_op: str, last):
    """attention_kl_rows_backward[_triton]: the LSEs of ``rows_op``, then ``last()`` (coef or scale tensor)."""
    def samples(backend):
        for q_s, k_s, q_t, k_t, mask in _kl_rows_samples(backend):
            _, lse_s, lse_t = getattr(torch.ops.kdfast, rows_op)(q_s, k_s, q_t, k_t, mask)
            yield [q_s, k_s, q_t, k_t, mask, lse_s, lse_t, last()]
    return samples


def _gram_samples(with_alphas: bool):
    """attention_mse_gram[_triton]: with and without a key mask and gradients; bf16 operands once."""
    def samples(backend):
        for (q_s, k_s, q_t, k_t, mask, _), with_grad in zip(_attention_samples(backend), (True, False)):
            alphas = [D_S ** -0.5, D_T ** -0.5] if with_alphas else []
            yield [q_s.detach(), k_s.detach(), q_t, k_t, mask, *alphas, 0.1, 0.2, with_grad]
        q_s, k_s, q_t, k_t = (torch.randn(B, HEADS, L, d).bfloat16() for d in (D_S, D_S, D_T, D_T))
        yield [q_s, k_s, q_t, k_t, _key_mask(), *([D_S ** -0.5, D_T ** -0.5] if with_alphas else []), 0.1, 0.2, True]
    return samples


def _hidden_rows_samples(backend):
    """hidden_mse_rows[_triton]: separate gradient, in place (y None) with a mask and bias sums, a broadcast
    teacher row, a bf16 teacher."""
    rows, width = 2 * 130 + 3, 20  # more than one 256-row chunk
    mask = torch.rand(rows) < 0.7
    yield [torch.randn(rows, width), torch.randn(rows, width), None, 0.5, torch.empty(rows, width), None]
    yield [None, torch.randn(rows, width), mask, 0.5, torch.randn(rows, width), torch.empty(width)]
    yield [None, torch.zeros(1, width).expand(rows, width), mask, 2.0, torch.randn(rows, width), torch.empty(width)]
    yield [torch.randn(rows, width), torch.randn(rows, width).bfloat16(), None, 0.5, torch.empty(rows, width),
           torch.empty(width)]


SAMPLES = {
    "kdfast::fused_linear_kd": _fused_samples, "kdfast::fused_linear_kd_backward": _fused_backward_samples,
    "kdfast::kd_kl": _kd_kl_samples, "kdfast::attention_kl": _attention_samples,
    "kdfast::attention_kl_backward": _attention_backward_samples, "kdfast::relation_kl": _relation_samples,
    "kdfast::relation_kl_backward": _relation_backward_samples, "kdfast::attention_score_mse": _score_mse_samples,
    "kdfast::hidden_mse": _hidden_samples, "kdfast::vocab_kd_rows": _row_kernel_samples("vocab"),
    "kdfast::attention_kl_rows": _kl_rows_samples,
    "kdfast::attention_kl_rows_backward": _kl_rows_backward_samples("attention_kl_rows", lambda: 0.7),
    "kdfast::attention_mse_gram": _gram_samples(with_alphas=True), "kdfast::hidden_mse_rows": _hidden_rows_samples,
}
TRITON_OPS = {
    "kdfast::vocab_kd_rows_triton": _row_kernel_samples("row"),
    "kdfast::attention_kl_rows_triton": _kl_rows_samples,
    "kdfast::attention_kl_rows_backward_triton": _kl_rows_backward_samples("attention_kl_rows_triton",
                                                                           lambda: torch.tensor([0.7])),
    "kdfast::attention_mse_gram_triton": _gram_samples(with_alphas=False),
    "kdfast::hidden_mse_rows_triton": _hidden_rows_samples,
}


def test_every_op_has_samples():
    assert set(SAMPLES) == set(ops.OPS)
    assert set(TRITON_OPS) == set(kdfast_triton.TRITON_OPS)


# The kernel ops take no backend argument: they run once (their device's implementation).
KERNEL_OPS = {*ops.kernels.OPS, *ops.attention_kernels.OPS, *ops.hidden_kernels.OPS}
CASES = [(name, backend) for name in ops.OPS for backend in (["cpu"] if name in KERNEL_OPS else BACKENDS)]


@pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")
@pytest.mark.parametrize(("name", "backend"), CASES)
def test_opcheck(name, backend):
    op = getattr(torch.ops.kdfast, name.split("::")[1]).default
    for args in SAMPLES[name](backend):
        torch.library.opcheck(op, args)


def test_native_row_kernel_op_takes_both_layouts():
    for args in _row_kernel_samples("row")("cpu"):
        torch.library.opcheck(torch.ops.kdfast.vocab_kd_rows.default, args)


@pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")
def test_attention_kl_kernel_ops_take_both_keys_or_none():
    q_s, k_s, q_t, _, mask = next(_kl_rows_samples("cpu"))
    with pytest.raises(ValueError, match=r"k_s, k_t: expected both tensors or both None \(k = q\), got Tensor and "
                                         r"NoneType"):
        torch.ops.kdfast.attention_kl_rows(q_s, k_s, q_t, None, mask)


@pytest.mark.skipif(not interpreting_triton(), reason="Triton kernels run on CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", TRITON_OPS)
def test_opcheck_triton_op(name):
    """The interpreter runs a wrap_triton kernel as a plain function, also on FakeTensors and on the
    functional tensors of AOT dispatch (it reads their storage), so on CPU the checks are the schema
    (mutations as declared), autograd registration and the fake tensor check of each op's explicit fake
    (its shapes, dtypes and strides against the real outputs). AOT dispatch needs a GPU, where the kernels
    are traced instead of run."""
    for module in ("vocab_kd", "attention_kl", "attention_score_mse", "hidden_mse"):
        importlib.import_module(f"kdfast.triton.{module}")  # registers the triton_ops

    op = getattr(torch.ops.kdfast, name.split("::")[1]).default
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")  # each has an explicit fake
    for args in TRITON_OPS[name]("triton"):
        torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")
@pytest.mark.parametrize("parts", [(2.0, 0.0, 0.0), (1.0, 0.3, 0.0)])
def test_fused_backward_scales_and_reweights_without_a_bias(parts):
    """loss * 2 (a scale other than 1) and loss + 0.3 kd (another ratio than the weights) on a bias-free
    head: the eager formula equals the torch reference's autograd in float64."""
    import kdfast

    scale, extra_kd, _ = parts
    hidden, weight = _leaf(N, HS), _leaf(V, HS)
    teacher_hidden, teacher_weight = torch.randn(N, HT), torch.randn(V, HT)
    labels = _labels()
    grads = {}
    for backend, dtype in (("cpu", torch.float32), ("torch", torch.float64)):
        h, w = (x.detach().to(dtype).requires_grad_() for x in (hidden, weight))
        out = kdfast.fused_linear_kd(h, w, teacher_hidden.to(dtype), teacher_weight.to(dtype), labels=labels,
                                     mlm_weight=0.5, temperature=2.0, backend=backend)
        (scale * out.loss + extra_kd * out.kd).backward()
        grads[backend] = (h.grad, w.grad)
    for got, ref in zip(grads["cpu"], grads["torch"]):
        assert float((got.double() - ref).norm() / ref.norm()) < 1e-5


def _written(spy: ShapeSpy, names: "tuple[str, ...]") -> list:
    """(aten op name, numel) of each tensor that ``spy`` saw one of the ops ``names`` return, if over 1 element."""
    found = [(op.split(".")[1], math.prod(shape)) for op, shape in spy.outputs]
    return [(name, size) for name, size in found if name in names and size > 1]


LOSS_OPS = ("kdfast::fused_linear_kd", "kdfast::kd_kl", "kdfast::attention_kl", "kdfast::relation_kl",
            "kdfast::attention_score_mse", "kdfast::hidden_mse")


@pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")
@pytest.mark.parametrize("name", LOSS_OPS)
def test_backward_fills_no_zero_gradients(name):
    """Back-propagating a loss op's loss fills no tensor with zeros: its other outputs (stored gradients,
    statistics) get no zero-filled gradient from autograd (a write of each, per call). The fused op's loss
    is kd_weight * kd + mlm_weight * mlm, as ``kdfast.fused_linear_kd`` forms it."""
    op = getattr(torch.ops.kdfast, name.split("::")[1])
    for args in SAMPLES[name]("cpu"):
        out = op(*args)
        loss = out[0] * args[14] + out[1] * args[15] if name == "kdfast::fused_linear_kd" else out[0]
        with ShapeSpy() as spy:
            loss.backward()
        assert _written(spy, ("zeros", "zeros_like", "zero_", "fill_", "new_zeros")) == []


@pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")
@pytest.mark.parametrize("part", ["kd", "mlm"])
def test_fused_backward_of_one_part_alone(part):
    """The gradient of ``kd`` or ``mlm`` alone (the other part's gradient arrives as None) equals the torch
    reference's autograd in float64."""
    import kdfast

    hidden, weight, bias = _leaf(N, HS), _leaf(V, HS), _leaf(V)
    teacher_hidden, teacher_weight = torch.randn(N, HT), torch.randn(V, HT)
    labels = _labels()
    grads = {}
    for backend, dtype in (("cpu", torch.float32), ("torch", torch.float64)):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (hidden, weight, bias)]
        out = kdfast.fused_linear_kd(leaves[0], leaves[1], teacher_hidden.to(dtype), teacher_weight.to(dtype),
                                     student_bias=leaves[2], labels=labels, mlm_weight=0.5, temperature=2.0,
                                     backend=backend)
        grads[backend] = torch.autograd.grad(getattr(out, part), leaves)
    for got, ref in zip(grads["cpu"], grads["torch"]):
        assert float((got.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")
@pytest.mark.parametrize("name", ["kdfast::attention_score_mse", "kdfast::hidden_mse"])
def test_grad_in_forward_backward_scales_only_when_it_must(name):
    """At an incoming gradient of exactly 1 on CPU the backward hands over the stored gradients (no write of a
    gradient-sized tensor); at 2.5 it returns 2.5 times them."""
    op = getattr(torch.ops.kdfast, name.split("::")[1])
    for args in SAMPLES[name]("cpu"):
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        with ShapeSpy() as spy:
            at_one = torch.autograd.grad(op(*args)[0], leaves)
        at_scale = torch.autograd.grad(op(*args)[0] * 2.5, leaves)
        for one, scaled in zip(at_one, at_scale):
            torch.testing.assert_close(scaled, one * 2.5, rtol=1e-6, atol=0)
        assert _written(spy, ("mul",)) == []
