"""CPU backend of fused_linear_kd / kd_kl (C++ row kernel + chunked driver) against independent float64
formulas (tests/vocab_kd_float64.py): losses and every gradient, fp32 and bf16, bad inputs, memory."""
from __future__ import annotations

import pytest
import torch
import vocab_kd_float64 as f64
from torch.utils._python_dispatch import TorchDispatchMode
from vocab_kd_inputs import HS, HT, N, V, assert_close, make  # noqa: F401

import kdfast
from kdfast import _ext

pytestmark = pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")

BACKEND = "cpu"
def run_kdfast(inputs: dict, grad_scale: float = 1.0, **options) -> tuple:
    out = kdfast.fused_linear_kd(**inputs, **options, backend=BACKEND)
    tensors = [inputs["student_hidden"], inputs["student_weight"]]
    if inputs.get("student_bias") is not None:
        tensors.append(inputs["student_bias"])
    grads = torch.autograd.grad(out.loss * grad_scale, tensors)
    return (out.loss.detach() * grad_scale, *grads)


@pytest.fixture(params=[None, 5], ids=["auto_chunk", "chunk5"])
def chunk(request, monkeypatch):
    """Run each case with the automatic chunk (one chunk here) and with 5-row chunks."""
    if request.param:
        monkeypatch.setenv("KDFAST_VOCAB_CHUNK_ROWS", str(request.param))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_fp32_grid_matches_float64(temperature, kind, reduction, chunk):
    inputs = make()
    options = dict(temperature=temperature, kind=kind, reduction=reduction, mlm_weight=0.7, kd_weight=1.3)
    assert_close(run_kdfast(inputs, **options), f64.loss_and_grads(**inputs, **options), 1e-5)


@pytest.mark.parametrize("options", [
    dict(t2_scale=False, temperature=2.0),
    dict(mlm_weight=1.0, kd_weight=0.0),
    dict(mlm_weight=0.0, temperature=3.0),
    dict(teacher_topk=7, temperature=2.0, mlm_weight=0.5),
    dict(teacher_topk=1, kind="soft_ce"),
    dict(row_weights="random", temperature=2.0, reduction="sum"),
    dict(mask="random", mlm_weight=0.4, temperature=0.5),
], ids=["no_t2", "mlm_only", "kd_only_no_labels", "topk7", "topk1_soft_ce", "row_weights", "mask"])
def test_options_match_float64(options, chunk):
    inputs = make()
    options = dict(options)
    if options.get("row_weights") == "random":
        options["row_weights"] = torch.rand(N)
    if options.get("mask") == "random":
        options["mask"] = torch.rand(N) < 0.5
    if options.get("mlm_weight", 0.0) == 0.0 and "mask" not in options:
        inputs["labels"] = None
    ref = f64.loss_and_grads(**inputs, **options)
    assert_close(run_kdfast(inputs, grad_scale=2.5, **options), tuple(2.5 * r for r in ref), 1e-5)


def test_grad_scale_is_applied():
    inputs = make()
    ref = f64.loss_and_grads(**inputs, temperature=2.0)
    assert_close(run_kdfast(inputs, grad_scale=-3.0, temperature=2.0), tuple(-3.0 * r for r in ref), 1e-5)


@pytest.mark.parametrize("scale", [30.0, 300.0])
@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])  # 2.0: the MLM softmax as a square of the KD exp
def test_extreme_logits(scale, temperature):
    inputs = make(scale=scale)
    options = dict(temperature=temperature, mlm_weight=1.0)
    assert_close(run_kdfast(inputs, **options), f64.loss_and_grads(**inputs, **options), 1e-5)


