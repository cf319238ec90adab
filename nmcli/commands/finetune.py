"""`nmsparse finetune`: sparse fine-tuning with a recipe; Hugging Face models learn from their dense selves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nmcli.commands.common import (
    PATTERN_HELP,
    CheckpointOpt,
    DeviceOpt,
    EvalDataOpt,
    ForceOpt,
    JsonOpt,
    ModelKwargsOpt,
    QuietOpt,
    is_main_rank,
    json_option,
    out,
    print_json,
    user_errors,
)
from nmcli.commands.progress import RichReporter
from nmcli.errors import NMSparseError
from nmcli.nm import parse_pattern

DataOpt = Annotated[Optional[str], typer.Option(
    "--data", help="timm: image folder or mnist5k (default); HF: .txt/.md/.jsonl, a folder, python-help, wiki, "
    "teacher:N (causal LMs), writer:LM_FOLDER:N (text a causal LM writes), or a mixture SOURCE:P,SOURCE:P "
    "[default: python-help:0.3,wiki:0.7]"
)]
StartOpt = Annotated[Optional[str], typer.Option(
    "--start", help="HF models: magnitude | wanda | sparsegpt | alps (one-shot first) or an N:M checkpoint (default: the dense model)"
)]
EXAMPLE_OPTIONS = "--example, --recipe, --pattern, --epochs, --lr, --out, --seed, --limit"


def finetune(
    model: Annotated[
        Optional[str], typer.Option("--model", help="timm model name or Hugging Face folder (none: the built-in example)")
    ] = None,
    model_kwargs: ModelKwargsOpt = None,
    checkpoint: CheckpointOpt = None,
    data: DataOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="HF models: tokens per sample")] = 128,
    start: StartOpt = None,
    prompts: Annotated[
        Optional[Path], typer.Option("--prompts", help="--data teacher:N or writer:...: prompts, one per line (default: built-in)")
    ] = None,
    eval_data: EvalDataOpt = None,
    recipe: Annotated[
        Optional[str], typer.Option("--recipe", "-r", help="built-in recipe name or YAML path (default: sdgf-stepwise)")
    ] = None,
    example: Annotated[
        Optional[str], typer.Option("--example", help="with no --model: minilm (default) or mnist")
    ] = None,
    pattern: Annotated[Optional[str], typer.Option("--pattern", "-p", help=PATTERN_HELP + " (overrides the recipe)")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", min=0.0)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder")] = None,
    seed: Annotated[int, typer.Option("--seed", help="fixes init, masks, data order and results")] = 0,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="re-initialise the head")] = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="bf16 autocast")] = False,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="continue the run in this folder")] = None,
    shard: Annotated[bool, typer.Option(
        "--shard", help="under torchrun: shard student and teacher over the processes (FSDP2) instead of copying them")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="recompute each block's activations in the backward pass: less memory, "
        "about one more forward pass of time")] = False,
    keep_adapter: Annotated[bool, typer.Option(
        "--keep-adapter", help="a recipe with lora: also write the adapter in peft's layout (OUT/adapter)")] = False,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", min=1, help="stop after N epochs of this run")] = None,
    grad_log_every: Annotated[int, typer.Option("--grad-log-every", help="log gradient variance / mask flips every N steps")] = 0,
    eval_every: Annotated[int, typer.Option("--eval-every", min=0, help="also evaluate every N steps (default: each epoch)")] = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="use at most N train and N val samples")] = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Sparse fine-tuning with a recipe (SR-STE, MDGF, SDGF, ...); Hugging Face models learn by distillation from
    their dense selves. With no --model: a built-in example (--example minilm or mnist)."""
    reporter = RichReporter(enabled=not (quiet or as_json), messages=not (quiet or as_json))
    with user_errors():
        if model is None:
            _refuse_for_example({
                "--model-kwargs": model_kwargs, "--checkpoint": checkpoint, "--data": data, "--start": start,
                "--seq-len": None if seq_len == 128 else seq_len, "--prompts": prompts, "--batch-size": batch_size,
                "--num-classes": num_classes, "--bf16": bf16 or None, "--resume": resume, "--stop-after": stop_after,
                "--grad-log-every": grad_log_every or None, "--eval-every": eval_every or None,
                "--device": None if device == "cpu" else device, "--eval-data": eval_data,
                "--keep-adapter": keep_adapter or None, "--shard": shard or None,
                "--gradient-checkpointing": gradient_checkpointing or None,
            })
            result = _run_example(example or "minilm", recipe, pattern, epochs, lr, out_dir, seed, limit, force, reporter)
        else:
            if example is not None:
                raise NMSparseError("--example runs a built-in example: drop it, or drop --model")
            config = _config(
                model, recipe, pattern, epochs, lr, batch_size, out_dir, resume,
                model_kwargs=model_kwargs, data=data, checkpoint=checkpoint, seed=seed,
                num_classes=num_classes, bf16=bf16, seq_len=seq_len, start=start, prompts=prompts,
                eval_data=tuple(eval_data or ()), keep_adapter=keep_adapter, shard=shard,
                gradient_checkpointing=gradient_checkpointing,
                grad_log_every=grad_log_every, eval_every=eval_every, stop_after=stop_after, limit=limit, force=force,
                device=device,
            )
            from nmcli.train.engine import run_finetune

            result = run_finetune(config, reporter).summary
    if not is_main_rank():
        return
    if as_json:
        print_json(result)
    else:
        out.print(_finetune_line(result, resume or out_dir))


