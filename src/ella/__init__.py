"""ella: continual (lifelong) learning of large language models.

    import ella
    model, tokenizer = ella.load_model("smollm2-135m")
    tasks = ella.load_cl_benchmark("standard", order=1, train_per_task=64, test_per_task=64)
    model, result = ella.run_sequence(model, tokenizer, tasks, ella.get_method("ella", lam=3e4))
    print(result.matrix, result.metrics())

Or drop a method into your own training loop: ``method.setup(model, tasks)`` once, ``method.prepare`` before a
task, ``loss + method.penalty(model)`` at every step, ``method.finish`` after the task (see the README).
"""

from . import cpu_kernels

cpu_kernels.configure()  # before torch loads: the kernel libraries read these settings at their first use

from .data import Example, Task, load_cl_benchmark, load_task_sequence
from .engine import EvaluationConfig, SequenceResult, TrainingConfig, run_sequence
from .errors import EllaError
from .methods import METHODS, PARTS, ContinualMethod, TaskData, get_method, register_method, register_part
from .metrics import summarize
from .models import load_model, save_model
from .runspec import RunSpec, run

__version__ = "0.8.0"
__all__ = ["METHODS", "PARTS", "ContinualMethod", "EllaError", "EvaluationConfig", "Example", "SequenceResult", "Task",
           "TaskData", "TrainingConfig", "get_method", "load_cl_benchmark", "load_model", "load_task_sequence",
           "register_method", "register_part", "run", "RunSpec", "run_sequence", "save_model", "summarize"]

# ella inside Hugging Face Trainer / TRL (ella.trainer), imported on first use: it imports transformers' Trainer.
_TRAINER_API = ("ContinualCallback", "ContinualTrainer", "continual", "run_sequence_with_trainer", "task_data",
                "trainer_steps", "training_arguments")
__all__ += _TRAINER_API


def __getattr__(name: str):
    if name in _TRAINER_API:
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'ella' has no attribute {name!r}")
