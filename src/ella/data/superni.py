"""SuperNI (Super-NaturalInstructions) tasks: ``superni/<task>/{train,dev,test}.json``, each a SuperNI task dict
(``Definition``, ``Instances: [{"input", "output": [...] or str}]``).

Prompt (Tk-Instruct's, without demonstrations)::

    Definition: <definition>\n\nNow complete the following example -\nInput: <input>\nOutput:

The target is the instance's first output; every listed output counts as correct when scoring. Metric: exact match
for the classification tasks (their name ends in ``_classification``), ROUGE-L for the others.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EllaError
from .tasks import Example, Task, read_json_object, sample_training_split, subsample

PREFIX = "Definition: {definition}\n\nNow complete the following example -\nInput: "
SUFFIX = "\nOutput:"


def _instances(file: Path) -> tuple[str, list[Example]]:
    spec = read_json_object(file)
    definition, instances = spec.get("Definition"), spec.get("Instances")
    if isinstance(definition, list):
        definition = " ".join(definition)
    if not isinstance(definition, str) or not isinstance(instances, list):
        raise EllaError(f"{file}: expected a SuperNI task with a \"Definition\" and a list of \"Instances\"")
    examples = []
    for index, instance in enumerate(instances):
        outputs = instance.get("output") if isinstance(instance, dict) else None
        outputs = [outputs] if isinstance(outputs, str) else outputs  # some task files give one string
        if not (isinstance(instance, dict) and isinstance(instance.get("input"), str)
                and isinstance(outputs, list) and outputs and all(isinstance(o, str) for o in outputs)):
            raise EllaError(f"{file}, instance {index}: expected {{\"input\": str, \"output\": [str, ...] or str}}")
        examples.append(Example(instance["input"], outputs[0].strip(), tuple(o.strip() for o in outputs[1:])))
    if not examples:
        raise EllaError(f"{file} holds no instances; every task needs train and test examples")
    return definition, examples


def load_task(name: str, directory: Path, n_train: int | None, n_test: int | None, n_validation: int, seed: int,
              source: str) -> Task:
    definition, examples = _instances(directory / "train.json")
    _, test = _instances(directory / "test.json")
    train, validation = sample_training_split(examples, n_train, n_validation, seed, name, directory / "train.json")
    return Task(name, train, subsample(test, n_test, seed, f"{name}/test"),
                prefix=PREFIX.format(definition=definition.strip()), suffix=SUFFIX,
                metric="exact_match" if name.endswith("_classification") else "rouge_l", source=source,
                validation=validation)
