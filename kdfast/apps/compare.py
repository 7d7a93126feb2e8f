"""``kdfast compare``: the equal-compute comparison.

1. Check everything a user can get wrong (config keys, strategies, budget, corpus, GLUE folder,
   tokenizer, every arm's strategy against the teacher and student shapes) before any training.
2. Tokenize and pack the corpus once; every arm gets the same data order, masks and seed.
3. Teacher: load ``teacher.path``, or pretrain a small one (kept in ``OUT/teacher``), whose cost is
   reported separately or charged to the KD arms (``--charge-teacher full|amortized:N``).
4. Pretrain each strategy under the same budget, ``train.replicates`` times with independent seeds
   (``OUT/arms/<strategy>``, replicates r >= 1 in ``OUT/arms/<strategy>/rep<r>``; kdfast.train.replicates).
5. Evaluate every arm, the teacher (ceiling) and a random-init student (floor) with the same suite
   (``kdfast/eval/suite.py``: probes, MLM-head probe, GLUE-style fine-tuning when data is there),
   then write ``results.json``, ``results.md`` and the plots with intervals and verdicts.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

from kdfast.budget.units import charge_fraction, parse_budget
from kdfast.eval import suite as suite_lib
from kdfast.runtime import distributed
from kdfast.runtime.distributed import Context
from kdfast.runtime.io import write_json
from kdfast.strategies import CACHED
from kdfast.train import checkpoint, pretrain, replicates, setup
from kdfast.train.runlog import check_tensorboard

TEACHER_ARM = "teacher"
FLOOR_ARM = "random-init"


def validate(config: dict) -> None:
    """Every check that needs no model: strategies, budgets, charge, GLUE tasks and folder."""
    from kdfast.eval import glue_tasks, stats

    for name in config["strategies"]:
        pretrain.check_strategy(name)
    pretrain.check_cache_masking(config["strategies"], config)
    budget = parse_budget(str(config["train"]["budget"]))
    charge_fraction(config["teacher"]["charge"])
    if not config["teacher"]["path"]:
        teacher_budget = parse_budget(str(config["teacher"]["budget"]))
        if config["teacher"]["charge"] != "none" and teacher_budget.unit != budget.unit:
            raise ValueError(f"charge_teacher: expected the teacher budget in the arms' unit ({budget.unit}) to "
                             f"charge it, got {teacher_budget}")
    tasks = glue_tasks.parse_tasks(config["glue"]["tasks"], config["glue"]["custom"]) if config["glue"]["tasks"] else []
    if tasks and config["glue"]["data_dir"]:
        glue_tasks.check_dir(config["glue"]["data_dir"], tasks)
    stats.check_level(config["eval"]["level"])
    replicates.count(config)
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
    """(frozen teacher, its report row). Pretrains (and keeps) a small teacher when no path is given."""
    if config["teacher"]["path"]:
        teacher = setup.load_teacher_checked(config["teacher"]["path"], tokenizer, context.device)
        loss = pretrain.heldout_mlm_loss(teacher, data.heldout, data, config["train"]["batch_size"],
                                         config["train"]["eval_batches"], context.device, False)
        return teacher, {"arm": TEACHER_ARM, "strategy": TEACHER_ARM, "shape": pretrain.shape_name(teacher),
                         "final_mlm_loss": loss, "model": config["teacher"]["path"],
                         "description": f"{config['teacher']['path']} (given)"}
    run_dir = out / TEACHER_ARM
    # the charge policy does not change the teacher (kept as "none" so caches written before still match)
    recipe = {"teacher": {**config["teacher"], "charge": "none"}, "data": config["data"], "seed": config["seed"]}
    finished = run_dir / pretrain.SUMMARY
    if finished.is_file() and json.loads(finished.read_text()).get("recipe") == recipe:
        summary = json.loads(finished.read_text())
    else:
        teacher_config = {**config, "train": {**config["train"], "budget": config["teacher"]["budget"],
                                              "lr": config["teacher"]["lr"]}}
        resume_teacher = resume and (run_dir / "checkpoints").is_dir()
        summary = pretrain.train_arm(teacher_config, "no-kd", run_dir, context, data, tokenizer, None,
                                     model_section=config["teacher"], resume=resume_teacher, label="teacher (no-kd)")
        summary["recipe"] = recipe
        if context.is_main:
            write_json(finished, summary)
    teacher = setup.load_teacher_checked(summary["model"], tokenizer, context.device)
    row = {**summary, "arm": TEACHER_ARM, "strategy": TEACHER_ARM,
           "description": f"{summary['shape']} pretrained here with MLM for {summary['budget']} "
                          f"({summary['steps']} steps, {summary['tokens']:,} tokens)"}
    row.pop("curve", None)
    return teacher, row


@dataclass
class Prepared:
    """What every arm shares: tokenizer, packed data, frozen teacher (and its report row), the
    evaluation suite, and the seconds each setup phase took."""

    tokenizer: object
    data: object
    teacher: object
    teacher_row: dict
    suite: suite_lib.Suite
    timings: Dict[str, float] = field(default_factory=dict)


def prepare(config: dict, context: Context, resume: bool = False) -> Prepared:
    """Every check, the data, the evaluation suite and the teacher (pretrained here when no path)."""
    out = Path(config["out"])
    timings: Dict[str, float] = {}
    start = time.perf_counter()
    validate(config)
    tokenizer = setup.tokenizer_for(config, out / "tokenizer", context)
    data = setup.load_data(config, tokenizer)
    suite = suite_lib.build(config, data, tokenizer)
    dry_build(config, None if not config["teacher"]["path"] else
              setup.load_teacher_checked(config["teacher"]["path"], tokenizer, torch.device("cpu")),
              tokenizer, data.train.shape[1])
    timings["setup (tokenizer, data, probe tasks, checks)"] = time.perf_counter() - start
    start = time.perf_counter()
    teacher, teacher_row = teacher_model(config, context, data, tokenizer, out, resume)
    timings["teacher (pretraining or loading)"] = time.perf_counter() - start
    return Prepared(tokenizer, data, teacher, teacher_row, suite, timings)


def train_arms(config: dict, prepared: Prepared, context: Context, arms_dir: Path, resume: bool = False,
               reuse: bool = False) -> List[dict]:
    """Pretrain every strategy of the config under ``train.budget``, ``train.replicates`` times, into
    ``arms_dir/<strategy>`` (replicate r >= 1 in ``rep<r>`` under it); a finished replicate (its summary
    written) is reused when ``resume`` or ``reuse`` is set. One row per strategy: replicate 0's summary
    with ``replicates`` (every replicate's summary). A cached arm first builds (or reuses) its teacher
    cache in ``OUT/teacher-cache``, whose cost is charged like the teacher's."""
    from kdfast.apps.teacher_cache import for_strategy

    fraction = charge_fraction(config["teacher"]["charge"])
    charge = fraction * prepared.teacher_row.get("budget_used", 0.0)
    unit = parse_budget(str(config["train"]["budget"])).unit
    rows = []
    for name in config["strategies"]:
        summaries = []
        for index, replicate in enumerate(replicates.configs(config)):
            run_dir = replicates.run_dir(Path(arms_dir) / name, index)
            done = run_dir / pretrain.SUMMARY
            if (resume or reuse) and done.is_file():
                summary = json.loads(done.read_text())
            else:
                # a replicate's cache holds its own static masks (its seed): replicate r >= 1 under ROOT/rep<r>
                cache = for_strategy(replicate, name, prepared.teacher, prepared.tokenizer, prepared.data, context,
                                     Path(config["out"]) / "teacher-cache", index) if name in CACHED else None
                offset = 0.0 if name == "no-kd" else charge + (fraction * cache.cost(unit) if cache else 0.0)
                label = name if index == 0 else f"{name} rep{index}"
                summary = pretrain.train_arm(replicate, name, run_dir, context, prepared.data, prepared.tokenizer,
                                             prepared.teacher, resume=resume, offset=offset, label=label,
                                             teacher_cache=cache)
            summaries.append(summary)
        rows.append(arm_row(config, name, summaries))
    return rows


def arm_row(config: dict, name: str, summaries: List[dict]) -> dict:
    """One strategy's row: replicate 0's summary, with ``replicates`` (every replicate's, with its index and seed)."""
    runs = [{**summary, "replicate": index, "seed": replicate["seed"]}
            for index, (summary, replicate) in enumerate(zip(summaries, replicates.configs(config)))]
    return {**runs[0], "arm": f"{name} {runs[0]['shape']}", "replicates": runs}


def finished_row(config: dict, name: str, base: Path, where: Callable[[Path], Path] = lambda run: run) -> "dict | None":
    """The row of strategy ``name`` trained in ``base`` (replicate r in ``replicates.run_dir(base, r)``, its
    summary in ``where(run_dir)``), or None while a replicate has no summary."""
    paths = [where(replicates.run_dir(base, r)) / pretrain.SUMMARY for r in range(replicates.count(config))]
    if not all(p.is_file() for p in paths):
        return None
    return arm_row(config, name, [json.loads(p.read_text()) for p in paths])


def random_init_row(config: dict, prepared: Prepared, out: Path, context: Context) -> dict:
    """The floor: students of the arms' shape and initial weights (replicate r: replicate r's seed), never
    trained; one per replicate, in ``OUT/random-init`` (replicate r >= 1 in ``rep<r>`` under it)."""
    from kdfast.models import build_student

    summaries = []
    for index, replicate in enumerate(replicates.configs(config)):
        model_dir = replicates.run_dir(out / FLOOR_ARM, index) / "model"
        torch.manual_seed(replicate["seed"])  # the arms' initial weights (train_arm seeds the same way)
        student = build_student(pretrain.student_config(config["student"], len(prepared.tokenizer),
                                                        prepared.data.train.shape[1], prepared.teacher),
                                teacher=prepared.teacher, tokenizer=prepared.tokenizer,
                                init=config["student"]["init"], device="cpu")
        if context.is_main and not (model_dir / "config.json").is_file():
            student.save_pretrained(str(model_dir))
            prepared.tokenizer.save_pretrained(str(model_dir))
        summaries.append({"model": str(model_dir), "replicate": index, "seed": replicate["seed"]})
    distributed.barrier(context)
    return {"arm": FLOOR_ARM, "strategy": FLOOR_ARM, "shape": pretrain.shape_name(student), "budget_used": 0.0,
            "steps": 0, "tokens": 0, "epochs": 0.0, "trains_mlm_head": False, "model": summaries[0]["model"],
            "replicates": summaries,
            "description": "random-init student (same shape and initial weights as the arms, zero budget)"}


def reference_rows(config: dict, prepared: Prepared, context: Context) -> List[dict]:
    """The rows evaluated beside the arms: the teacher (ceiling) and the random-init student (floor)."""
    rows = [prepared.teacher_row] if config["glue"]["evaluate_teacher"] or config["eval"]["probe_tasks"] else []
    if config["eval"]["random_init"]:
        rows.append(random_init_row(config, prepared, Path(config["out"]), context))
    return rows


def evaluate_rows(config: dict, prepared: Prepared, rows: List[dict], context: Context) -> dict:
    """Evaluate every row (rank 0; evaluations stored beside each model), then add ``metrics`` with
    intervals to each row and return the analysis (verdicts against No-KD, known-effect checks)."""
    from kdfast.eval import compare_report as report

    evaluations, seconds = {}, {}
    if context.is_main:
        for row in rows:
            start = time.perf_counter()
            cache = Path(config["out"]) / "eval" / row["arm"].replace(" ", "_").replace("/", "-")
            evaluations[row["arm"]] = [  # one per replicate (the teacher is one model, held fixed)
                suite_lib.evaluate(prepared.suite, run["model"], context.device, cache,
                                   row["arm"] + (f" rep{run['replicate']}" if run.get("replicate") else ""))
                for run in row.get("replicates") or [row]]
            seconds[row["arm"]] = time.perf_counter() - start
    analysis = report.analyse(rows, evaluations, prepared.suite.higher_is_better, prepared.suite.level) \
        if context.is_main else {}
    analysis["seconds"] = seconds
    return analysis


def compare(config: dict, context: Context, resume: bool = False) -> dict:
    from kdfast.cache.serve import report_note
    from kdfast.eval import compare_report as report

    out = Path(config["out"])
    prepared = prepare(config, context, resume)
    start = time.perf_counter()
    rows = train_arms(config, prepared, context, out / "arms", resume, reuse=resume)
    timings = {**prepared.timings, "arms (pretraining, budget-clocked)": time.perf_counter() - start}
    teacher_row = prepared.teacher_row
    extra = reference_rows(config, prepared, context)
    start = time.perf_counter()
    analysis = evaluate_rows(config, prepared, [*rows, *extra], context)
    timings["evaluation (all rows; stored evaluations cost nothing)"] = time.perf_counter() - start
    timings.update({f"  evaluation of {arm}": s for arm, s in analysis.pop("seconds").items()})
    notes = list(prepared.suite.notes)
    if not prepared.suite.glue:
        notes.append("No GLUE evaluation: no GLUE data was found offline (pass --glue-dir DIR or glue.data_dir); "
                     "the probes and the MLM-head probe are the downstream evaluation.")
    unit = parse_budget(str(config["train"]["budget"])).unit
    notes += [report_note(row, charge_fraction(config["teacher"]["charge"]), unit) for row in rows
              if row.get("teacher_cache")]
    if config["teacher"]["charge"] != "none":
        charge = max((row.get("teacher_charge", 0.0) for row in rows), default=0.0)  # No-KD is charged 0
        notes.append(f"KD arms were charged {charge:.4g} {rows[0]['budget_unit']} of teacher pretraining "
                     f"({config['teacher']['charge']}).")
    result = {"name": config["name"], "budget": str(parse_budget(str(config["train"]["budget"]))),
              "rows": [*rows, *extra], "analysis": analysis, "timings": timings, "notes": notes,
              **described_inputs(config, prepared, teacher_row)}
    return publish(result, out, report.write, context)


def described_inputs(config: dict, prepared, teacher_row: dict) -> dict:
    """What a compare or sweep result says about its inputs: corpus, unique tokens, teacher, fingerprint,
    evaluation suite and the config."""
    from kdfast.eval import fingerprint

    return {"corpus": ", ".join(config["data"]["train"]), "unique_tokens": prepared.data.unique_tokens,
            "teacher": teacher_row, "evaluation": prepared.suite.describe(), "config": config,
            "fingerprint": fingerprint.of(prepared.tokenizer, prepared.data, prepared.teacher,
                                          config["data"]["train"], teacher_row)}


def publish(result: dict, out: Path, write, context: Context) -> dict:
    """``write(result, out)`` on the main rank, then every rank waits for it; returns ``result``."""
    if context.is_main:
        write(result, out)
    distributed.barrier(context)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    setup.add_common_arguments(parser)
    parser.add_argument("--glue-dir", default=None, help="local GLUE-style {task}/{train,validation}.jsonl folder")
    parser.add_argument("--charge-teacher", default=None, help="none | full | amortized:N (teacher cost to KD arms)")
    parser.add_argument("--strategies", default=None, help="comma-separated arms (default: the config's)")
    parser.add_argument("--task-spec", default=None,
                        help="YAML/JSON of custom tasks {name: {columns, num_labels, metrics}}; name them in "
                             "glue.tasks")
    parser.add_argument("--level", default=None, help="interval level of estimates and tests, in (0, 1)")
    parser.add_argument("--replicates", default=None, type=int,
                        help="pretraining runs per arm, R (train.replicates; better/worse calls need R >= 3)")


def load_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> dict:
    """The config of a compare-style command line (``add_arguments``), plus ``extra`` overrides."""
    from kdfast.eval import glue_tasks

    extra = [*extra, *(f"{key}={value}" for key, value in (("glue.data_dir", args.glue_dir),
                                                          ("eval.level", args.level),
                                                          ("teacher.charge", args.charge_teacher),
                                                          ("train.replicates", args.replicates))
                       if value is not None)]
    if args.task_spec:
        extra.append(f"glue.custom={json.dumps(glue_tasks.read_spec_file(args.task_spec))}")
    if args.strategies:
        extra.append(f"strategies={[s.strip() for s in args.strategies.split(',') if s.strip()]!r}")
    return setup.resolve_auto(setup.load_config(args, extra))


def run_reported(config: dict, command: Callable[[dict, Context, bool], dict], resume: bool, stem: str) -> int:
    """Run ``command`` (``compare`` or ``sweep``); a crash writes ``OUT/crash.json``, success prints
    ``OUT/<stem>.md`` and the files written."""
    context = distributed.init(config["device"], config["dist_timeout"])
    out = Path(config["out"])
    try:
        result = command(config, context, resume)
    except Exception as error:
        if context.is_main:
            checkpoint.write_crash(out, error)
        raise
    if context.is_main:
        print((out / f"{stem}.md").read_text())
        print(f"report: {out / f'{stem}.md'}, {out / f'{stem}.json'}, " + ", ".join(result["plots"]))
    return 0


def run(args: argparse.Namespace) -> int:
    return run_reported(load_config(args), compare, args.resume, "results")
