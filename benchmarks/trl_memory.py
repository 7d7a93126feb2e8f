"""Peak memory of the on-policy distillation loss in TRL: TRL's own trainers vs kdfast's, in one run.

One on-policy batch (the student's sampled completions of random prompts, generated once by TRL's
``GKDTrainer.generate_on_policy_outputs``) goes through ``compute_loss`` + backward of four trainers
built on the same random-weight Llama student and teacher (V = 32,000, nothing downloaded):

- ``trl-gkd``: ``trl.experimental.gkd.GKDTrainer``: both models' full [B, L, V] logits, then
  ``generalized_jsd_loss`` on them;
- ``kdfast-gkd``: ``kdfast.integrations.trl.KDFastGKDTrainer``: base models + ``kdfast.fused_linear_kd``;
- ``trl-distillation``: ``trl.DistillationTrainer``: TRL's chunked loss (tiles of up to 4096 tokens x
  32768 vocabulary entries);
- ``kdfast-distillation``: ``kdfast.integrations.trl.KDFastDistillationTrainer``.

Memory: the peak of live tensor bytes above those live before the call (``kdfast.bench.measure.peak_mb``:
the profiler's allocator events on CPU, ``max_memory_allocated`` on CUDA); kdfast's kept CPU chunk
workspace is freed first, so its chunk counts. fp32, no autocast.

Run (CPU, the acceptance shape):
    flock /tmp/kdfast-bench.lock python benchmarks/trl_memory.py --json benchmarks/results/trl_memory_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kdfast  # noqa: E402
from kdfast.bench.measure import median_ms, peak_mb  # noqa: E402
from kdfast.functions.vocab_kd import chunk_rows  # noqa: E402
from kdfast.integrations.trl import KDFastDistillationTrainer, KDFastGKDTrainer  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import trl  # noqa: E402
    from trl import DistillationConfig, DistillationTrainer  # noqa: E402
    from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

PAD, EOS = 0, 1


def tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    words = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i for i in range(2, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left")


def llama(layers: int, hidden: int, vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                                        intermediate_size=4 * hidden, max_position_embeddings=1024,
                                        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None))


def prompts_batch(batch: int, length: int, vocab: int) -> dict:
    """Random prompts of ``length`` tokens, the first half of the rows left-padded by a quarter."""
    ids = torch.randint(2, vocab, (batch, length))
    mask = torch.ones_like(ids)
    mask[: batch // 2, : length // 4] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100), "prompts": ids,
            "prompt_attention_mask": mask}


def distillation_batch(gkd: dict, prompt_length: int) -> dict:
    """The same sequences in DistillationTrainer's layout (prompt / completion ids and masks)."""
    return {"prompt_ids": gkd["input_ids"][:, :prompt_length], "prompt_mask": gkd["attention_mask"][:, :prompt_length],
            "completion_ids": gkd["input_ids"][:, prompt_length:],
            "completion_mask": gkd["attention_mask"][:, prompt_length:]}


def loss_step(trainer, batch: dict):
    """compute_loss + backward (gradients accumulate: free them between measured calls)."""
    def step():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        return float(loss.detach())
    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--completion", type=int, default=240)
    parser.add_argument("--student", default="2x256", help="layers x hidden")
    parser.add_argument("--teacher", default="2x512", help="layers x hidden")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cpu")
    (ls, hs), (lt, ht) = (map(int, spec.split("x")) for spec in (args.student, args.teacher))
    student, teacher = llama(ls, hs, args.vocab, seed=0), llama(lt, ht, args.vocab, seed=1)
    student.generation_config.eos_token_id = None  # full-length completions: the shape is the one asked for
    processing = tokenizer(args.vocab)
    out = tempfile.mkdtemp()
    common = dict(output_dir=out, report_to=[], use_cpu=True, bf16=False, save_strategy="no", beta=args.beta,
                  per_device_train_batch_size=args.batch)
    gkd_args = GKDConfig(lmbda=1.0, temperature=1.0, max_new_tokens=args.completion, **common)
    prompts = Dataset.from_list([{"prompt": "w2 w3"}] * args.batch)
    distillation_args = DistillationConfig(temperature=1.0, max_completion_length=args.completion, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainers = {
            "trl-gkd": GKDTrainer(model=student, teacher_model=teacher, args=gkd_args, processing_class=processing,
                                  data_collator=lambda rows: rows, train_dataset=prompts),
            "kdfast-gkd": KDFastGKDTrainer(model=student, teacher_model=teacher, args=gkd_args,
                                           processing_class=processing, data_collator=lambda rows: rows,
                                           train_dataset=prompts),
            "trl-distillation": DistillationTrainer(model=student, teacher_model=teacher, args=distillation_args,
                                                    processing_class=processing, train_dataset=prompts),
            "kdfast-distillation": KDFastDistillationTrainer(model=student, teacher_model=teacher,
                                                             args=distillation_args, processing_class=processing,
                                                             train_dataset=prompts),
        }
        torch.manual_seed(0)
        with torch.no_grad():
            ids, mask, labels = GKDTrainer.generate_on_policy_outputs(
                student, prompts_batch(args.batch, args.prompt, args.vocab), trainers["trl-gkd"].generation_config)
    student.train()
    gkd = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    batches = {name: gkd if name.endswith("gkd") else distillation_batch(gkd, args.prompt) for name in trainers}
    targets = int((labels[:, 1:] != -100).sum())
    results = {}
    for name, trainer in trainers.items():
        step = loss_step(trainer, batches[name])
        loss = step()
        student.zero_grad(set_to_none=True)  # the measured call allocates the gradients, frees nothing older
        kdfast.release_workspaces()
        mb = peak_mb(step, device)
        ms = median_ms(step, device, warmup=0, repeats=args.repeats)
        results[name] = {"loss": round(loss, 6), "peak_mb": round(mb, 1), "median_ms": round(ms, 1)}
        print(f"{name:20s} loss {loss:.6f}  peak {mb:8.1f} MiB  loss+backward {ms:8.1f} ms", flush=True)
    logits_mb = args.batch * ids.shape[1] * args.vocab * 4 / 2**20
    rows = chunk_rows(targets, args.vocab, device)
    report = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "trl": trl.__version__, "threads": torch.get_num_threads(),
              "shape": {"vocab": args.vocab, "batch": args.batch, "sequence": ids.shape[1], "prompt": args.prompt,
                        "completion": args.completion, "target_tokens": targets, "student": args.student,
                        "teacher": args.teacher, "beta": args.beta, "dtype": "float32"},
              "one_logits_BLV_mb": round(logits_mb, 1),
              "kdfast_chunk": {"rows": rows, "two_fp32_chunks_mb": round(2 * rows * args.vocab * 4 / 2**20, 1)},
              "results": results,
              "peak_ratio_gkd": round(results["kdfast-gkd"]["peak_mb"] / results["trl-gkd"]["peak_mb"], 3),
              "peak_ratio_distillation": round(results["kdfast-distillation"]["peak_mb"]
                                               / results["trl-distillation"]["peak_mb"], 3)}
    print(json.dumps({k: report[k] for k in ("one_logits_BLV_mb", "kdfast_chunk", "peak_ratio_gkd",
                                             "peak_ratio_distillation")}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
