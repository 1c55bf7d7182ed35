"""How close ella's training step and evaluation come to the machine's limit, against a plain training loop.

    python benchmarks/speed.py            # 31 minutes on 2 AVX2 cores (AMD EPYC), 14 on 2 with AVX-512 BF16
    python benchmarks/speed.py --quick    # one round, one task: a look
    python benchmarks/speed.py --probe ella --tasks 1 --tokens-per-pass 1024   # ella's step alone, another pass size

SmolLM2-135M on the Standard CL prompts of order 1 (batch 8, max length 256, rank-8 LoRA on q and v, the
precision ella chooses for this CPU). Measured in one run, each part in processes of its own (peak memory is the
process's own):
- the machine: its matrix-multiply throughput in that precision (the best of the model's own shapes and a square
  one), the CPU model and instruction set;
- training: the same optimiser steps (the batches of ella's schedule) by ella's engine (``train_task``) and by a
  plain transformers + peft loop (full logits, each batch padded to its longest row, HF's own loss), alternating
  round by round; the ratio of their step times, their peak memory, and ella's step against the time its FLOPs need
  at the measured throughput (FLOPs counted by torch's FlopCounterMode on the same examples one at a time, no
  padding: the work the step cannot avoid);
- evaluation: examples per second of greedy generation and rank classification, with and without the shared
  prefix's cache, at two batch sizes, against the time their counted FLOPs need; and by a model trained on the
  task, rank classification that reads only the options that can still win against one that reads all;
- on an AMD CPU, where ella overrides MKL's vendor check (``ella.cpu_kernels``): the matrix products, ella's step
  and evaluation again with MKL's own choice of kernels (``ELLA_MKL_OVERRIDE=0``), to show what the override gains;
  the plain loop runs with MKL's own choice (the libraries' defaults);
- where ella chooses bf16 autocast (a CPU with AMX or AVX-512 BF16): its step and evaluation again in fp32, to
  show what the choice gains and that the predictions stay the same (the fp32 step with MKL's own kernels as well,
  where ella overrides them); its step again with torch's fused attention kernel in place of the plain matrix
  products ella trains with there.
Writes benchmarks/results/speed.md and speed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from unittest import mock

import ella  # before torch: its settings of torch's CPU kernel libraries are read when torch loads

import torch
from torch.utils.flop_counter import FlopCounterMode

from ella import engine
from ella import evaluation as ella_evaluation
from ella.data import IGNORE_INDEX, TaskEncoder
from ella.engine import (EvaluationConfig, TrainingConfig, make_accelerator, peak_memory, resolve_mixed_precision,
                         train_task, training_schedule)
from ella.evaluation import answer_token_nll, evaluate_task
from ella.methods.lora import LoraHyperparameters
from ella.provenance import describe_hardware, hardware, mkl_vendor_check

RESULTS = Path(__file__).parent / "results"
MODEL, MAX_LENGTH, BATCH, TRAIN_EXAMPLES = "smollm2-135m", 256, 8, 32  # 4 optimiser steps per task
EVAL_EXAMPLES, EVAL_BATCH = 48, EvaluationConfig().batch_size
TRAINED_EXAMPLES = 128  # the training of the model whose rank classification is measured


# ---------------------------------------------------------------------------------------------------------------
# The machine


def machine() -> dict:
    return {**hardware(torch.device("cpu")), "torch": torch.__version__, "precision": resolve_mixed_precision("auto")}


def used_dtype() -> torch.dtype:
    return torch.bfloat16 if resolve_mixed_precision("auto") == "bf16" else torch.float32


# A process whose MKL keeps its own choice of kernels, where ella overrides its vendor check (``ella.cpu_kernels``)
MKL_OWN = {**os.environ, "ELLA_MKL_OVERRIDE": "0"}
OWN_KERNELS = "MKL's own kernels"


def ella_overrides_mkl() -> bool:
    return "overridden by ella" in (mkl_vendor_check() or "")


MATMUL_SHAPES = {"512x576x576": (512, 576, 576), "512x576x192": (512, 576, 192), "512x576x1536": (512, 576, 1536),
                 "512x1536x576": (512, 1536, 576), "2048x2048x2048": (2048, 2048, 2048)}


def matmul_throughput(dtype: torch.dtype, repeats: int, shapes: dict) -> dict:
    """FLOP/s of ``x @ w`` for the step's shapes (512 tokens x SmolLM2's q/o, k/v, MLP matrices) and a square one:
    the median of ``repeats`` timings each; the machine's limit is the best of them."""
    out = {}
    for label, (m, k, n) in shapes.items():
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        x @ w  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ w
            times.append(time.perf_counter() - start)
        out[label] = 2 * m * k * n / statistics.median(times)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training: ella's engine and a plain loop on the same steps


