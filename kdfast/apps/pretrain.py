"""``kdfast pretrain``: pretrain one student under a budget (the loop: ``kdfast.train.pretrain.train_arm``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from kdfast.budget.units import parse_budget
from kdfast.runtime import distributed
from kdfast.strategies import CACHED
from kdfast.train import checkpoint
from kdfast.train.pretrain import check_cache_masking, check_strategy, train_arm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kdfast.train.setup import add_common_arguments

    parser.add_argument("--strategy", required=True, help="no-kd, vanilla, distilbert, tinybert, minilm, minilm_v2, "
                        "vanilla-cached-topk, vanilla-cached-sample")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from kdfast.train import setup

    config = setup.resolve_auto(setup.load_config(args))
    context = distributed.init(config["device"])
    run_dir = Path(config["out"])
    try:
        check_strategy(args.strategy)
        check_cache_masking([args.strategy], config)
        parse_budget(str(config["train"]["budget"]))
        tokenizer = setup.tokenizer_for(config, run_dir / "tokenizer", context)
        data = setup.load_data(config, tokenizer)
        teacher, cache = None, None
        if args.strategy != "no-kd":
            if not config["teacher"]["path"]:
                raise ValueError(f"teacher: expected --teacher PATH for strategy {args.strategy!r}, got none "
                                 f"(kdfast compare pretrains a small teacher for the tiny preset)")
            teacher = setup.load_teacher_checked(config["teacher"]["path"], tokenizer, context.device)
        if args.strategy in CACHED:
            from kdfast.apps.teacher_cache import for_strategy

            cache = for_strategy(config, args.strategy, teacher, tokenizer, data, context, run_dir / "teacher-cache")
        summary = train_arm(config, args.strategy, run_dir, context, data, tokenizer, teacher, resume=args.resume,
                            teacher_cache=cache)
    except Exception as error:
        if context.is_main:
            checkpoint.write_crash(run_dir, error)
        raise
    if context.is_main:
        print(f"{summary['strategy']}: {summary['steps']} steps, {summary['tokens']:,} tokens, budget used "
              f"{summary['budget_used']:.4g} {summary['budget_unit']}, held-out MLM loss "
              f"{summary['final_mlm_loss']:.4f}; model in {summary['model']}")
    return 0
