"""The ``slmlab`` command line: thin verbs over the library functions the chapters call."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__

Verb = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line of message after the usage, and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _budget(args: argparse.Namespace) -> int:
    from .models import ModelConfig, budget

    published = budget.published_models()
    if args.model in published:
        config = published[args.model].config
    elif Path(args.model).is_file() or Path(args.model, "config.json").is_file():
        path = Path(args.model)
        config = ModelConfig.from_json(path / "config.json" if path.is_dir() else path)
    else:
        raise ValueError(
            f"{args.model!r} is neither a published model ({', '.join(published)}) nor a "
            "config.json file or checkpoint directory"
        )
    counts = budget.param_count(config)
    result = {
        "model": args.model,
        "config": str(config),
        "params": {
            "total": counts.total,
            "embedding": counts.embedding,
            "attention": counts.attention,
            "mlp": counts.mlp,
            "norms": counts.norms,
            "lm_head": counts.lm_head,
        },
        # Integer formats carry one fp16 scale per group of 32 weights, as in chapter 01's table.
        "weight_bytes": {
            dt: budget.weight_bytes(config, dt, group_size=32 if dt.startswith("int") else None)
            for dt in ("fp32", "bf16", "int8", "int4")
        },
        "kv_cache_bytes_per_token_bf16": budget.kv_cache_bytes_per_token(config, "bf16"),
        "forward_flops_per_token": budget.flops_per_token(config, args.context),
        "context_length": args.context,
    }
    print(f"{args.model}: {config}")
    print(
        f"  parameters      {counts.total / 1e6:10.1f} M  (embedding share {counts.embedding_share:.1%})"
    )
    for dtype, nbytes in result["weight_bytes"].items():
        note = " (g32 scales)" if dtype.startswith("int") else ""
        print(f"  weights {dtype:>5}   {nbytes / 2**20:10.1f} MiB{note}")
    print(f"  KV cache (bf16) {result['kv_cache_bytes_per_token_bf16'] / 1024:10.1f} KiB per token")
    print(
        f"  forward FLOPs   {result['forward_flops_per_token'] / 1e9:10.3f} G per token at context {args.context}"
    )
    _write_json(args.json, result)
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load, load_chat_settings, load_tokenizer
    from .env import pick_device
    from .infer import TokenHealer, generate, render_chat

    device = pick_device(args.device)
    where = _checkpoint_path(args.checkpoint, quiet=True)
    model = load(where, device=device)
    tokenizer = load_tokenizer(where)
    text = args.prompt
    if args.chat:
        settings = load_chat_settings(where)
        if not settings.get("chat_template"):
            raise ValueError(f"{where}: has no chat template (tokenizer_config.json): drop --chat")
        tokens = {k: v for k, v in settings.items() if k.endswith("_token")}
        text = render_chat(settings["chat_template"], [{"role": "user", "content": text}], **tokens)
    prompt = tokenizer.encode(text, add_special_tokens=not args.chat).ids
    sampling = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop_strings=args.stop,
        tokenizer=tokenizer,
        seed=args.seed,
    )
    if args.token_healing:
        _, spelled = TokenHealer(tokenizer).generate(model, prompt, args.max_new_tokens, **sampling)
        print(args.prompt + spelled.decode("utf-8", errors="replace"))
        return 0
    ids = generate(model, torch.tensor([prompt]), args.max_new_tokens, **sampling)
    print(tokenizer.decode(ids[0].tolist()))
    return 0


def _serve(args: argparse.Namespace) -> int:
    """`slmlab.serve`'s app under uvicorn until interrupted."""
    from .checkpoint import load, load_chat_settings, load_tokenizer
    from .serve import BackgroundServer, create_app

    if not 0 < args.port < 65536 or args.max_batch < 1 or args.max_queue < 0:
        raise ValueError("--port must be in 1..65535, --max-batch >= 1, --max-queue >= 0")
    where = _checkpoint_path(args.model, quiet=False)
    app = create_app(
        load(where),
        load_tokenizer(where),
        load_chat_settings(where),
        name=args.name or args.model,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        engine_thread=False,
    )
    # Ctrl-C and `kill` (how a container is stopped) both end it cleanly, also where the shell
    # started it with SIGINT ignored (a background job), as uvicorn's own runner does.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.default_int_handler)
    # The HTTP side on a thread, the model on this one (see slmlab.serve.Engine).
    server = BackgroundServer(app, host=args.host, port=args.port)
    print(f"serving {args.name or args.model} at {server.url}", flush=True)
    try:
        app.state.engine.run(until=lambda: not server.running)
    except KeyboardInterrupt:
        if not server.stop():
            # A client still holds a connection: exit anyway (the thread is a daemon's).
            print("slmlab serve: connections still open after 10 s; exiting", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    """A conversation on the terminal, or one turn a line of standard input when it is piped."""
    from .checkpoint import load, load_chat_settings, load_tokenizer
    from .env import pick_device
    from .infer import Chat

    where = _checkpoint_path(args.model, quiet=not sys.stdin.isatty())
    chat = Chat(
        load(where, device=pick_device(args.device)),
        load_tokenizer(where),
        load_chat_settings(where),
        system=args.system,
    )
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        chat.say(
            line.rstrip("\n"),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            stream=lambda piece: print(piece, end="", flush=True),
        )
        print(flush=True)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert_gguf

    print(convert_gguf(args.gguf, args.out, source=str(args.gguf)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from . import export

    if args.quant is not None and args.to == "executorch":
        raise ValueError("--quant: slmlab's ExecuTorch export writes fp32 (XNNPACK) only")
    quants = {"gguf": export.GGUF_TYPES, "onnx": export.ONNX_QUANTS}
    if args.quant is not None and args.quant not in quants[args.to]:
        raise ValueError(f"--quant {args.quant!r}: {args.to} takes one of {list(quants[args.to])}")
    where = _checkpoint_path(args.model, quiet=False)
    if args.to == "gguf":
        out = export.to_gguf(where, args.out, quant=args.quant or "f32", name=args.name)
    elif args.to == "onnx":
        out = export.to_onnx(where, args.out, quant=args.quant or "fp32")
    else:
        out = export.to_executorch(where, args.out)
    print(f"{out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig
    from .zoo import recipe, resolve, train

    if (args.recipe is None) == (args.config is None):
        raise ValueError("give exactly one of --recipe NAME or --config FILE")
    config = recipe(args.recipe) if args.recipe else TrainConfig.from_file(args.config)
    config = resolve(config, progress=not args.quiet)  # init_from may name a zoo model
    if args.seed is not None:
        config = config.replace(seed=args.seed)
    result = train(
        config,
        args.out,
        max_steps=args.max_steps,
        resume=args.resume,
        progress=not args.quiet,
        parallel=args.parallel,
        device=args.device,
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process reports
        print(
            f"step {result.step}: train loss {result.train_loss:.4f}"
            + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else "")
            + f"; checkpoint {result.checkpoint}"
        )
    return 0


def _distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig
    from .train import TrainConfig
    from .zoo import RECIPES, recipe, resolve, train

    student = args.student_config
    config = recipe(student) if student in RECIPES else TrainConfig.from_file(student)
    settings = dict(config.distill or {})
    given = {"teacher": args.teacher, "loss": args.loss, "temperature": args.temperature,
             "alpha": args.alpha, "beta": args.beta, "cache": args.cache, "top_k": args.top_k,
             "on_policy": args.on_policy, "relations": args.relations,
             "features": args.features}  # fmt: skip
    settings.update({k: v for k, v in given.items() if v is not None})
    if "teacher" not in settings:
        raise ValueError(f"{student} names no teacher: give --teacher CHECKPOINT or zoo name")
    changes = {"distill": settings}
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.steps is not None:
        changes["steps"] = args.steps
        changes["warmup_steps"] = min(config.warmup_steps, args.steps)
    config = config.replace(**changes)
    DistillConfig.of(config)  # a wrong setting is named before the teacher is trained or loaded
    config = resolve(config, progress=not args.quiet)  # the teacher may name a zoo model
    result = train(
        config, args.out, max_steps=args.max_steps, resume=args.resume,
        progress=not args.quiet, device=args.device,
    )  # fmt: skip
    print(
        f"step {result.step}: train loss {result.train_loss:.4f}"
        + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else "")
        + f"; checkpoint {result.checkpoint}"
    )
    return 0


# The `finetune` options passed on to `slmlab.finetune.finetune_config` where given.
_FINETUNE_OPTIONS = ("data", "examples", "steps", "lr", "embedding_lr_scale", "batch_size",
                     "seq_len", "rank", "alpha", "seed", "beta",
                     "activation_checkpointing", "head_chunk", "precision")  # fmt: skip


def _grpo(args: argparse.Namespace, base) -> int:
    from .finetune.grpo import GRPOConfig, grpo

    taken = ("steps", "lr", "seed", "beta", "examples")
    unused = [
        f"--{k.replace('_', '-')}"
        for k in (*_FINETUNE_OPTIONS, "targets", "max_steps")
        if k not in taken and getattr(args, k, None) is not None
    ]
    if unused or args.resume:
        raise ValueError(f"--method grpo does not take {', '.join(unused) or '--resume'}")
    fields = {k: getattr(args, k) for k in taken}
    config = GRPOConfig(**{k: v for k, v in fields.items() if v is not None})
    result = grpo(base, args.out, config, progress=not args.quiet)
    before, after = result["val_exact_match"]
    print(
        f"{config.steps} steps: held-out exact match {before:.3f} -> {after:.3f}; checkpoint "
        f"{Path(args.out) / 'last'} (slmlab chat {Path(args.out) / 'last'})"
    )
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    base = _checkpoint_path(args.base, quiet=args.quiet)
    if args.method == "grpo":
        return _grpo(args, base)
    options = {k: getattr(args, k) for k in _FINETUNE_OPTIONS if getattr(args, k) is not None}
    if args.targets:
        options["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    result = finetune(
        base,
        args.out,
        method=args.method,
        max_steps=args.max_steps,
        resume=args.resume,
        progress=not args.quiet,
        device=args.device,
        **options,
    )
    print(
        f"step {result.step}: train loss {result.train_loss:.4f}"
        + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else "")
        + f"; checkpoint {result.checkpoint} (slmlab chat {result.checkpoint})"
    )
    return 0


def _zoo(args: argparse.Namespace) -> int:
    from . import zoo

    if args.action == "list":
        width = max(map(len, zoo.names()))
        for name, entry in zoo.RECIPES.items():
            config = entry.config
            cached = "cached" if zoo.is_trained(name) else "not trained"
            print(
                f"{name:<{width}}  {config.data:<8} {config.steps:>5} steps  seed {config.seed}"
                f"  ({cached})"
            )
        for name, fetched in zoo.FETCHED.items():
            cached = "cached" if zoo.is_trained(name) else "not fetched"
            print(f"{name:<{width}}  {fetched.about}, {fetched.requirement}  ({cached})")
        return 0
    if not args.names:
        raise ValueError(f"slmlab zoo {args.action} needs recipe NAMEs (see: slmlab zoo list)")
    if args.action == "train":
        zoo.prepare(args.names, progress=not args.quiet)
        return 0
    for name in args.names:
        print(zoo.ensure(name, progress=not args.quiet))
    return 0


def _course(args: argparse.Namespace) -> int:
    from . import course

    if args.action == "plan":
        print(course.plan(args.notebooks))
        return 0
    if args.out is None:
        raise ValueError("slmlab course release needs --out DIR, the course folder to write")
    for path in course.release(args.out, args.chapters, args.notebooks):
        print(path)
    return 0


def _checkpoint_path(name_or_path: str, *, quiet: bool) -> Path:
    """A checkpoint directory, or a zoo recipe's (trained first if needed)."""
    from .zoo import ensure, names

    return (
        ensure(name_or_path, progress=not quiet) if name_or_path in names() else Path(name_or_path)
    )


def _source_to_transform(args: argparse.Namespace, done: str) -> Path:
    """The checkpoint a transforming verb reads; an error if ``--out`` would overwrite it."""
    source = _checkpoint_path(args.checkpoint, quiet=args.quiet)
    if Path(args.out).resolve() == source.resolve():
        raise ValueError(
            f"--out {args.out} is the checkpoint being {done}: saving would replace the "
            "original; choose another folder"
        )
    return source


def _calibration(args: argparse.Namespace, tokenizer, model):  # -> torch.Tensor
    from .quant.calibrate import calibration_tokens

    return calibration_tokens(
        tokenizer,
        args.calibration,
        rows=args.calibration_rows,
        seq_len=min(args.seq_len, model.config.max_position_embeddings),
    )


def _quantize(args: argparse.Namespace) -> int:
    from .checkpoint import load, load_tokenizer, save
    from .eval import disk_bytes
    from .quant import QuantConfig, quantize_

    source = _source_to_transform(args, "quantized")
    config = QuantConfig(
        method=args.method,
        fmt=args.fmt,
        bits=args.bits,
        group_size=None if args.group_size == -1 else args.group_size,
        symmetric=not args.asymmetric,
        embedding_bits=args.embedding_bits,
        act_order=args.act_order,
    )
    model, tokenizer = load(source), load_tokenizer(source)
    calibration = None
    if config.needs_calibration:
        calibration = _calibration(args, tokenizer, model)
    quantize_(model, config, calibration=calibration)
    out = save(model, args.out, tokenizer)
    before, after = disk_bytes(source), disk_bytes(out)
    print(f"{out}: {after / 2**20:.2f} MiB ({after / before:.3f} of {before / 2**20:.2f} MiB)")
    return 0


def _share_or_count(text: str) -> int | float:
    """``0.5`` (a share) or ``768`` (a count), as prune's --mlp and --kv-groups take them."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a share like 0.5 nor a count like 768"
        ) from None


def _prune(args: argparse.Namespace) -> int:
    import dataclasses

    from .checkpoint import load, load_tokenizer, save
    from .layers import Sparse24Linear
    from .prune import PruneConfig, StructureConfig, pack_2to4_, prune_, prune_structure_, sparsity

    source = _source_to_transform(args, "pruned")
    if args.pack and args.pattern != "2:4":
        raise ValueError("--pack stores 2:4 layers packed: it needs --method and --pattern 2:4")
    structure = None
    if (args.mlp, args.kv_groups, args.layers) != (None, None, 0):
        structure = StructureConfig(
            mlp=args.mlp,
            kv_groups=args.kv_groups,
            layers=args.layers,
            importance=args.importance,
            layer_metric=args.layer_metric,
        )
    unstructured = None
    if args.method is not None:
        unstructured = PruneConfig(
            args.method, args.sparsity, pattern=args.pattern, scope=args.scope
        )
    elif (args.sparsity, args.pattern, args.scope) != (None, None, None):
        raise ValueError(
            "--sparsity, --pattern and --scope need --method (magnitude, wanda, sparsegpt)"
        )
    if structure is None and unstructured is None:
        raise ValueError(
            "nothing to prune: give --method with --sparsity or --pattern, or --mlp, "
            "--kv-groups or --layers"
        )
    model, tokenizer = load(source), load_tokenizer(source)
    calibration = _calibration(args, tokenizer, model)
    before = model.num_parameters()
    result: dict = {"source": str(source), "parameters_before": before}
    if structure is not None:
        result["structured"] = dataclasses.asdict(structure) | prune_structure_(
            model, structure, calibration=calibration
        )
    if unstructured is not None:
        prune_(model, unstructured, calibration=calibration)
        result["unstructured"] = dataclasses.asdict(unstructured) | {
            "skip": list(unstructured.skip),
            "layer_sparsity": sparsity(model, skip=unstructured.skip),
        }
        if args.pack:
            pack_2to4_(model, skip=unstructured.skip)
            result["unstructured"]["packed_layers"] = [
                n for n, m in model.named_modules() if isinstance(m, Sparse24Linear)
            ]
    out = save(model, args.out, tokenizer)
    result |= {"out": str(out), "parameters_after": model.num_parameters()}
    _write_json(args.json, result)
    zeros = f", {sparsity(model)['total']:.1%} of the linear weights zero" if unstructured else ""
    print(
        f"{out}: {model.num_parameters():,} parameters ({model.num_parameters() / before:.3f} of {before:,}){zeros}"
    )
    return 0


def _lowrank(args: argparse.Namespace) -> int:
    from .checkpoint import load, load_tokenizer, save
    from .lowrank import LowRankConfig, LowRankLinear, low_rank_

    source = _source_to_transform(args, "factored")
    config = LowRankConfig(args.method, rank=args.rank, energy=args.energy, ratio=args.ratio)
    model, tokenizer = load(source), load_tokenizer(source)
    calibration = None
    if config.needs_calibration:
        calibration = _calibration(args, tokenizer, model)
    before = model.num_parameters()
    low_rank_(model, config, calibration=calibration)
    out = save(model, args.out, tokenizer)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    _write_json(
        args.json,
        {
            "source": str(source),
            "method": config.method,
            "ranks": ranks,
            "parameters_before": before,
            "parameters_after": model.num_parameters(),
            "out": str(out),
        },
    )
    print(
        f"{out}: {len(ranks)} layers factored, {model.num_parameters():,} parameters "
        f"({model.num_parameters() / before:.3f} of {before:,})"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .checkpoint import load, load_tokenizer
    from .env import pick_device, report
    from .eval import Scorer, disk_bytes, evaluate, load_task, measure_efficiency

    specs = [spec.strip() for spec in args.tasks.split(",") if spec.strip()]
    if not specs:
        raise ValueError(
            "--tasks names no task: give suites, task files or ppl:TEXT, comma-separated"
        )
    tasks = [load_task(spec) for spec in specs]
    for task in tasks:  # every file is read and checked before any scoring starts
        task.check()
    names = [task.name for task in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"--tasks names task {repeated[0]!r} twice: its results would overwrite each other; "
            "give each task once"
        )
    path = _checkpoint_path(args.checkpoint, quiet=args.quiet)
    model = load(path, device=pick_device(args.device))
    scorer = Scorer(
        model, load_tokenizer(path), batch_size=args.batch_size, token_healing=args.token_healing
    )
    result: dict = {"model": str(path), "disk_bytes": disk_bytes(path), "tasks": {}}
    print(f"{'task':<22} {'metric':<16} {'value':>10} {'± stderr':>9} {'n':>6}")
    for task in tasks:
        scored = evaluate(scorer, task, limit=args.limit, progress=not args.quiet)
        result["tasks"][task.name] = scored.to_dict()
        for metric, value in scored.metrics.items():
            err = scored.stderr.get(metric)
            err_text = f"{err:9.4f}" if err is not None else " " * 9
            print(f"{task.name:<22} {metric:<16} {value:10.4f} {err_text} {scored.samples:>6}")
        if scored.truncated:
            print(f"  ({scored.truncated} requests cut from the left to the model's context)")
    if args.efficiency:
        result["efficiency"] = measure_efficiency(model, path=path)
        e = result["efficiency"]
        print(
            f"prefill {e['prefill_ms']:.1f} ms, decode {e['decode_ms_per_token']:.2f} ms/token, "
            f"peak RSS {e['peak_rss_bytes'] / 2**20:.0f} MiB, on disk {result['disk_bytes'] / 2**20:.1f} MiB"
        )
    else:
        result["machine"] = report()
    _write_json(args.json, result)
    return 0


def _write_json(path: str | None, result: dict) -> None:
    if path:
        from .io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(result, indent=2) + "\n")


_HEALING = "--token-healing"
_HEALING_HELP = (
    "regrow the prompt's last tokens when it stops inside a token (for superword tokenizers)"
)


def _calibration_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibration",
        default="stories",
        help="calibration text: stories, python, python-docs or a file/folder/jsonl",
    )
    p.add_argument("--calibration-rows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256, help="calibration row length")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="slmlab",
        description="Small language models, from scratch to device. Each verb is a chapter's library call.",
    )
    parser.add_argument("--version", action="version", version=f"slmlab {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True

    p = verbs.add_parser("budget", help="parameters, memory, KV cache and FLOPs of a model config")
    p.add_argument(
        "model",
        help="a published model name (e.g. SmolLM2-135M), a config.json or a checkpoint directory",
    )
    p.add_argument(
        "--context", type=int, default=2048, help="context length for the FLOPs (default 2048)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=_budget)

    p = verbs.add_parser("generate", help="continue a prompt with a checkpoint's model")
    p.add_argument("checkpoint", help="checkpoint directory, .gguf file or zoo name")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeats"
    )
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop after this text"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument(_HEALING, action="store_true", help=_HEALING_HELP)
    p.add_argument(
        "--chat", action="store_true", help="write the prompt as a user turn of the chat template"
    )
    p.set_defaults(func=_generate)

    p = verbs.add_parser("convert", help="a GGUF file as a checkpoint directory")
    p.add_argument("gguf", help="a Llama-family .gguf file (llama.cpp's format)")
    p.add_argument("--out", required=True, help="the checkpoint directory to write")
    p.set_defaults(func=_convert)

    p = verbs.add_parser(
        "export", help="a model as llama.cpp's GGUF, an ONNX file or an ExecuTorch program"
    )
    p.add_argument("model", help="a checkpoint directory, a .gguf file or a zoo name")
    p.add_argument("--to", required=True, choices=("gguf", "onnx", "executorch"))
    p.add_argument(
        "--quant",
        default=None,
        help="gguf: f32 (default), f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q4_k; onnx: fp32, int8",
    )
    p.add_argument("--out", required=True, help="the file to write (.gguf, .onnx, .pte)")
    p.add_argument("--name", default=None, help="gguf: general.name (default: the model's)")
    p.set_defaults(func=_export)

    p = verbs.add_parser("chat", help="talk with a chat model (one turn a line when piped)")
    p.add_argument("model", help="a checkpoint directory, a .gguf file or a zoo name")
    p.add_argument("--system", default=None, help="a system message before the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.set_defaults(func=_chat)

    p = verbs.add_parser("serve", help="an OpenAI-compatible HTTP API for a model")
    p.add_argument("model", help="a checkpoint directory, a .gguf file or a zoo name")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--host", default="127.0.0.1", help="default 127.0.0.1: no authentication, keep it local"
    )
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting; more get 429")
    p.add_argument("--name", default=None, help="the model's name in the API (default: MODEL)")
    p.set_defaults(func=_serve)

    p = verbs.add_parser(
        "train", help="train a model from a zoo recipe or a config file (torchrun-ready)"
    )
    p.add_argument("--recipe", help="a zoo recipe name (see: slmlab zoo list)")
    p.add_argument("--config", help="a TOML/JSON training config")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, loss.png")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this step (the schedule is unchanged)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--parallel",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="under torchrun: replicate the model (ddp) or shard it across processes (fsdp)",
    )
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda or auto (default cpu; torchrun: one GPU each)"
    )
    p.set_defaults(func=_train)

    from .finetune import METHODS as FINETUNE_METHODS

    p = verbs.add_parser(
        "finetune",
        help="teach a trained model to answer (SFT, LoRA, QLoRA), to prefer right answers (DPO, "
        "SimPO, ORPO) or to find them by trial and reward (GRPO) (chapter 06)",
    )
    p.add_argument("base", help="the checkpoint directory or zoo name to start from")
    p.add_argument("--method", default="sft", choices=(*FINETUNE_METHODS, "grpo"))
    p.add_argument(
        "--data",
        default=None,
        help="story-qa (default) or a jsonl of messages / prompt+completion (of "
        "prompt+chosen+rejected for dpo, simpo, orpo)",
    )
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, loss.png")
    p.add_argument(
        "--examples", type=int, default=None, help="conversations (or pairs) to train on"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument(
        "--embedding-lr-scale",
        type=float,
        default=None,
        help="the embedding's learning rate as a multiple of --lr (default 1)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="packed rows (or pairs) per step")
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="dpo, simpo, orpo: the preference's scale; grpo: the KL penalty's weight",
    )
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed row")
    p.add_argument("--rank", type=int, default=None, help="LoRA: the update's rank (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA: its scale (default 2 × rank)")
    p.add_argument("--targets", default=None, help="LoRA: layer names, e.g. q_proj,v_proj")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="recompute each block in the backward pass instead of keeping its activations",
    )
    p.add_argument(
        "--head-chunk",
        type=int,
        default=None,
        help="the loss's head over this many learnt tokens at a time, each piece recomputed in "
        "the backward pass (default: all at once)",
    )
    p.add_argument(
        "--precision",
        default=None,
        help="fp32 (the default), bf16 (products under bf16 autocast), bf16-residual (the "
        "stream between blocks in bf16 too: QLoRA's compute type) or auto",
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after this step")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_finetune)

    from .distill import LOSSES as DISTILL_LOSSES

    p = verbs.add_parser(
        "distill", help="train a small student on a teacher's next-token distributions (chapter 07)"
    )
    p.add_argument("--teacher", help="the teacher's checkpoint directory or zoo name")
    p.add_argument(
        "--student-config",
        required=True,
        help="the student's training config (TOML/JSON), or a zoo recipe name such as stories-1m",
    )
    p.add_argument("--loss", choices=DISTILL_LOSSES, help="the divergence (default forward-kl)")
    p.add_argument("--temperature", type=float, help="softens both distributions (default 1)")
    p.add_argument(
        "--alpha", type=float, help="the teacher's weight against the data's (default 0.5)"
    )
    p.add_argument("--beta", type=float, help="jsd's mixing weight (default 0.5)")
    p.add_argument(
        "--cache",
        help="a teacher cache file: made on the first run that names it, then read instead of "
        "running the teacher",
    )
    p.add_argument("--top-k", type=int, help="tokens the cache keeps per position (default 16)")
    p.add_argument(
        "--on-policy",
        type=float,
        help="share of rows the student continues itself before the teacher grades them (GKD)",
    )
    p.add_argument(
        "--relations",
        type=float,
        help="weight of the last blocks' attention relations (MiniLMv2; default 0: none)",
    )
    p.add_argument(
        "--features",
        type=float,
        help="weight of the last blocks' hidden states, through a learnt projection (default 0)",
    )
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (the config's)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this step")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_distill)

    p = verbs.add_parser("eval", help="score a model on tasks, perplexity and efficiency")
    p.add_argument("checkpoint", help="checkpoint directory, or a zoo recipe name")
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated: built-in suites (stories_who, stories_where, stories_what, "
        "stories_who_gen), lm-eval task YAML files, ppl:FILE or ppl:stories|python|python-docs",
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--efficiency", action="store_true", help="also measure latency and memory")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(_HEALING, action="store_true", help=_HEALING_HELP)
    p.set_defaults(func=_eval)

    from .quant import FORMATS, METHODS

    p = verbs.add_parser("quantize", help="quantize a checkpoint's linear layers (chapter 08)")
    p.add_argument("checkpoint", help="checkpoint directory, or a zoo recipe name")
    p.add_argument("--method", default="rtn", choices=METHODS)
    p.add_argument("--fmt", default="int", choices=FORMATS, help="number format (default int)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="weights per scale; -1: one per row")
    p.add_argument("--asymmetric", action="store_true", help="a zero point per group")
    p.add_argument("--act-order", action="store_true", help="GPTQ: most active inputs first")
    p.add_argument(
        "--embedding-bits", type=int, choices=[4, 8], default=None, help="quantize the embedding"
    )
    _calibration_arguments(p)
    p.add_argument("--out", required=True, help="directory of the quantized checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_quantize)

    from .prune import IMPORTANCE
    from .prune import METHODS as PRUNE_METHODS

    p = verbs.add_parser(
        "prune",
        help="zero weights (--method) or cut channels, head groups and blocks (chapter 09)",
    )
    p.add_argument("checkpoint", help="checkpoint directory, or a zoo recipe name")
    p.add_argument(
        "--method", choices=PRUNE_METHODS, default=None, help="unstructured: which weights go"
    )
    p.add_argument(
        "--sparsity", type=float, default=None, help="share of weights removed (default 0.5)"
    )
    p.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 (keep N of every M inputs)")
    p.add_argument(
        "--pack",
        action="store_true",
        help="store 2:4 layers as kept values and 2-bit positions (smaller, faster to decode)",
    )
    p.add_argument(
        "--scope", default=None, choices=["row", "layer", "global"], help="where weights compete"
    )
    p.add_argument(
        "--mlp", type=_share_or_count, default=None, help="MLP channels kept: 0.5 or 768"
    )
    p.add_argument(
        "--kv-groups", type=_share_or_count, default=None, help="key/value groups kept per block"
    )
    p.add_argument("--layers", type=int, default=0, help="blocks removed (least important first)")
    p.add_argument("--importance", choices=IMPORTANCE, default="activation")
    p.add_argument(
        "--layer-metric", choices=["block-influence", "angular"], default="block-influence"
    )
    _calibration_arguments(p)
    p.add_argument("--out", required=True, help="directory of the pruned checkpoint")
    p.add_argument("--json", default=None, help="write what was removed to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prune)

    from .lowrank import METHODS as LOW_RANK_METHODS

    p = verbs.add_parser("lowrank", help="factor linear layers into two thin ones (chapter 09)")
    p.add_argument("checkpoint", help="checkpoint directory, or a zoo recipe name")
    p.add_argument("--method", choices=LOW_RANK_METHODS, default="svd-llm")
    p.add_argument("--rank", type=int, default=None, help="the same rank for every layer")
    p.add_argument("--energy", type=float, default=None, help="keep this share of each spectrum")
    p.add_argument(
        "--ratio", type=float, default=None, help="keep this share of each layer's parameters"
    )
    _calibration_arguments(p)
    p.add_argument("--out", required=True, help="directory of the factored checkpoint")
    p.add_argument("--json", default=None, help="write each layer's rank to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_lowrank)

    p = verbs.add_parser(
        "zoo",
        help="the model zoo: list recipes, train them, or print (training if needed) their paths",
    )
    p.add_argument("action", choices=["list", "train", "path"])
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_zoo)

    p = verbs.add_parser(
        "course",
        help="the chapters as nbgrader labs: release them (solutions stripped, checks kept), "
        "or plan a course (time, prerequisites, zoo models)",
    )
    p.add_argument("action", choices=["release", "plan"])
    p.add_argument("--out", type=Path, help="release: the course folder (source/, release/)")
    p.add_argument(
        "--chapters", nargs="+", metavar="NN", help="release only these (08 or 08_quantization)"
    )
    p.add_argument(
        "--notebooks", type=Path, help="the chapter notebooks (default: the repository's)"
    )
    p.set_defaults(func=_course)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Verb = args.func
    try:
        return func(args)
    except (ValueError, RuntimeError, OSError, KeyError, ArithmeticError) as err:
        # Library errors already name the file and the problem: one line, no traceback (a
        # diverging run's FloatingPointError and an unwritable --out included). SLMLAB_DEBUG=1
        # shows the traceback instead.
        if os.environ.get("SLMLAB_DEBUG"):
            raise
        parser.exit(1, f"slmlab {args.verb}: error: {err}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