def training_data(tasks_used: int):
    # the same LoRA initialisation and dropout masks in every round (the process's own seed varies)
    torch.manual_seed(0)
    model, tokenizer = ella.load_model(MODEL)
    tasks = ella.load_cl_benchmark("standard", 1, train_per_task=TRAIN_EXAMPLES, test_per_task=1)[:tasks_used]
    items = [TaskEncoder(tokenizer, task, MAX_LENGTH, False).training(task.train) for task in tasks]
    return model, tokenizer, tasks, items


def ella_training(tasks_used: int, tokens_per_pass: int = TrainingConfig.tokens_per_pass,
                  precision: str = "auto", fused_attention: bool = False) -> dict:
    """ella's ``train_task`` (IncLoRA: a fresh LoRA per task) over the tasks' first steps; ``fused_attention``: with
    torch's fused attention kernel where ella takes plain products (``training_attention``, under bf16 on a CPU)."""
    model, tokenizer, tasks, items = training_data(tasks_used)
    config = TrainingConfig(batch_size=BATCH, max_length=MAX_LENGTH, tokens_per_pass=tokens_per_pass,
                            mixed_precision=precision)
    accelerator = make_accelerator(config)
    method = ella.get_method("inclora")
    method.setup(model, tasks)
    seconds, steps = 0.0, 0
    fused = mock.patch.object(engine, "training_attention", lambda *args: contextlib.nullcontext())
    with fused if fused_attention else contextlib.nullcontext():
        for t, task in enumerate(tasks):
            model, log = train_task(model, method, t, task, items[t], tokenizer, accelerator, config, len(tasks))
            seconds += log["train_seconds"]
            steps += log["optimizer_steps"]
    return {"step_seconds": seconds / steps, "steps": steps, "peak_rss_bytes": peak_memory()["bytes"]}


