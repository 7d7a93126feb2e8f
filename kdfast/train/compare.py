"""``kdfast compare``: the equal-compute comparison.

1. Check everything a user can get wrong (config keys, strategies, budget, corpus, GLUE folder,
   tokenizer, every arm's strategy against the teacher and student shapes) before any training.
2. Tokenize and pack the corpus once; every arm gets the same data order, masks and seed.
3. Teacher: load ``teacher.path``, or pretrain a small one (cached in ``OUT/teacher``), whose cost is
   reported separately or charged to the KD arms (``--charge-teacher full|amortized:N``).
4. Pretrain each strategy under the same budget (``OUT/arms/<strategy>``), then fine-tune each
   student (and the teacher) on GLUE, then write ``results.json``, ``results.md`` and the plots.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from kdfast.budget.units import parse_budget
from kdfast.train import checkpoint, distributed, pretrain, setup
from kdfast.train.distributed import Context
from kdfast.train.runlog import check_tensorboard

TEACHER_ARM = "teacher"


def charge_fraction(text: str) -> float:
    """``none`` -> 0, ``full`` -> 1, ``amortized:N`` -> 1/N of the teacher's cost per KD arm."""
    if text in ("none", "full"):
        return 0.0 if text == "none" else 1.0
    kind, _, count = str(text).partition(":")
    if kind == "amortized" and count.isdigit() and int(count) > 0:
        return 1.0 / int(count)
    raise ValueError(f"charge_teacher: expected none, full or amortized:N (N > 0 students), got {text!r}")


def validate(config: dict) -> None:
    """Every check that needs no model: strategies, budgets, charge, GLUE tasks and folder."""
    from kdfast.eval import glue_tasks

    for name in config["strategies"]:
        pretrain.check_strategy(name)
    budget = parse_budget(str(config["train"]["budget"]))
    charge_fraction(config["teacher"]["charge"])
    if not config["teacher"]["path"]:
        teacher_budget = parse_budget(str(config["teacher"]["budget"]))
        if config["teacher"]["charge"] != "none" and teacher_budget.unit != budget.unit:
            raise ValueError(f"charge_teacher: expected the teacher budget in the arms' unit ({budget.unit}) to "
                             f"charge it, got {teacher_budget}")
    tasks = glue_tasks.parse_tasks(config["glue"]["tasks"]) if config["glue"]["tasks"] else []
    if tasks and config["glue"]["data_dir"]:
        glue_tasks.check_dir(config["glue"]["data_dir"], tasks)
    check_tensorboard(config["train"]["tensorboard"])


def dry_build(config: dict, teacher, tokenizer, seq_len: int) -> None:
    """Build every arm's student and strategy once (then drop them), so a strategy that cannot work
    with these shapes fails before the first step."""
    from transformers import BertForMaskedLM

    from kdfast import strategies
    from kdfast.models import build_student

    if teacher is None:  # the teacher that will be pretrained, with random weights
        teacher = BertForMaskedLM(pretrain.student_config(config["teacher"], len(tokenizer), seq_len)).eval()
    for name in config["strategies"]:
        student = build_student(pretrain.student_config(config["student"], len(tokenizer), seq_len, teacher),
                                teacher=teacher, init=config["student"]["init"], device="cpu")
        strategies.build(name, teacher, student, formulation=config["formulation"])


def teacher_model(config: dict, context: Context, data, tokenizer, out: Path, resume: bool):
    """(frozen teacher, its report row). Pretrains and caches a small teacher when no path is given."""
    if config["teacher"]["path"]:
        teacher = setup.load_teacher_checked(config["teacher"]["path"], tokenizer, context.device)
        loss = pretrain.heldout_mlm_loss(teacher, data.heldout, data, config["train"]["batch_size"],
                                         config["train"]["eval_batches"], context.device, False)
        return teacher, {"arm": TEACHER_ARM, "strategy": TEACHER_ARM, "shape": pretrain.shape_name(teacher),
                         "final_mlm_loss": loss, "model": config["teacher"]["path"],
                         "description": f"{config['teacher']['path']} (given)"}
    run_dir = out / TEACHER_ARM
    recipe = {"teacher": config["teacher"], "data": config["data"], "seed": config["seed"]}
    cached = run_dir / pretrain.SUMMARY
    if cached.is_file() and json.loads(cached.read_text()).get("recipe") == recipe:
        summary = json.loads(cached.read_text())
    else:
        teacher_config = {**config, "train": {**config["train"], "budget": config["teacher"]["budget"],
                                              "lr": config["teacher"]["lr"]}}
        resume_teacher = resume and (run_dir / "checkpoints").is_dir()
        summary = pretrain.train_arm(teacher_config, "no-kd", run_dir, context, data, tokenizer, None,
                                     model_section=config["teacher"], resume=resume_teacher, label="teacher (no-kd)")
        summary["recipe"] = recipe
        if context.is_main:
            pretrain.write_json(cached, summary)
    teacher = setup.load_teacher_checked(summary["model"], tokenizer, context.device)
    row = {**summary, "arm": TEACHER_ARM, "strategy": TEACHER_ARM,
           "description": f"{summary['shape']} pretrained here with MLM for {summary['budget']} "
                          f"({summary['steps']} steps, {summary['tokens']:,} tokens)"}
    row.pop("curve", None)
    return teacher, row


