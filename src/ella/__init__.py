"""ella: continual (lifelong) learning of large language models.

    import ella
    model, tokenizer = ella.load_model("smollm2-135m")
    tasks = ella.load_cl_benchmark("standard", order=1, train_per_task=64, test_per_task=64)
    model, result = ella.run_sequence(model, tokenizer, tasks, ella.get_method("ella", lam=3e4))
    print(result.matrix, result.metrics())

Or drop a method into your own training loop: ``method.prepare`` before a task, ``loss + method.penalty(model)``
at every step, ``method.finish`` after the task (see the README).
"""

from .data import Example, Task, load_cl_benchmark, load_task_sequence
from .engine import EvaluationConfig, SequenceResult, TrainingConfig, run_sequence
from .errors import EllaError
from .methods import ELLA, METHODS, ContinualMethod, IncLoRA, SeqFT, SeqLoRA, get_method, register
from .metrics import summarize
from .models import load_model, save_model

__version__ = "0.2.0"
__all__ = ["ELLA", "METHODS", "ContinualMethod", "EllaError", "EvaluationConfig", "Example", "IncLoRA", "SeqFT",
           "SeqLoRA", "SequenceResult", "Task", "TrainingConfig", "get_method", "load_cl_benchmark", "load_model",
           "load_task_sequence", "register", "run_sequence", "save_model", "summarize"]
