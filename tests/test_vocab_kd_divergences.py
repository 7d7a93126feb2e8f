"""Reverse KL and generalised JSD (kind="reverse_kl" / "jsd", beta) of fused_linear_kd and kd_kl on the torch,
cpu and triton backends (triton under TRITON_INTERPRET=1) against the float64 formulas of
tests/vocab_kd_float64.py: losses and gradients, options, extreme logits, the beta endpoints, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import vocab_kd_float64 as f64
from vocab_kd_inputs import BACKENDS, assert_close, make, run
from vocab_kd_inputs import SMALL_N as N
from vocab_kd_inputs import SMALL_V as V

import kdfast

DIVERGENCES = [("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 1.0)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    """Each backend; Triton walks the vocabulary in 128-column chunks so V spans several."""
    if request.param == "triton":
        from kdfast.triton import vocab_kd

        monkeypatch.setattr(vocab_kd, "block_size", lambda vocab: (128, 4))
    return request.param


def kd_kl_and_grad(s: torch.Tensor, t: torch.Tensor, backend: str, **options) -> tuple:
    s = s.detach().requires_grad_(True)
    loss = kdfast.kd_kl(s, t, **options, backend=backend)
    return (loss.detach(), *torch.autograd.grad(loss * 1.5, [s]))


def kd_kl_float64(s: torch.Tensor, t: torch.Tensor, **options) -> tuple:
    s = s.detach().double().requires_grad_(True)
    loss = f64.kd_kl(s, t.double(), **options)
    return (loss.detach(), *torch.autograd.grad(loss * 1.5, [s]))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind, beta", DIVERGENCES)
def test_fused_matches_float64(backend, kind, beta, temperature):
    inputs = make(n=N, v=V)
    options = dict(temperature=temperature, kind=kind, beta=beta, mlm_weight=0.7, kd_weight=1.3)
    assert_close(run(inputs, backend, **options), f64.loss_and_grads(**inputs, **options), 1e-5)


@pytest.mark.parametrize("options", [
    dict(reduction="sum", t2_scale=False),
    dict(reduction="mean", temperature=2.0),
    dict(mask="random", temperature=0.5),
    dict(row_weights="random", temperature=2.0),
    dict(chunk_rows=5, temperature=2.0),
    dict(labels=None, mlm_weight=0.0, temperature=2.0),
], ids=["sum_no_t2", "mean", "mask", "row_weights", "chunk5", "kd_only_unlabelled"])
@pytest.mark.parametrize("kind, beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_fused_options_match_float64(backend, kind, beta, options, monkeypatch):
    inputs = make(n=N, v=V)
    options = dict(dict(mlm_weight=0.5), kind=kind, beta=beta, **options)
    if options.get("mask") == "random":
        options["mask"] = torch.rand(N) < 0.5
    if options.get("row_weights") == "random":
        options["row_weights"] = torch.rand(N)
    if "chunk_rows" in options:
        monkeypatch.setenv("KDFAST_VOCAB_CHUNK_ROWS", str(options.pop("chunk_rows")))
    if "labels" in options:
        inputs["labels"] = options.pop("labels")
    assert_close(run(inputs, backend, **options), f64.loss_and_grads(**inputs, **options), 1e-5)


@pytest.mark.parametrize("beta", [0.3, 0.9])
def test_jsd_with_teacher_topk(backend, beta):
    """Top-k teacher (p = 0 outside it): the JSD stays finite, m = (1 - beta) q there."""
    inputs = make(n=N, v=V)
    options = dict(kind="jsd", beta=beta, teacher_topk=7, temperature=2.0, mlm_weight=0.5)
    assert_close(run(inputs, backend, **options), f64.loss_and_grads(**inputs, **options), 1e-5)


def test_reverse_kl_refuses_teacher_topk():
    with pytest.raises(ValueError, match=r"teacher_topk: expected None with kind='reverse_kl'.*got 7"):
        kdfast.fused_linear_kd(**make(n=N, v=V), kind="reverse_kl", teacher_topk=7)
    kdfast.fused_linear_kd(**make(n=N, v=V), kind="reverse_kl", teacher_topk=V)  # keeps every logit: no p = 0


def trl_generalized_jsd(s: torch.Tensor, t: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (trl/trainer/gkd_trainer.py) on [N, V] logits, batchmean, no T²,
    transcribed in float64: kl_div(input, target) = KL(target || input), so beta = 0 is KL(teacher || student) and
    beta = 1 KL(student || teacher); between, the mixture (1 - beta) q + beta p by logsumexp."""
    log_q = torch.log_softmax(s.double() / temperature, dim=-1)
    log_p = torch.log_softmax(t.double() / temperature, dim=-1)
    kl_div = torch.nn.functional.kl_div
    if beta == 0:
        jsd = kl_div(log_q, log_p, reduction="none", log_target=True)
    elif beta == 1:
        jsd = kl_div(log_p, log_q, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=torch.float64)
        log_m = torch.logsumexp(torch.stack([log_q + torch.log(1 - b), log_p + torch.log(b)]), dim=0)
        jsd = b * kl_div(log_m, log_p, reduction="none", log_target=True) + (1 - b) * kl_div(
            log_m, log_q, reduction="none", log_target=True)
    return jsd.sum() / jsd.size(0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9, 1.0])
