"""Task sequences: the CL benchmark, your own JSON/JSONL tasks, and their tokenization."""

from .cl_benchmark import BENCHMARK_ORDERS, load_cl_benchmark, resolve_data_dir
from .encoding import IGNORE_INDEX, Encoded, TaskEncoder, collate
from .tasks import Example, Task, load_task_sequence

__all__ = ["BENCHMARK_ORDERS", "IGNORE_INDEX", "Encoded", "Example", "Task", "TaskEncoder", "collate",
           "load_cl_benchmark", "load_task_sequence", "resolve_data_dir"]