def test_no_bias_and_unlabelled_kd():
    inputs = make(bias=False)
    inputs["labels"] = None
    assert_close(run_kdfast(inputs, temperature=2.0), f64.loss_and_grads(**inputs, temperature=2.0), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_are_not_rounded_before_the_softmax(dtype):
    inputs = make(dtype=dtype)
    options = dict(temperature=2.0, mlm_weight=0.5)
    got = run_kdfast(inputs, **options)
    ref = f64.loss_and_grads(**inputs, **options)  # float64 on the same 16-bit-rounded inputs
    errors = [f64.rel_err(g.float(), r) for g, r in zip(got[:1], ref[:1])]
    assert all(e <= 1e-3 for e in errors), errors
    # Gradients are returned in the input dtype, so compare them after the same final rounding.
    rounded = [r.to(dtype) for r in ref[1:]]
    assert all(f64.rel_err(g, r) <= 1e-3 for g, r in zip(got[1:], rounded))


def test_gradients_accumulate_over_two_backwards_of_one_graph():
    """Backward hands out its stored gradients at scale 1 (no copy); with retain_graph a second backward
    must still see them intact, and .grad must hold twice the reference."""
    inputs = make()
    leaves = [inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"]]
    ref = f64.loss_and_grads(**inputs, temperature=2.0)
    out = kdfast.fused_linear_kd(**inputs, temperature=2.0, backend=BACKEND)
    out.loss.backward(retain_graph=True)
    out.loss.backward()
    assert_close((out.loss.detach(), *(leaf.grad / 2 for leaf in leaves)), ref, 1e-5)


def test_all_rows_ignored_gives_zero_and_zero_grads():
    inputs = make()
    inputs["labels"][:] = -100
    out = kdfast.fused_linear_kd(**inputs, mlm_weight=1.0, backend=BACKEND)
    grads = torch.autograd.grad(out.loss, [inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"]])
    assert out.loss.item() == 0.0 and out.kd.item() == 0.0 and out.mlm.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("coef_kd, coef_mlm", [(2.0, 0.5), (5.0, 2.0), (0.0, 1.0), (1.0, 0.0)])
def test_parts_can_be_reweighted(coef_kd, coef_mlm):
    """Back-propagating coef_kd*kd + coef_mlm*mlm (as strategies do) gives that combination's gradients."""
    inputs = make()
    options = dict(mlm_weight=0.5, kd_weight=2.0, temperature=2.0)
    out = kdfast.fused_linear_kd(**inputs, **options, backend=BACKEND)
    tensors = [inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"]]
    got = torch.autograd.grad(out.kd * coef_kd + out.mlm * coef_mlm, tensors)
    ref = f64.loss_and_grads(**inputs, **dict(options, kd_weight=coef_kd, mlm_weight=coef_mlm))
    assert_close((out.kd * coef_kd + out.mlm * coef_mlm, *got), ref, 1e-5)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_rows_by_vocab_allocation(monkeypatch):
    monkeypatch.setenv("KDFAST_VOCAB_CHUNK_ROWS", "8")
    inputs = make(n=64, v=1000)
    with _LargestAllocation() as spy:
        run_kdfast(inputs, temperature=2.0, mlm_weight=1.0, teacher_topk=10)
    # The two 8-row logit chunks (one 2 x 8 x V workspace) and weight-sized tensors (12 x V) only; never 64 x V.
    assert spy.largest <= 2 * 8 * 1000, spy.largest


@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_kd_kl_matches_float64(kind, reduction, masked, temperature):
    s = (torch.randn(21, 777) * 3).requires_grad_(True)
    t = torch.randn(21, 777) * 3
    mask = torch.rand(21) < 0.6 if masked else None
    options = dict(temperature=temperature, mask=mask, kind=kind, reduction=reduction)
    got = kdfast.kd_kl(s, t, **options, backend=BACKEND)
    (grad,) = torch.autograd.grad(got * 1.5, [s])
    s64 = s.detach().double().requires_grad_(True)
    ref = f64.kd_kl(s64, t.double(), **options)
    (ref_grad,) = torch.autograd.grad(ref * 1.5, [s64])
    assert f64.rel_err(got, ref) <= 1e-5 and f64.rel_err(grad, ref_grad) <= 1e-5


def test_kd_kl_bf16():
    s = (torch.randn(9, 600) * 3).bfloat16().requires_grad_(True)
    t = (torch.randn(9, 600) * 3).bfloat16()
    got = kdfast.kd_kl(s, t, temperature=2.0, backend=BACKEND)
    (grad,) = torch.autograd.grad(got, [s])
    s64 = s.detach().double().requires_grad_(True)
    ref = f64.kd_kl(s64, t.double(), temperature=2.0)
    (ref_grad,) = torch.autograd.grad(ref, [s64])
    assert grad.dtype == torch.bfloat16
    assert f64.rel_err(got, ref) <= 1e-3 and f64.rel_err(grad, ref_grad.bfloat16()) <= 1e-3


def test_float64_is_declined_to_the_reference():
    inputs = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in make().items()}
    with pytest.raises(ValueError, match="float64"):
        kdfast.fused_linear_kd(**inputs, backend=BACKEND)


@pytest.mark.parametrize("change, message", [
    (lambda x: x.update(labels=torch.full((N,), V)), r"labels: expected values in \[0, 1100\)"),
    (lambda x: x.update(temperature=0.0), "temperature: expected a finite number > 0"),
    (lambda x: x.update(temperature=-1.0), "temperature: expected a finite number > 0"),
    (lambda x: x["student_hidden"].data.__setitem__((0, 0), float("nan")), "student_hidden: expected finite values"),
    (lambda x: x.update(teacher_hidden=x["teacher_hidden"].to("meta")), "teacher_hidden: expected the device"),
    (lambda x: x.update(teacher_weight=torch.randn(V + 1, HT)), "teacher_weight: expected shape"),
    (lambda x: x.update(teacher_hidden=torch.randn(N + 2, HT)), "teacher_hidden: expected shape"),
    (lambda x: x.update(student_weight=torch.randn(V, HS + 1)), "student_weight: expected shape"),
], ids=["label_range", "temperature0", "temperature_neg", "nan_hidden", "devices", "vocab", "rows", "width"])
def test_bad_inputs_raise_clear_errors(change, message):
    inputs = make()
    inputs["temperature"] = 1.0
    change(inputs)
    with pytest.raises(ValueError, match=message):
        kdfast.fused_linear_kd(**inputs, mlm_weight=1.0, backend=BACKEND)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])  # softmax(s) of the MLM term: q, squared, own exp
@pytest.mark.parametrize("kind", ["kl", "soft_ce", "reverse_kl", "jsd"])
def test_row_kernel_layouts_agree(temperature, kind):
    """The C++ kernel on row-major and on vocab-major logits (71 rows: two full 32-row lane groups and a
    partial one; labelled and unlabelled rows; teacher entries dropped to -inf as top-k does, except for
    reverse KL, which refuses top-k; for JSD also the student's mode)."""
    from kdfast.cpu.fused_linear_kd import rows as row_kernel

    c, v = 71, 1100
    s, t = torch.randn(c, v) * 3, torch.randn(c, v) * 3
    if kind != "reverse_kl":
        t[::4, ::7] = float("-inf")
        t[1, s[1].argmax()] = float("-inf")
    labels = torch.randint(0, v, (c,))
    labels[::3] = -1
    kd_coef, mlm_coef = torch.rand(c), torch.rand(c)
    out = {}
    for layout in ("row", "vocab"):
        s_in = s.clone() if layout == "row" else s.t().contiguous().t()
        t_in = t.clone() if layout == "row" else t.t().contiguous().t()
        assert (s_in.stride(1) == 1) == (layout == "row")
        kd_row, mlm_row = row_kernel(s_in, t_in, labels, kd_coef, mlm_coef, temperature, kind, 0.3)
        out[layout] = (s_in.contiguous(), kd_row, mlm_row)
    for got, ref in zip(out["vocab"], out["row"]):
        assert f64.rel_err(got, ref) < 1e-5
    assert torch.isfinite(out["vocab"][0]).all() and torch.isfinite(out["vocab"][1]).all()
    assert (out["vocab"][2][labels < 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_native_16bit_head_path(monkeypatch, dtype, masked):
    """The path CUDA takes for 16-bit heads (16-bit products with fp32 output, emulated exactly on CPU):
    logits from the 16-bit weights, and for bf16 the gradient products on a hi + lo bf16 split of
    d loss / d logits. Its fp32 gradients, before the final rounding to the input dtype, stay within
    1e-5 of float64 on the same 16-bit inputs (one bf16 part alone would be ~1e-3 off)."""
    from kdfast.cpu.fused_linear_kd import rows as row_kernel
    from kdfast.functions import vocab_kd
    from kdfast.functions.vocab_kd import head

    monkeypatch.setattr(head, "mm_out_dtype_works", lambda device: True)
    if dtype == torch.bfloat16:  # the split path never builds an fp32 copy of the weight
        monkeypatch.setattr(head.Head, "fp32_weight", lambda self: pytest.fail("fp32 weight used"))
    inputs = make(dtype=dtype)
    mask = torch.rand(N) < 0.6 if masked else None
    options = dict(temperature=2.0, mlm_weight=0.5, kd_weight=1.0, mask=mask)
    opts = vocab_kd.VocabKDOptions(row_kernel=row_kernel, labels=inputs["labels"], temperature=2.0, mask=mask,
                                   chunk_rows=7)
    names = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")
    kd, mlm, d_hidden, d_weight, d_bias = vocab_kd.fused_pass(
        *(inputs[n].detach() for n in names), opts, (True, True, True), 1.0, 0.5)
    ref = f64.loss_and_grads(**inputs, **options)
    got = ((kd + 0.5 * mlm).float(), d_hidden, d_weight, d_bias)
    assert all(g.dtype == torch.float32 for g in got[1:])
    assert_close(got, ref, 1e-5)


def test_driver_options_are_frozen_and_default_to_plain_heads():
    """The driver's options are built once per op call and not changed by a pass."""
    import dataclasses

    from kdfast.cpu.fused_linear_kd import rows as row_kernel
    from kdfast.functions import vocab_kd

    opts = vocab_kd.VocabKDOptions(row_kernel=row_kernel)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.temperature = 2.0
    assert opts.student_map.identity and opts.teacher_map.identity and opts.kind == "kl" and opts.chunk_rows is None


def test_chunk_rows_follow_free_memory(monkeypatch):
    from kdfast.functions.vocab_kd import chunking as vocab_kd

    cpu = torch.device("cpu")
    monkeypatch.delenv("KDFAST_VOCAB_CHUNK_ROWS", raising=False)
    monkeypatch.setattr(vocab_kd, "free_bytes", lambda device: None)
    assert vocab_kd.chunk_rows(4096, 30522, cpu) == 544  # CPU_CHUNK_BYTES: two 544-row fp32 chunks
    assert vocab_kd.chunk_rows(100, 30522, cpu) == 100
    assert vocab_kd.chunk_rows(4096, 128256, cpu) == vocab_kd.CPU_MIN_CHUNK_ROWS  # LLM vocabularies: more bytes
    monkeypatch.setattr(vocab_kd, "free_bytes", lambda device: 64 * 2**20)  # a quarter: 16 MiB
    assert vocab_kd.chunk_rows(4096, 30522, cpu) == 64
    monkeypatch.setattr(vocab_kd, "free_bytes", lambda device: 0)
    assert vocab_kd.chunk_rows(4096, 30522, cpu) == 16  # never below 16 rows
    monkeypatch.setenv("KDFAST_VOCAB_CHUNK_ROWS", "5")
    assert vocab_kd.chunk_rows(4096, 30522, cpu) == 5


def test_workspace_is_kept_reused_and_released():
    """The CPU chunk workspace survives a call (no page faults per step), a later call with other shapes
    reuses it and still matches float64 (stale contents never leak), and release_workspaces frees it."""
    from kdfast import _buffers

    kdfast.release_workspaces()
    big = make(n=64, v=1100)
    assert_close(run_kdfast(big, temperature=2.0, mlm_weight=0.5),
                 f64.loss_and_grads(**big, temperature=2.0, mlm_weight=0.5), 1e-5)
    kept = _buffers._SPARE[torch.device("cpu")]
    assert kept.numel() >= 2 * int((big["labels"] != -100).sum()) * 1100  # both chunks of the labelled rows
    small = make(n=17, v=700)
    for options in (dict(temperature=2.0, mlm_weight=0.5), dict(temperature=0.5, teacher_topk=9)):
        assert_close(run_kdfast(small, **options), f64.loss_and_grads(**small, **options), 1e-5)
    assert _buffers._SPARE[torch.device("cpu")].data_ptr() == kept.data_ptr()  # reused, not reallocated
    kdfast.release_workspaces()
    assert torch.device("cpu") not in _buffers._SPARE


def test_workspace_in_use_is_never_shared():
    """Nested (or concurrent) users get distinct memory; the larger buffer is the one kept."""
    from kdfast._buffers import _SPARE, release_workspaces, workspace

    release_workspaces()
    with workspace(100, torch.device("cpu")) as outer, workspace(300, torch.device("cpu")) as inner:
        outer.fill_(1.0)
        inner.fill_(2.0)
        assert (outer == 1.0).all()
        assert outer.data_ptr() != inner.data_ptr()
    assert _SPARE[torch.device("cpu")].numel() == 300
    release_workspaces()
