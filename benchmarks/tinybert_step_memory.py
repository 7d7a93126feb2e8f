"""Peak memory and time of one TinyBERT step: kdfast taps + fused losses vs HF eager attention.

Step = frozen teacher forward + student forward/backward + TinyBERT loss (canonical: uniform layer
map, attention-score MSE + projected hidden MSE). Random-weight BERT configs (nothing downloaded):
a 12L/768 teacher (BERT-base shape) and a 6L/768 student, attention dropout 0 in both arms.

- kdfast: ``kdfast.strategies.build("tinybert", ...)``: SDPA/flash passes, q/k/hidden taps,
  losses on backend auto (no [L, L] tensor once the cpu kernels are built).
- hf-eager: the same models with ``attn_implementation="eager"``, ``output_attentions=True`` and
  ``output_hidden_states=True``; q/k taken by hooks on the query/key Linears (HF exposes only
  probabilities), loss on the torch reference backend, as an HF-based TinyBERT would compute it.

Run (CPU, the acceptance shape):
    flock /tmp/kdfast-bench.lock python benchmarks/tinybert_step_memory.py --batch 8 --seq 512 --json out.json
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdfast import _backends, models, strategies, tinybert  # noqa: E402
from kdfast.bench.measure import median_ms, peak_mb  # noqa: E402


def bert_config(layers: int, hidden: int, heads: int, vocab: int) -> BertConfig:
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=4 * hidden, attention_probs_dropout_prob=0.0)


def make_batch(batch: int, seq: int, vocab: int, device: torch.device) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    labels = torch.where(torch.rand(batch, seq, device=device) < 0.15, ids, torch.full_like(ids, -100))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                labels=labels)


def kdfast_step(strategy):
    def step(batch):
        out = strategy(batch)
        out.loss.backward()
        return float(out.loss.detach())
    return step


def eager_step(teacher, student, proj):
    """HF eager TinyBERT step: attentions and hidden states from HF outputs, q/k from hooks."""
    def run(model, batch, grad):
        heads = model.config.num_attention_heads
        qk = {"q": [], "k": []}
        hooks = [getattr(layer.attention.self, name).register_forward_hook(
            lambda m, i, o, key=key: qk[key].append(o.view(*o.shape[:2], heads, -1).transpose(1, 2)))
            for layer in model.bert.encoder.layer for key, name in (("q", "query"), ("k", "key"))]
        try:
            with torch.set_grad_enabled(grad):
                out = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 token_type_ids=batch["token_type_ids"], output_attentions=True,
                                 output_hidden_states=True)
        finally:
            for hook in hooks:
                hook.remove()
        return qk["q"], qk["k"], list(out.hidden_states), out.attentions

    def step(batch):
        tq, tk, th, _ = run(teacher, batch, grad=False)
        sq, sk, sh, _ = run(student, batch, grad=True)
        loss = tinybert(sq, sk, tq, tk, sh, th, attention_mask=batch["attention_mask"].bool(), proj=proj,
                        backend="torch").loss
        loss.backward()
        return float(loss.detach())

    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--teacher-layers", type=int, default=12)
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)

    teacher = models.load_teacher(BertForMaskedLM(bert_config(args.teacher_layers, args.hidden, args.heads,
                                                              args.vocab)), dtype=torch.float32, device=device)
    student = models.build_student(bert_config(args.student_layers, args.hidden, args.heads, args.vocab),
                                   teacher=teacher)
    strategy = strategies.build("tinybert", teacher, student).train()
    batch = make_batch(args.batch, args.seq, args.vocab, device)
    teacher.set_attn_implementation("eager")
    student.set_attn_implementation("eager")  # HF's own forward only; kdfast's pass ignores it

    arms = {"kdfast": kdfast_step(strategy), "hf-eager": eager_step(teacher, student, strategy.proj)}
    results = {}
    for name, step in arms.items():
        strategy.zero_grad(set_to_none=True)
        run = functools.partial(step, batch)
        mb = peak_mb(run, device)
        ms = median_ms(run, device, warmup=1, repeats=args.repeats)
        strategy.zero_grad(set_to_none=True)
        results[name] = {"peak_mb": round(mb, 1), "median_ms": round(ms, 1)}
        print(f"{name:9s} peak {mb:9.1f} MiB   step {ms:9.1f} ms", flush=True)
    ratio = results["kdfast"]["peak_mb"] / results["hf-eager"]["peak_mb"]
    print(f"peak ratio kdfast / hf-eager = {ratio:.3f}")
    q = torch.zeros(1, 1, 1, 1, device=device)
    report = {"device": str(device), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "shape": vars(args) | {"json": None},
              "loss_backends": {op: _backends.pick(op, device, "auto", q_s=q, k_s=q, q_t=q, k_t=q, key_mask=None,
                                                   include_masked_keys=False)
                                for op in ("attention_score_mse",)},
              "results": results, "peak_ratio": round(ratio, 3)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
