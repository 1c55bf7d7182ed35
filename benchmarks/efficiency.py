"""Efficiency of ella's methods, measured in one run: CL state size, training-step time and memory, and the
penalty error of the compressed W_past representations. (Evaluation throughput, against the machine's limit, is
benchmarks/speed.py's.)

    python benchmarks/efficiency.py                  # 66 minutes on 2 AVX2 cores (AMD EPYC, fp32)
    python benchmarks/efficiency.py --quick          # fewer repetitions, for a look

Writes benchmarks/results/efficiency.md (the tables) and efficiency.json (every figure). Model: SmolLM2-135M
(ella's built-in smollm2-135m); T5-large and LLaMA-3.1-8B enter only through their configs (shapes, no weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ella  # before torch: its settings of torch's CPU kernel libraries are read when torch loads

import torch

from ella.data import TaskEncoder, collate
from ella.engine import (ProcessShare, TrainingConfig, make_accelerator, peak_memory, resolve_mixed_precision,
                         train_task, training_dropout)
from ella.evaluation import answer_token_nll
from ella.methods import METHODS, TaskData, get_method
from ella.methods.w_past import LowRank, PastUpdates
from ella.provenance import describe_hardware, hardware

RESULTS = Path(__file__).parent / "results"
MODEL, STEP_MAX_LENGTH = "smollm2-135m", 128  # the measured model; the step probe's prompts: 8 x at most 128 tokens
TASK_COUNTS = (1, 4, 15, 100)
RANK = 8  # LoRA rank of the papers
SVD_RANKS = (8, 16, 32, 64)
STEP_METHODS = {  # label -> (method, hyper-parameters)
    "inclora (plain LoRA step)": ("inclora", {}),
    "seqlora": ("seqlora", {}),
    "ella (default: factors, W² cached)": ("ella", {}),
    "ella, factors, no cache": ("ella", {"w_past_cache": False}),
    "ella, dense": ("ella", {"w_past": "dense"}),
    "ella, svd R=64": ("ella", {"w_past": "svd"}),
}
DEFAULT_ELLA = "ella (default: factors, W² cached)"
PRECISION = ("bf16 autocast" if resolve_mixed_precision("auto") == "bf16"
             else "fp32 (ella's choice: this CPU has neither AVX-512 BF16 nor AMX)")


# ---------------------------------------------------------------------------------------------------------------
# 1. CL state bytes, from the shapes of the adapted matrices


def adapted_shapes(model_name: str) -> list[tuple[int, int]]:
    """(d_out, d_in) of every matrix LoRA adapts by default (attention q and v), from the config alone."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, T5Config, T5ForConditionalGeneration

    if model_name == "SmolLM2-135M":
        config = AutoConfig.from_pretrained(ella.models.smollm2_path())
    elif model_name == "T5-large":
        config = T5Config(d_model=1024, d_kv=64, d_ff=4096, num_heads=16, num_layers=24, vocab_size=32128)
    else:  # LLaMA-3.1-8B
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=128256)
    with torch.device("meta"):
        model = (T5ForConditionalGeneration(config) if config.is_encoder_decoder
                 else AutoModelForCausalLM.from_config(config))
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[config.model_type]
    return [tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def state_bytes(shapes: list[tuple[int, int]], tasks: int) -> dict[str, int]:
    """fp32 bytes each method keeps between tasks, after ``tasks`` tasks of rank-8 LoRA."""
    dense = sum(o * i for o, i in shapes)
    per_rank = sum(o + i for o, i in shapes)  # one column of left and right factors for every module
    a_only = sum(i for _, i in shapes)
    factors = sum(min((o + i) * RANK * tasks, o * i) for o, i in shapes)  # dense once that is smaller
    sizes = {"ELLA dense": dense, "ELLA factors (exact)": factors}
    sizes.update({f"ELLA svd R={r}": per_rank * min(RANK * tasks, r) for r in SVD_RANKS})
    sizes.update({"O-LoRA, ella (past A's)": a_only * RANK * tasks,
                  "O-LoRA / IncLoRA as published (all past A, B)": per_rank * RANK * tasks,
                  "IncLoRA, ella (merged)": 0})
    return {name: 4 * floats for name, floats in sizes.items()}


def measured_state_bytes(shapes: list[tuple[int, int]], tasks: int) -> dict[str, int]:
    """The same for ELLA, from the real ``PastUpdates`` fed random rank-8 updates (checks the formula)."""
    generator = torch.Generator().manual_seed(0)
    stores = {"ELLA factors (exact)": PastUpdates("factors"),
              **{f"ELLA svd R={r}": PastUpdates("svd", rank=r) for r in SVD_RANKS}}
    for _ in range(tasks):
        for index, (d_out, d_in) in enumerate(shapes):
            update = LowRank(torch.randn(d_out, RANK, generator=generator),
                             torch.randn(d_in, RANK, generator=generator))
            for store in stores.values():
                store.add(str(index), update)
    return {name: store.nbytes() for name, store in stores.items()}


# ---------------------------------------------------------------------------------------------------------------
# 2. One training step per method (each in its own process: time and peak memory)


def step_probes() -> dict[str, tuple[str, dict]]:
    """label -> (method, hyper-parameters): ``STEP_METHODS``, then every other registered method at its defaults."""
    listed = {method for method, _ in STEP_METHODS.values()}
    return {**STEP_METHODS, **{name: (name, {}) for name in sorted(METHODS) if name not in listed}}


def step_probe(method_name: str, hyperparameters: dict, steps: int) -> dict:
    """Step time of ``method`` on a fixed batch (8 x 128 tokens) during its second task, and the peak RSS; the
    engine's dropout (``training_dropout``), so the step is the one ``train_task`` takes.

    Steps alternate with and without the method's penalty, so the penalty's own cost is also measured paired,
    in the same process on the same batch (the ratio of each step to its neighbour without the penalty).
    """
    torch.manual_seed(0)
    model, tokenizer = ella.load_model(MODEL)
    tasks = ella.load_cl_benchmark(tasks=["dbpedia", "agnews"], train_per_task=8, test_per_task=1)
    sequence = [TaskEncoder(tokenizer, task, STEP_MAX_LENGTH, False).training(task.train) for task in tasks]
    method = get_method(method_name, **hyperparameters)
    method.setup(model, tasks)
    data = []
    for t, (task, num_steps) in enumerate(zip(tasks, (1, 2 * steps + 2))):  # the first task: one step, untimed
        items = method.training_items(t, sequence) or sequence[t]  # MTL trains nothing at its second task
        batch = collate(items[:8], tokenizer.pad_token_id, False)
        data.append((batch, TaskData(items, num_steps, lambda batch_size=1, limit=None, b=batch: iter([b]))))
    model = method.prepare(model, 0, tasks[0], data[0][1])
    with torch.no_grad():  # a first task's update that is not zero, so that W_past (and O-LoRA's A's) are real
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and "lora_B" in name:
                parameter.normal_(0, 0.01)
    method.after_step(model)  # its one optimiser step's hook (JumpLoRA's threshold follows the schedule)
    model = method.finish(model, 0, tasks[0], data[0][1])
    batch, second = data[1]
    model = method.prepare(model, 1, tasks[1], second)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = {True: [], False: []}
    with training_dropout(ProcessShare()):
        for step in range(2 * steps + 2):
            with_penalty = step % 2 == 0
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_mixed_precision("auto") == "bf16"):
                nll, mask = answer_token_nll(model, batch)
                loss = nll.sum() / mask.sum()
            (loss + method.penalty(model) if with_penalty else loss).backward()
            method.after_backward(model)
            optimizer.step()
            optimizer.zero_grad()
            method.after_step(model)
            if step >= 2:  # warm-up
                times[with_penalty].append(time.perf_counter() - start)
    return {"step_seconds": statistics.median(times[True]),
            "penalty_ratio": statistics.median(a / b for a, b in zip(times[True], times[False])),
            "peak_rss_bytes": peak_memory()["bytes"]}