def test_jsd_matches_trl_convention(backend, beta):
    """kind="jsd" at every beta, endpoints included, is TRL's generalized_jsd_loss (t2_scale=False): forward KL at
    beta = 0 and reverse KL at beta = 1 (never a zero loss), loss and gradient within 1e-5."""
    s, t = torch.randn(N, V) * 3, torch.randn(N, V) * 3
    got = kd_kl_and_grad(s, t, backend, kind="jsd", beta=beta, temperature=2.0, t2_scale=False)
    s64 = s.double().requires_grad_(True)
    loss = trl_generalized_jsd(s64, t, beta, 2.0)
    ref = (loss.detach(), *torch.autograd.grad(loss * 1.5, [s64]))
    assert all(f64.rel_err(g, r) <= 1e-5 for g, r in zip(got, ref)), [f64.rel_err(g, r) for g, r in zip(got, ref)]
    assert loss.item() > 0.1


@pytest.mark.parametrize("beta, kind", [(0.0, "kl"), (1.0, "reverse_kl")])
def test_jsd_endpoints_are_forward_and_reverse_kl(backend, beta, kind):
    """The fused loss: jsd at beta = 0 / 1 equals kind "kl" / "reverse_kl" (loss and gradients, with the MLM term)."""
    inputs = make(n=N, v=V)
    options = dict(temperature=2.0, mlm_weight=0.5)
    got = run(inputs, backend, kind="jsd", beta=beta, **options)
    assert_close(got, run(inputs, backend, kind=kind, **options), 1e-6)
    assert_close(got, f64.loss_and_grads(**inputs, kind=kind, **options), 1e-5)