def glue_scores(config: dict, model_path: str, context: Context) -> dict:
    from kdfast.eval import glue, glue_tasks

    section = config["glue"]
    return glue.evaluate_model(model_path, glue_tasks.parse_tasks(section["tasks"]), section["data_dir"],
                               section["seeds"], section["lrs"], section["batch_sizes"], section["epochs"],
                               section["seq_len"], context.device, warmup=section["warmup"],
                               weight_decay=section["weight_decay"],
                               max_train_examples=section["max_train_examples"],
                               max_eval_examples=section["max_eval_examples"],
                               progress=lambda message: print(f"  glue {message}", file=sys.stderr))


def compare(config: dict, context: Context, resume: bool = False) -> dict:
    from kdfast.eval import fingerprint, glue, report

    out = Path(config["out"])
    validate(config)
    tokenizer = setup.tokenizer_for(config, out / "tokenizer", context)
    data = setup.load_data(config, tokenizer)
    dry_build(config, None if not config["teacher"]["path"] else
              setup.load_teacher_checked(config["teacher"]["path"], tokenizer, torch.device("cpu")),
              tokenizer, data.train.shape[1])
    teacher, teacher_row = teacher_model(config, context, data, tokenizer, out, resume)
    charge = charge_fraction(config["teacher"]["charge"]) * teacher_row.get("budget_used", 0.0)
    rows = []
    for name in config["strategies"]:
        run_dir = out / "arms" / name
        done = run_dir / pretrain.SUMMARY
        if resume and done.is_file():
            summary = json.loads(done.read_text())
        else:
            summary = pretrain.train_arm(config, name, run_dir, context, data, tokenizer, teacher, resume=resume,
                                         offset=charge if name != "no-kd" else 0.0, label=name)
        rows.append({**summary, "arm": f"{name} {summary['shape']}"})
    notes = []
    tasks = config["glue"]["tasks"] if context.is_main else []
    for row in [*rows, teacher_row] if tasks else []:
        if row is teacher_row and not config["glue"]["evaluate_teacher"]:
            continue
        row["glue"] = glue_scores(config, row["model"], context)
        row["glue_average"] = glue.average(row["glue"])
    if not tasks:
        notes.append("No GLUE evaluation: no GLUE data was found offline (pass --glue-dir DIR or glue.data_dir).")
    if config["teacher"]["charge"] != "none":
        notes.append(f"KD arms were charged {charge:.4g} {rows[0]['budget_unit']} of teacher pretraining "
                     f"({config['teacher']['charge']}).")
    result = {"name": config["name"], "budget": str(parse_budget(str(config["train"]["budget"]))),
              "corpus": ", ".join(config["data"]["train"]), "unique_tokens": data.unique_tokens,
              "fingerprint": fingerprint.of(tokenizer, data, teacher, config["data"]["train"], teacher_row),
              "tasks": list(tasks), "glue_seeds": config["glue"]["seeds"], "teacher": teacher_row, "arms": rows,
              "notes": notes, "config": config}
    if context.is_main:
        report.write(result, out)
    distributed.barrier(context)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    setup.add_common_arguments(parser)
    parser.add_argument("--glue-dir", default=None, help="local GLUE-style {task}/{train,validation}.jsonl folder")
    parser.add_argument("--charge-teacher", default=None, help="none | full | amortized:N (teacher cost to KD arms)")
    parser.add_argument("--strategies", default=None, help="comma-separated arms (default: the config's)")


def load_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> dict:
    """The config of a compare-style command line (``add_arguments``), plus ``extra`` overrides."""
    extra = [*extra, *(f"{key}={value}" for key, value in (("glue.data_dir", args.glue_dir),
                                                          ("teacher.charge", args.charge_teacher))
                       if value is not None)]
    if args.strategies:
        extra.append(f"strategies={[s.strip() for s in args.strategies.split(',') if s.strip()]!r}")
    return setup.resolve_auto(setup.load_config(args, extra))


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    context = distributed.init(config["device"])
    out = Path(config["out"])
    try:
        result = compare(config, context, args.resume)
    except Exception as error:
        if context.is_main:
            checkpoint.write_crash(out, error)
        raise
    if context.is_main:
        print((out / "results.md").read_text())
        print(f"report: {out / 'results.md'}, {out / 'results.json'}, " + ", ".join(result["plots"]))
    return 0