def step_table(rounds: int, steps: int) -> dict:
    """Every method's step in its own process, methods interleaved round by round; ratios to the plain LoRA step
    of the same round, so that the machine's drift cancels."""
    probes = step_probes()
    runs: dict[str, list[dict]] = {label: [] for label in probes}
    for round_index in range(rounds):
        for label, (method_name, hyperparameters) in probes.items():
            command = [sys.executable, __file__, "--probe", method_name, json.dumps(hyperparameters),
                       "--steps", str(steps)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[label].append(json.loads(output.strip().splitlines()[-1]))
            print(f"  round {round_index + 1}: {label}: {runs[label][-1]['step_seconds']:.3f} s", file=sys.stderr)
    reference = runs["inclora (plain LoRA step)"]
    return {label: {
        "step_seconds": statistics.median(r["step_seconds"] for r in results),
        "ratio_to_plain_lora": statistics.median(r["step_seconds"] / ref["step_seconds"]
                                                 for r, ref in zip(results, reference)),
        "penalty_ratio": statistics.median(r["penalty_ratio"] for r in results),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
    } for label, results in runs.items()}


# ---------------------------------------------------------------------------------------------------------------
# 3. Penalty error of the compressed representations, on real LoRA updates


def record_merged_updates(method) -> list[dict[str, LowRank]]:
    """The list that receives every task's merged update as ELLA's part adds it to W_past (its ``accumulate``,
    wrapped on this instance), to rebuild W_past in each representation afterwards."""
    part, history = method.parts["ella"], []
    add_to_w_past = part.accumulate

    def accumulate(model):
        history.append({name: LowRank(u.left.detach().clone(), u.right.detach().clone())
                        for name, u in part.update.merged_updates(model).items()})
        add_to_w_past(model)

    part.accumulate = accumulate
    return history


def penalty_errors(order: str, examples: int) -> dict:
    """Train ELLA through the Long Sequence benchmark (order ``order``, ``examples`` per task); after each task t,
    compare the penalty of task t+1's update under each representation of W_past with the dense value."""
    model, tokenizer = ella.load_model(MODEL)
    tasks = ella.load_cl_benchmark("long", order, train_per_task=examples, test_per_task=1)
    training = TrainingConfig(batch_size=8, max_length=256, warmup_ratio=0.0)
    accelerator = make_accelerator(training)
    model = model.to(accelerator.device)
    method = get_method("ella", w_past="dense")
    history = record_merged_updates(method)
    method.setup(model, tasks)
    for t, task in enumerate(tasks):
        items = TaskEncoder(tokenizer, task, 256, False).training(task.train)
        model, _ = train_task(model, method, t, task, items, tokenizer, accelerator, training, len(tasks))
        print(f"  trained task {t + 1}/{len(tasks)} ({task.name})", file=sys.stderr)
    errors: dict[str, list[float]] = {f"svd R={r}": [] for r in SVD_RANKS}
    errors["factors (exact)"] = []
    stores = {name: PastUpdates("factors" if name.startswith("factors") else "svd",
                                rank=int(name.split("=")[1]) if "=" in name else 64) for name in errors}
    reference = PastUpdates("dense")
    with torch.no_grad():
        for t, updates in enumerate(history[:-1]):
            for name, update in updates.items():
                reference.add(name, update)
                for store in stores.values():
                    store.add(name, update)
            probe = history[t + 1]
            exact = reference.penalty(probe).item()
            for label, store in stores.items():
                errors[label].append(abs(store.penalty(probe).item() - exact) / exact)
    return {"tasks": [task.name for task in tasks], "relative_error_after_task": errors}


# ---------------------------------------------------------------------------------------------------------------


def megabytes(value: int) -> str:
    return f"{value / 2 ** 20:,.2f}"


def write_report(results: dict) -> None:
    lines = ["# Efficiency of ella's methods", "",
             f"Measured by `python benchmarks/efficiency.py` on {results['machine']}, {results['date']}; "
             f"torch {torch.__version__}. Every figure below comes from that one run; efficiency.json has them all.",
             "", "## CL state kept between tasks (MB, fp32)", "",
             "Rank-8 LoRA on attention q and v. ELLA's factored sizes were checked against the real `PastUpdates` "
             "for SmolLM2 (same bytes).", ""]
    for model_name, by_tasks in results["state_bytes"].items():
        names = list(next(iter(by_tasks.values())))
        lines += [f"### {model_name} ({results['adapted_matrices'][model_name]} adapted matrices)", "",
                  "| kept state | " + " | ".join(f"{t} tasks" for t in by_tasks) + " |",
                  "|---|" + "---:|" * len(by_tasks)]
        lines += [f"| {name} | " + " | ".join(megabytes(by_tasks[t][name]) for t in by_tasks) + " |" for name in names]
        lines.append("")
    steps = results["training_step"]
    lines += ["## Training step: time and memory", "",
              f"SmolLM2-135M, one batch of 8 x 128 tokens, {PRECISION}, the second task of a sequence (so ELLA has a "
              f"W_past). Each method runs in its own process; methods interleaved over {results['rounds']} rounds, "
              f"{results['steps']} timed steps each; the ratio is the median of each round's ratio to the plain LoRA "
              "step. The penalty's own cost is measured paired as well: within each process, steps alternate with "
              "and without the method's penalty on the same batch (1.000 for methods without one). Peak memory is "
              "the process's peak resident set (model, optimizer, activations included).", "",
              "| method | step (s) | ratio to plain LoRA (across processes) | with / without its penalty (paired) "
              "| peak memory (MB) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {label} | {v['step_seconds']:.3f} | {v['ratio_to_plain_lora']:.3f} | {v['penalty_ratio']:.3f} | "
              f"{megabytes(v['peak_rss_bytes'])} |" for label, v in steps.items()]
    lines += ["", "Evaluation throughput, against the machine's limit, is measured by `benchmarks/speed.py` "
              "([speed.md](speed.md))."]
    errors = results["penalty_error"]["relative_error_after_task"]
    lines += ["", "## Penalty error of the compressed W_past", "",
              f"ELLA (dense W_past, λ = 3e4) trained through the Long Sequence benchmark, order "
              f"{results['penalty_error_order']}, {results['penalty_error_examples']} examples per task on "
              "SmolLM2-135M. After each task t, the penalty of task t+1's real update against W_past in each "
              "representation, relative to the dense value.", "",
              "| representation | " + " | ".join(f"after {t + 1}" for t in range(len(errors["factors (exact)"])))
              + " | max |", "|---|" + "---:|" * (len(errors["factors (exact)"]) + 1)]
    lines += [f"| {label} | " + " | ".join(f"{100 * e:.2f}%" for e in values) + f" | {100 * max(values):.2f}% |"
              for label, values in errors.items()]
    lines += ["", "## Conclusion", "", results["conclusion"], ""]
    (RESULTS / "efficiency.md").write_text("\n".join(lines))


def conclusion(results: dict) -> str:
    """Which W_past representation to default to: the smallest that keeps the penalty within 1 % of the dense one
    over the whole measured sequence, at the standard (4 tasks) and long (15 tasks) lengths; and the step cost."""
    errors = results["penalty_error"]["relative_error_after_task"]
    exact = [label for label, values in errors.items() if max(values) < 0.01]
    sizes = results["state_bytes"]["SmolLM2-135M"]
    text = [f"Representations that keep ELLA's penalty within 1 % of the dense value after every task of the "
            f"15-task sequence: {', '.join(exact)} (and dense itself)."]
    for tasks in (4, 15):
        candidates = {label: sizes[tasks][f"ELLA {label}"] for label in exact + ["dense"]}
        best = min(candidates, key=candidates.get)
        text.append(f"After {tasks} tasks the smallest of them is {best} ({megabytes(candidates[best])} MB on "
                    f"SmolLM2-135M).")
    text.append("ella therefore keeps W_past as exact factors by default (dense once a module's factors would not be "
                "smaller); `--w-past svd --w-past-rank R` trades the error in the table above for a constant, smaller "
                "state.")
    ella = results["training_step"][DEFAULT_ELLA]
    text.append(f"ELLA's default step takes {ella['ratio_to_plain_lora']:.3f}x a plain LoRA step across processes "
                f"and {ella['penalty_ratio']:.3f}x the same step without its penalty (paired).")
    return " ".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, fewer steps and examples")
    parser.add_argument("--probe", nargs=2, metavar=("METHOD", "HYPERPARAMETERS"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:  # the child process of the step table
        import transformers

        transformers.utils.logging.set_verbosity_error()
        print(json.dumps(step_probe(args.probe[0], json.loads(args.probe[1]), args.steps)))
        return
    rounds, steps, error_examples = (1, 3, 16) if args.quick else (3, 4, 32)
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"machine": describe_hardware(hardware(torch.device("cpu"))), "date": time.strftime("%Y-%m-%d"),
               "rounds": rounds, "steps": steps, "penalty_error_order": "4", "penalty_error_examples": error_examples}
    models = ("SmolLM2-135M", "T5-large", "LLaMA-3.1-8B")
    shapes = {name: adapted_shapes(name) for name in models}
    results["adapted_matrices"] = {name: len(s) for name, s in shapes.items()}
    results["state_bytes"] = {name: {t: state_bytes(shapes[name], t) for t in TASK_COUNTS} for name in models}
    for t in TASK_COUNTS:  # the formula agrees with the real store
        measured = measured_state_bytes(shapes["SmolLM2-135M"], t)
        for label, value in measured.items():
            assert value == results["state_bytes"]["SmolLM2-135M"][t][label], (label, t, value)
    print("state sizes done", file=sys.stderr)
    results["training_step"] = step_table(rounds, steps)
    results["penalty_error"] = penalty_errors("4", error_examples)
    results["conclusion"] = conclusion(results)
    (RESULTS / "efficiency.json").write_text(json.dumps(results, indent=2))
    write_report(results)
    print(f"wrote {RESULTS / 'efficiency.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