def test_jsd_at_beta_one_refuses_teacher_topk():
    with pytest.raises(ValueError, match=r"teacher_topk: expected None with kind='reverse_kl' or kind='jsd' at beta=1"):
        kdfast.fused_linear_kd(**make(n=N, v=V), kind="jsd", beta=1.0, teacher_topk=7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_against_installed_peers(beta):
    """Against TRL's and Liger's own functions where they are installed (they are optional)."""
    s, t = torch.randn(6, 40) * 2, torch.randn(6, 40) * 2
    ours = kdfast.kd_kl(s, t, kind="jsd", beta=beta, temperature=1.0, t2_scale=False, backend="torch")
    checked = 0
    try:  # TRL >= 1.x keeps GKDTrainer under trl.experimental.gkd
        from trl.experimental.gkd import GKDTrainer
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        try:
            from trl import GKDTrainer
        except Exception:  # noqa: BLE001
            GKDTrainer = None
    if GKDTrainer is not None:
        theirs = GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=1.0, reduction="batchmean")
        assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
        checked += 1
    try:
        from liger_kernel.transformers import LigerJSD
    except Exception:  # noqa: BLE001
        LigerJSD = None
    if LigerJSD is not None and torch.cuda.is_available():
        theirs = LigerJSD(beta=beta)(torch.log_softmax(s.cuda(), -1), torch.log_softmax(t.cuda(), -1))
        assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
        checked += 1
    if not checked:
        pytest.skip("neither trl nor liger-kernel (with CUDA) is installed")


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("kind, beta", [("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.5)])
def test_kd_kl_extreme_logits(backend, kind, beta, temperature):
    """Logits around +-1e4, rows near one-hot (a +25 peak) where student and teacher agree or not."""
    rows = 12
    s = torch.randn(rows, V) * 3 + torch.randint(-1, 2, (rows, 1)) * 1e4
    t = torch.randn(rows, V) * 3 + torch.randint(-1, 2, (rows, 1)) * 1e4
    peak = torch.randint(0, V, (rows,))
    for r in range(6):
        s[r, peak[r]] += 25.0
        t[r, peak[r] if r < 3 else (peak[r] + 1) % V] += 25.0
    options = dict(kind=kind, beta=beta, temperature=temperature)
    got, ref = kd_kl_and_grad(s, t, backend, **options), kd_kl_float64(s, t, **options)
    assert all(f64.rel_err(g, r) <= 1e-5 for g, r in zip(got, ref)), [f64.rel_err(g, r) for g, r in zip(got, ref)]


def test_fused_extreme_hidden_states(backend):
    inputs = make(n=N, v=V, scale=30.0)
    for kind, beta in (("reverse_kl", 0.5), ("jsd", 0.3)):
        options = dict(kind=kind, beta=beta, temperature=2.0, mlm_weight=1.0)
        assert_close(run(inputs, backend, **options), f64.loss_and_grads(**inputs, **options), 1e-5)


@pytest.mark.parametrize("beta", [0.3, 0.5])
def test_jsd_of_disjoint_one_hots_is_the_binary_entropy(backend, beta):
    """Student and teacher one-hot on different entries: JSD_beta = -beta log beta - (1-beta) log(1-beta), with
    no gradient (every q term underflows), also in fp32."""
    s, t = torch.zeros(4, V), torch.zeros(4, V)
    s[torch.arange(4), torch.tensor([0, 5, 70, V - 1])] = 200.0
    t[torch.arange(4), torch.tensor([1, 6, 71, 0])] = 200.0
    loss, grad = kd_kl_and_grad(s, t, backend, kind="jsd", beta=beta, t2_scale=False)
    entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert abs(loss.item() - entropy) <= 1e-6 * entropy
    assert grad.abs().max().item() <= 1e-30


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("kind, beta", [("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.7)])
def test_kd_kl_matches_float64(backend, kind, beta, reduction, masked):
    s, t = torch.randn(N, V) * 3, torch.randn(N, V) * 3
    options = dict(kind=kind, beta=beta, reduction=reduction, temperature=2.0,
                   mask=torch.rand(N) < 0.6 if masked else None)
    got, ref = kd_kl_and_grad(s, t, backend, **options), kd_kl_float64(s, t, **options)
    assert all(f64.rel_err(g, r) <= 1e-5 for g, r in zip(got, ref))


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_kd_kl_bf16(backend, kind):
    s, t = (torch.randn(9, V) * 3).bfloat16(), (torch.randn(9, V) * 3).bfloat16()
    got = kd_kl_and_grad(s, t, backend, kind=kind, beta=0.3, temperature=2.0)
    ref = kd_kl_float64(s, t, kind=kind, beta=0.3, temperature=2.0)
    assert got[1].dtype == torch.bfloat16
    assert f64.rel_err(got[0], ref[0]) <= 2e-2 and f64.rel_err(got[1], ref[1].bfloat16()) <= 2e-2


def test_modules_pass_beta():
    s, t = torch.randn(6, V), torch.randn(6, V)
    module = kdfast.KDKLLoss(kind="jsd", beta=0.3, temperature=2.0, backend="torch")
    assert "beta=0.3" in repr(module)
    assert torch.equal(module(s, t), kdfast.kd_kl(s, t, kind="jsd", beta=0.3, temperature=2.0, backend="torch"))
    inputs = make(n=N, v=V)
    fused = kdfast.FusedLinearKDLoss(kind="jsd", beta=0.3, mlm_weight=0.5, backend="torch")
    expected = kdfast.fused_linear_kd(**inputs, kind="jsd", beta=0.3, mlm_weight=0.5, backend="torch")
    assert torch.equal(fused(**inputs).loss, expected.loss)


@pytest.mark.parametrize("beta, error, message", [
    (-0.1, ValueError, r"beta: expected a number in \[0, 1\], got -0.1"),
    (1.5, ValueError, r"beta: expected a number in \[0, 1\], got 1.5"),
    (float("nan"), ValueError, r"beta: expected a number in \[0, 1\], got nan"),
    ("0.5", TypeError, r"beta: expected a number in \[0, 1\], got str"),
    (True, TypeError, r"beta: expected a number in \[0, 1\], got bool"),
    (None, TypeError, r"beta: expected a number in \[0, 1\], got NoneType"),
])
def test_bad_beta(beta, error, message):
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    with pytest.raises(error, match=message):
        kdfast.kd_kl(s, t, kind="jsd", beta=beta)
    with pytest.raises(error, match=message):
        kdfast.fused_linear_kd(**make(n=N, v=V), kind="jsd", beta=beta)
    with pytest.raises(error, match=message):
        kdfast.FusedLinearKDLoss(kind="jsd", beta=beta)