def _config(model: str, recipe: Optional[str], pattern: Optional[str], epochs: Optional[int], lr: Optional[float],  # noqa: PLR0913
            batch_size: Optional[int], out_dir: Optional[Path], resume: Optional[Path], **settings):  # noqa: ANN003, ANN202
    """The run's FinetuneConfig: the recipe with the command line's overrides, and where the run lives."""
    from nmcli.methods.recipes import load_recipe
    from nmcli.train.engine import FinetuneConfig

    chosen = load_recipe(recipe or "sdgf-stepwise").with_overrides(
        pattern=str(parse_pattern(pattern)) if pattern is not None else None, epochs=epochs, lr=lr, batch_size=batch_size
    )
    if resume is not None and out_dir is not None and out_dir.resolve() != resume.resolve():
        raise NMSparseError(f"--resume {resume} continues in that folder; drop --out {out_dir} or make it the same")
    out_path = resume or out_dir
    if out_path is None:
        raise NMSparseError("--out is required: the folder for the checkpoint, summary and metrics")
    settings["model_kwargs"] = json_option(settings["model_kwargs"], "--model-kwargs")
    return FinetuneConfig(model=model, recipe=chosen, out=out_path, resume=resume is not None, **settings)


def _finetune_line(result: dict, out_path: Optional[Path]) -> str:
    """One line for the terminal: quality before and after, compliance, cost, where the result is."""
    if result.get("example") == "minilm":
        return (
            f"embedding cosine to dense, held-out paragraphs / sentences, {result['start']} one-shot {result['pattern']} -> "
            f"{result['recipe']} distilled: " + " | ".join(_example_domain(name, d) for name, d in result["domains"].items())
            + f" | N:M compliant: {result['all_layers_compliant']} | {result['wall_seconds']}s -> {result['sparse_checkpoint']}"
        )
    if "dense_val_accuracy" in result:
        return (
            f"dense {result['dense_val_accuracy']:.4f} | one-shot {result['pattern']} {result['one_shot_val_accuracy']:.4f} | "
            f"{result['recipe']} {result['pattern']} fine-tuned {result['sparse_val_accuracy']:.4f} | "
            f"N:M compliant: {result['all_layers_compliant']} | training FLOPs vs dense "
            f"{result['training_flops_relative_to_dense']:.3f}x | {result['wall_seconds']}s -> {result['sparse_checkpoint']}"
        )
    if "stopped_after_epoch" in result:
        return f"stopped after epoch {result['stopped_after_epoch']}; continue with --resume {out_path}"
    return (
        f"{result['recipe']} {result['pattern'] or 'dense'}: {_quality_change(result)} | "
        f"compliant: {result['all_layers_compliant']} | training FLOPs vs dense "
        f"{result['training_flops_relative_to_dense']:.3f}x | {result['wall_seconds']}s -> {out_path}"
    )


def _example_domain(name: str, domain: dict) -> str:
    """`news: 0.7500 / 0.7600 -> 0.8800 / 0.8900 (Spearman 0.87, top-1 neighbour 0.42)`."""
    one, rec = domain["one_shot"], domain["recovered"]
    return (f"{name}: {one['paragraphs']:.4f} / {one['sentences']:.4f} -> {rec['paragraphs']:.4f} / {rec['sentences']:.4f} "
            f"(Spearman {rec['spearman']:.4f}, top-1 neighbour {rec['top1_agreement']:.2f})")


def _run_example(
    name: str, recipe: Optional[str], pattern: Optional[str], epochs: Optional[int], lr: Optional[float],
    out_dir: Optional[Path], seed: int, limit: Optional[int], force: bool, reporter: RichReporter,
) -> dict:
    """The built-in example `name`, with the options it honours applied."""
    from nmcli.methods.recipes import load_recipe
    from nmcli.train.example import EXAMPLES, ExampleSettings, MiniLMExample, run_example, run_minilm_example

    if name not in EXAMPLES:
        raise NMSparseError(f"--example {name!r}: choose one of {', '.join(EXAMPLES)}")
    out_path = out_dir or Path("nmsparse-example")
    if name == "minilm":
        settings = MiniLMExample(out=out_path, seed=seed, force=force)
        changes = {"recipe": recipe and load_recipe(recipe), "pattern": pattern and str(parse_pattern(pattern)),
                   "epochs": epochs, "lr": lr, "limit": limit}
        runner = run_minilm_example
    else:
        settings = ExampleSettings(out=out_path, seed=seed, force=force, limit=limit)
        changes = {"recipe": recipe and load_recipe(recipe), "pattern": pattern and str(parse_pattern(pattern)),
                   "sparse_epochs": epochs, "sparse_lr": lr}
        runner = run_example
    for key, value in changes.items():
        if value is not None:
            setattr(settings, key, value)
    return runner(settings, reporter)


def _refuse_for_example(options: dict[str, object]) -> None:
    """With no --model the built-in example runs: an option it cannot honour is an error, never ignored."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise NMSparseError(
            f"{', '.join(given)}: not used by the built-in example (no --model); give --model to fine-tune your own "
            f"model, or drop them (the example takes {EXAMPLE_OPTIONS})"
        )


def _quality_change(result: dict) -> str:
    """`val accuracy 0.2000 (one-shot 0.1000) -> 0.8990`, one entry per quality metric of the summary (start and
    one-shot are unknown after --resume), grouped by held-out domain and each group named: `python-help (held out):
    perplexity ... | news: perplexity ...`."""
    from nmcli.quality.suite import by_domain, metric_words

    def value(key: str) -> str:
        return "(resumed)" if result.get(key) is None else format(result[key], ".4f")

    names = [key.removeprefix("final_") for key in result if key.startswith("final_")]
    return by_domain({
        name: f"{metric_words(name)} {value('start_' + name)}"
        + (f" (one-shot {value('one_shot_' + name)})" if result.get("one_shot_" + name) is not None else "")
        + f" -> {result['final_' + name]:.4f}"
        for name in names
    }, result.get("held_out"))