def plain_training(tasks_used: int) -> dict:
    """The loop a user writes first: peft's LoRA (ella's rank, alpha, dropout and targets), each batch padded on the
    right to its longest row, ``model(**batch, labels=...)`` (full logits, transformers' loss), AdamW, clipping."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_constant_schedule_with_warmup

    model, tokenizer, tasks, items = training_data(tasks_used)
    lora = LoraHyperparameters()
    config = TrainingConfig(batch_size=BATCH, max_length=MAX_LENGTH)
    precision = resolve_mixed_precision("auto")
    seconds, steps = 0.0, 0
    for t in range(len(tasks)):
        model = get_peft_model(model, LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha,
                                                 lora_dropout=lora.lora_dropout, target_modules=["q_proj", "v_proj"]))
        schedule = training_schedule(len(items[t]), config, t)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        scheduler = get_constant_schedule_with_warmup(optimizer, int(0.1 * len(schedule)))
        model.train()
        start = time.perf_counter()
        for (micro_batch,) in schedule:
            batch = right_padded([items[t][i] for i in micro_batch], tokenizer.pad_token_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        seconds += time.perf_counter() - start
        steps += len(schedule)
        model = model.merge_and_unload()
    return {"step_seconds": seconds / steps, "steps": steps, "peak_rss_bytes": peak_memory()["bytes"]}


def right_padded(rows, pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(row.input_ids) for row in rows)
    fill = [width - len(row.input_ids) for row in rows]
    return {"input_ids": torch.tensor([row.input_ids + [pad_token_id] * f for row, f in zip(rows, fill)]),
            "attention_mask": torch.tensor([[1] * len(row.input_ids) + [0] * f for row, f in zip(rows, fill)]),
            "labels": torch.tensor([row.labels + [IGNORE_INDEX] * f for row, f in zip(rows, fill)])}


def necessary_training_flops(tasks_used: int) -> dict:
    """FLOPs of the measured steps' forward and backward passes with every example alone (no padding), answer-only
    loss, a LoRA attached: what any engine must compute (the optimiser's own work is negligible)."""
    model, tokenizer, tasks, items = training_data(tasks_used)
    config = TrainingConfig(batch_size=BATCH, max_length=MAX_LENGTH)
    method = ella.get_method("inclora")
    method.setup(model, tasks)
    total, tokens = 0, 0
    model = method.prepare(model, 0, tasks[0], None)
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        for t in range(len(tasks)):
            for (micro_batch,) in training_schedule(len(items[t]), config, t):
                for i in micro_batch:
                    row = items[t][i]
                    batch = {"input_ids": torch.tensor([row.input_ids]), "labels": torch.tensor([row.labels]),
                             "attention_mask": torch.ones(1, len(row.input_ids), dtype=torch.long)}
                    nll, mask = answer_token_nll(model, batch)
                    (nll.sum() / mask.sum()).backward()
                    tokens += len(row.input_ids)
    total = counter.get_total_flops()
    steps = sum(len(training_schedule(len(items[t]), config, t)) for t in range(len(tasks)))
    return {"flops_per_step": total / steps, "tokens_per_step": tokens / steps}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


FP32_ELLA, FP32_EVAL = "ella (`train_task`), fp32", f"prefix cached, batch {EVAL_BATCH}, fp32"  # where ella chose bf16
FUSED_ELLA = "ella (`train_task`), torch's fused attention"  # where ella chose bf16: the kernel it replaces
EVAL_VARIANTS = {  # label -> (shared prefix, batch size, precision); FLOPs are counted for ella's choice at batch 8
    f"prefix cached, batch {EVAL_BATCH}": (True, EVAL_BATCH, "auto"), "prefix cached, batch 16": (True, 16, "auto"),
    f"whole prompts, batch {EVAL_BATCH}": (False, EVAL_BATCH, "auto"), FP32_EVAL: (True, EVAL_BATCH, "no")}


def evaluation(variant: str) -> dict:
    """Examples per second of both modes on dbpedia (14 labels) and agnews (4); with the FLOPs they count."""
    shared_prefix, batch_size, precision = EVAL_VARIANTS[variant]
    model, tokenizer = ella.load_model(MODEL)
    accelerator = make_accelerator(TrainingConfig(mixed_precision=precision))
    out = {}
    for name in ("dbpedia", "agnews"):
        (task,) = ella.load_cl_benchmark(tasks=[name], train_per_task=1, test_per_task=EVAL_EXAMPLES)
        encoder = TaskEncoder(tokenizer, task, MAX_LENGTH, False)
        if not shared_prefix:
            encoder.shared_prefix = list  # no prefix: every batch runs its whole prompts
        for mode in ("generate", "rank"):
            evaluate_task(model, tokenizer, replace(task, test=task.test[:batch_size]), encoder, mode, batch_size,
                          accelerator)  # warm-up
            start = time.perf_counter()
            score = evaluate_task(model, tokenizer, task, encoder, mode, batch_size, accelerator)
            row = {"examples_per_second": len(task.test) / (time.perf_counter() - start), "accuracy": score.accuracy}
            if batch_size == EVAL_BATCH and precision == "auto":
                counter = FlopCounterMode(display=False)
                with counter:
                    evaluate_task(model, tokenizer, task, encoder, mode, batch_size, accelerator)
                row["flops_per_example"] = counter.get_total_flops() / len(task.test)
            out[f"{name}, {mode}"] = row
    return out


def trained_rank(tasks_used: int) -> dict:
    """Rank classification of dbpedia by a model trained on it (IncLoRA, TRAINED_EXAMPLES examples), which is sure
    of its labels: examples per second with only the options that can still win read in full (ella's way), with
    every option read in full, and of greedy generation; two rounds, alternating."""
    model, tokenizer = ella.load_model(MODEL)
    config = TrainingConfig(batch_size=BATCH, max_length=MAX_LENGTH)
    accelerator = make_accelerator(config)
    (task,) = ella.load_cl_benchmark(tasks=["dbpedia"], train_per_task=TRAINED_EXAMPLES,
                                   test_per_task=EVAL_EXAMPLES)
    encoder = TaskEncoder(tokenizer, task, MAX_LENGTH, False)
    method = ella.get_method("inclora")
    method.setup(model, [task])
    model, _ = train_task(model, method, 0, task, encoder.training(task.train), tokenizer, accelerator, config, 1)
    bounded = ella_evaluation.option_log_likelihoods
    every_option = lambda *args, **kwargs: bounded(*args[:4])  # noqa: E731 (only_the_best left out)
    out = {}
    for round_ in (1, 2):
        for variant, scoring, mode in (("rank, only the options that can win", bounded, "rank"),
                                       ("rank, every option", every_option, "rank"),
                                       ("generate", bounded, "generate")):
            with mock.patch.object(ella_evaluation, "option_log_likelihoods", scoring):
                evaluate_task(model, tokenizer, replace(task, test=task.test[:EVAL_BATCH]), encoder, mode,
                              EVAL_BATCH, accelerator)  # warm-up
                start = time.perf_counter()
                score = evaluate_task(model, tokenizer, task, encoder, mode, EVAL_BATCH, accelerator)
            out.setdefault(variant, {})[f"examples/s, round {round_}"] = len(task.test) / (time.perf_counter() - start)
            out[variant]["accuracy"] = score.accuracy
    return out


# ---------------------------------------------------------------------------------------------------------------
# Driver


PROBES = {"ella": ella_training, "plain": plain_training, "flops": necessary_training_flops,
          FP32_ELLA: lambda tasks: ella_training(tasks, precision="no"),
          FUSED_ELLA: lambda tasks: ella_training(tasks, fused_attention=True),
          "matmul": lambda tasks: matmul_throughput(used_dtype(), 10, MATMUL_SHAPES), "trained rank": trained_rank,
          **{variant: lambda tasks, variant=variant: evaluation(variant) for variant in EVAL_VARIANTS}}


def probe(name: str, tasks_used: int, environment: dict | None = None) -> dict:
    """One probe in a process of its own (with ``environment``, if given)."""
    command = [sys.executable, __file__, "--probe", name, "--tasks", str(tasks_used)]
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode:
        raise SystemExit(f"probe {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(rounds: int, tasks_used: int) -> dict:
    results = {"machine": machine(), "date": date.today().isoformat(), "rounds": rounds, "tasks": tasks_used}
    dtype = used_dtype()
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    step_shape = {"512x576x1536": MATMUL_SHAPES["512x576x1536"]}  # the other precision: one shape, for comparison
    results["matmul_dtypes"] = {"used": str(dtype).removeprefix("torch."), "other": str(other).removeprefix("torch.")}
    overrides = ella_overrides_mkl()
    products = {"used": ("matmul", None)}  # label -> (probe, environment), measured in every round
    probes = {"ella": ("ella", None), "plain": ("plain", MKL_OWN)}
    if overrides:
        products[f"used, {OWN_KERNELS}"] = ("matmul", MKL_OWN)
        probes[f"ella, {OWN_KERNELS}"] = ("ella", MKL_OWN)
    if dtype == torch.bfloat16:  # whether ella's choice of bf16 pays on this CPU, and keeps the predictions
        probes[FP32_ELLA] = (FP32_ELLA, None)
        if overrides:
            probes[f"{FP32_ELLA}, {OWN_KERNELS}"] = (FP32_ELLA, MKL_OWN)
        probes[FUSED_ELLA] = (FUSED_ELLA, None)
    measured = {label: [] for label in products}
    runs = {label: [] for label in probes}
    for r in range(rounds):
        # every other round in reverse order: of two processes taking the same step one after the other, the second
        # ran 1-16 % faster in six pairs out of six, so a fixed order would favour the variants listed last
        direction = -1 if r % 2 else 1
        for label, (name, environment) in list(products.items())[::direction]:
            measured[label].append(probe(name, tasks_used, environment))
        for label, (name, environment) in list(probes.items())[::direction]:
            runs[label].append(probe(name, tasks_used, environment))
            print(f"round {r + 1}: {label} {runs[label][-1]['step_seconds']:.2f} s/step", file=sys.stderr)
    # each shape's best round: the machine's capacity, whatever else slowed one round down
    results["matmul_flops_per_second"] = {label: {shape: max(m[shape] for m in rounds_measured)
                                                  for shape in MATMUL_SHAPES}
                                          for label, rounds_measured in measured.items()}
    results["matmul_flops_per_second"]["other"] = matmul_throughput(other, 3, step_shape)
    results["limit_flops_per_second"] = max(value for label, column in results["matmul_flops_per_second"].items()
                                            if label != "other" for value in column.values())
    results["training"] = runs
    results["step_ratio"] = [e["step_seconds"] / p["step_seconds"] for e, p in zip(runs["ella"], runs["plain"])]
    results["training_flops"] = probe("flops", tasks_used)
    results["evaluation"] = {variant: probe(variant, tasks_used)
                             for variant, (_, _, precision) in EVAL_VARIANTS.items() if precision == "auto"}
    if overrides:
        default = f"prefix cached, batch {EVAL_BATCH}"
        results["evaluation"][f"{default}, {OWN_KERNELS}"] = probe(default, tasks_used, MKL_OWN)
    if dtype == torch.bfloat16:
        results["evaluation"][FP32_EVAL] = probe(FP32_EVAL, tasks_used)
    results["trained_rank"] = probe("trained rank", tasks_used)
    return results


def write_report(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(results, indent=1) + "\n")
    m, limit = results["machine"], results["limit_flops_per_second"]
    lines = [
        "# Speed of ella's engine", "",
        f"Measured by `python benchmarks/speed.py{' --quick' if results['rounds'] == 1 else ''}` on "
        f"{describe_hardware(m)}, torch {m['torch']}, {results['date']}; "
        f"precision: {'bf16 autocast' if m['precision'] == 'bf16' else 'fp32'} (ella's choice for this CPU). "
        "Every figure comes from that one run; speed.json has them all.", "",
        "## The machine's limit", "",
        "Matrix products `x @ w`, TFLOP/s: the median of 10 in each round's own process, the best round; in the "
        "other precision one shape, the median of 3:", "",
    ]
    names = {"used": f"{results['matmul_dtypes']['used']} (used)",
             f"used, {OWN_KERNELS}": f"{results['matmul_dtypes']['used']}, {OWN_KERNELS}",
             "other": results["matmul_dtypes"]["other"]}
    columns = {label: results["matmul_flops_per_second"][label] for label in names
               if label in results["matmul_flops_per_second"]}
    lines += [f"| shape (m x k x n) | {' | '.join(names[label] for label in columns)} |",
              "|---|" + "---:|" * len(columns)]
    for shape in columns["used"]:
        lines.append(f"| {shape} | " + " | ".join(f"{column[shape] / 1e12:.3f}" if shape in column else ""
                                                  for column in columns.values()) + " |")
    overridden = f"ella, {OWN_KERNELS}" in results["training"]
    lines += ["", f"The limit used below: {limit / 1e12:.3f} TFLOP/s, the best of ella's precision"
              + (f" with the kernels ella has MKL take and with {OWN_KERNELS}." if overridden else "."),
              f"MKL's vendor check (`ella.cpu_kernels`): {m.get('mkl_vendor_check')}"
              + (f"; '{OWN_KERNELS}': a process with ELLA_MKL_OVERRIDE=0, as the plain loop." if overridden else "."),
              "",
              "## Training step", "",
              f"SmolLM2-135M, the first {TRAIN_EXAMPLES // BATCH} optimiser steps of each of {results['tasks']} "
              f"task(s) of Standard CL order 1 (batch {BATCH}, max length {MAX_LENGTH}, rank-8 LoRA on q and v, "
              f"dropout 0.1), {results['rounds']} round(s), the variants alternating (every other round in reverse "
              "order), each in its own process.",
              "",
              "| | step (s, median over rounds) | x limit | peak memory (GB) |", "|---|---:|---:|---:|"]
    needed = results["training_flops"]["flops_per_step"] / limit
    for label, rows in results["training"].items():
        step = statistics.median(r["step_seconds"] for r in rows)
        name = {"plain": "plain transformers + peft loop" + (f", {OWN_KERNELS}" if overridden else ""),
                "ella": "ella (`train_task`)", f"ella, {OWN_KERNELS}": f"ella (`train_task`), {OWN_KERNELS}"
                }.get(label, label)
        lines.append(f"| {name} | {step:.2f} | {step / needed:.2f} | "
                     f"{max(r['peak_rss_bytes'] for r in rows) / 1e9:.2f} |")
    flops = results["training_flops"]
    lines += ["", f"- ella / plain loop, per round: {', '.join(f'{r:.2f}' for r in results['step_ratio'])} "
              f"(median {statistics.median(results['step_ratio']):.2f})."]
    def against(label: str, base: str = "ella") -> str:  # a variant's step over another's, round by round
        return ", ".join(f"{v['step_seconds'] / e['step_seconds']:.2f}"
                         for v, e in zip(results["training"][label], results["training"][base]))

    if overridden:
        lines.append(f"- ella with {OWN_KERNELS} / with the kernels it has MKL take, per round: "
                     f"{against(f'ella, {OWN_KERNELS}')}"
                     + (f"; in fp32: {against(f'{FP32_ELLA}, {OWN_KERNELS}', FP32_ELLA)}."
                        if f"{FP32_ELLA}, {OWN_KERNELS}" in results["training"] else "."))
    if FP32_ELLA in results["training"]:
        lines.append(f"- ella in fp32 / in bf16 autocast (its choice), per round: {against(FP32_ELLA)} ('x limit' "
                     "of the fp32 row: against the bf16 limit).")
    if FUSED_ELLA in results["training"]:
        lines.append("- ella with torch's fused attention kernel / with plain matrix products (its choice under bf16 "
                     f"on a CPU), per round: {against(FUSED_ELLA)}.")
    lines += [f"- The step's necessary work: {flops['flops_per_step'] / 1e9:.0f} GFLOP over "
              f"{flops['tokens_per_step']:.0f} real tokens; at {limit / 1e12:.3f} TFLOP/s that takes {needed:.2f} s "
              "('x limit' is the step over that time).", "",
              "## Evaluation", "",
              f"{EVAL_EXAMPLES} test examples per task, the base model; FLOPs counted (batch {EVAL_BATCH}) on a "
              "second pass of the same evaluation. 'x limit': the time taken over the time its counted FLOPs need at "
              "the limit.", "",
              "| task, mode | variant | examples/s | GFLOP/example | x limit | accuracy |",
              "|---|---|---:|---:|---:|---:|"]
    for variant, rows in results["evaluation"].items():
        for label, row in rows.items():
            flops = row.get("flops_per_example")
            lines.append(f"| {label} | {variant} | {row['examples_per_second']:.2f} | "
                         + (f"{flops / 1e9:.1f} | {limit / (flops * row['examples_per_second']):.2f} | "
                            if flops else "| | ") + f"{row['accuracy']:.1f} |")
    if "trained_rank" in results:
        lines += ["", f"dbpedia's {EVAL_EXAMPLES} test examples after training on {TRAINED_EXAMPLES} of its examples "
                  f"(IncLoRA), batch {EVAL_BATCH}, two rounds alternating:", "",
                  "| | examples/s per round | accuracy |", "|---|---|---:|"]
        for variant, row in results["trained_rank"].items():
            speeds = ", ".join(f"{value:.2f}" for key, value in row.items() if key.startswith("examples/s"))
            lines.append(f"| {variant} | {speeds} | {row['accuracy']:.1f} |")
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round on one task")
    parser.add_argument("--probe", choices=PROBES, help="run one probe in this process and print its JSON")
    parser.add_argument("--tasks", type=int, default=2, help="with --probe: the tasks whose first steps it takes")
    parser.add_argument("--report-only", action="store_true", help="rewrite speed.md from speed.json")
    parser.add_argument("--tokens-per-pass", type=int, default=TrainingConfig.tokens_per_pass,
                        help="with --probe ella: the pass size of ella's step (printed as JSON, nothing written)")
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((RESULTS / "speed.json").read_text()))
        return
    if args.probe == "ella":
        print(json.dumps(ella_training(args.tasks, args.tokens_per_pass)))
        return
    if args.probe:
        print(json.dumps(PROBES[args.probe](args.tasks)))
        return
    results = measure(rounds=1 if args.quick else 3, tasks_used=1 if args.quick else 2)
    write_report(results)
    print((RESULTS / "speed.md").read_text())


if __name__ == "__main__":
    main()
