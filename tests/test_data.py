import json

import pytest

from ella import EllaError, load_cl_benchmark, load_task_sequence
from ella.data import resolve_data_dir


def test_order_one_in_the_papers_prompt_format(data_dir):
    tasks = load_cl_benchmark("standard", 1, data_dir=data_dir, train_per_task=5, test_per_task=3)
    assert [t.name for t in tasks] == ["dbpedia", "amazon", "yahoo", "agnews"]
    agnews = tasks[3]
    assert (len(agnews.train), len(agnews.test)) == (5, 3)
    example = agnews.test[0]
    assert agnews.prompt(example) == (
        "What is the topic of the following paragraph? Choose one from the option.\n"
        "Option: World, Sports, Business, Science or Technology \n" + example.input + "\nAnswer:")
    assert example.output in agnews.labels


def test_copa_has_no_instruction(data_dir):
    (copa,) = load_cl_benchmark(tasks=["COPA"], data_dir=data_dir, train_per_task=2, test_per_task=2)
    assert copa.prompt(copa.test[0]) == copa.test[0].input + "\nAnswer:"


def test_long_orders_have_fifteen_tasks(data_dir):
    for order in (4, 5, 6):
        tasks = load_cl_benchmark("long", order, data_dir=data_dir, train_per_task=1, test_per_task=1)
        assert len(tasks) == 15


def test_subsampling_is_seeded(data_dir):
    def sample(seed):
        return load_cl_benchmark(tasks=["CB"], data_dir=data_dir, train_per_task=20, test_per_task=10, seed=seed)[0]

    assert sample(1).train == sample(1).train
    assert sample(1).train != sample(2).train
    full = load_cl_benchmark(tasks=["CB"], data_dir=data_dir)[0]
    assert (len(full.train), len(full.test)) == (250, 56)


@pytest.mark.parametrize("kwargs, message", [
    (dict(benchmark="standard", order=4), "order 4 belongs to --benchmark long"),
    (dict(benchmark="standard", order=9), "unknown order 9"),
    (dict(benchmark="mmlu"), "unknown benchmark"),
    (dict(tasks=["dbpedia", "imagenet"]), "unknown task.*imagenet.*known tasks:.*agnews"),
    (dict(tasks=["CB", "CB"]), "appears twice"),
    (dict(train_per_task=0), "at least 1"),
])
def test_benchmark_errors(data_dir, kwargs, message):
    with pytest.raises(EllaError, match=message):
        load_cl_benchmark(data_dir=data_dir, **kwargs)


def test_missing_data_directory(tmp_path, monkeypatch):
    with pytest.raises(EllaError, match="data directory not found"):
        load_cl_benchmark(data_dir=tmp_path / "nowhere")
    with pytest.raises(EllaError, match="orders.json not found"):
        load_cl_benchmark(data_dir=tmp_path)
    monkeypatch.setenv("ELLA_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path


def copy_task(data_dir, tmp_path, name="CB", group="NLI"):
    """A writable copy of one benchmark task (with the benchmark's orders and instructions)."""
    root = tmp_path / "cl_benchmark"
    (root / group / name).mkdir(parents=True)
    for file in ("orders.json", "instruction_config.json"):
        (root / file).write_text((data_dir / "cl_benchmark" / file).read_text())
    for file in ("train.json", "test.json", "labels.json"):
        (root / group / name / file).write_text((data_dir / "cl_benchmark" / group / name / file).read_text())
    return root / group / name


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "test.json").unlink(), "data file not found.*test.json"),
    (lambda d: (d / "train.json").write_text('[{"sentence": "a", "label": "entailment"'), "malformed JSON"),
    (lambda d: (d / "test.json").write_text('[{"sentence": "a", "label": "maybe"}]'),
     "'maybe' is not in the task's label set"),
    (lambda d: (d / "test.json").write_text("[]"), "holds no examples"),
    (lambda d: (d / "train.json").write_text('[{"text": "a"}]'), "expected an object with string fields"),
])
def test_broken_benchmark_files(data_dir, tmp_path, damage, message):
    damage(copy_task(data_dir, tmp_path))
    with pytest.raises(EllaError, match=message):
        load_cl_benchmark(tasks=["CB"], data_dir=tmp_path)


def test_own_task_sequence(sequence_file):
    tasks = load_task_sequence(sequence_file, train_per_task=4)
    assert [t.name for t in tasks] == ["colour", "parity"]
    assert len(tasks[0].train) == 4 and len(tasks[0].test) == 6
    assert tasks[0].prompt(tasks[0].test[0]) == "Colour? Option: red, blue \nsea 0\nAnswer:"


def test_own_task_without_labels_or_instruction(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"input": "2+2", "output": "4"}\n\n{"input": "3+3", "output": "6"}\n')
    (tmp_path / "seq.json").write_text(json.dumps({"tasks": [{"name": "qa", "train": "qa.jsonl", "test": "qa.jsonl"}]}))
    (task,) = load_task_sequence(tmp_path / "seq.json")
    assert task.labels is None and task.prompt(task.train[0]) == "2+2\nAnswer:"


def test_validation_sample_is_apart_from_the_training_sample_and_the_test_set(sequence_file):
    plain = load_task_sequence(sequence_file, train_per_task=4)
    tasks = load_task_sequence(sequence_file, train_per_task=4, validation_per_task=8)
    for task, without in zip(tasks, plain):
        assert task.train == without.train  # the training sample is the one drawn without validation
        inputs = {split: [e.input for e in getattr(task, split)] for split in ("train", "validation", "test")}
        # 12 training rows (sky 0..11 / 0..11), 4 train: the validation sample is the other 8, in file order
        everything = [f"sky {i}" for i in range(12)] if task.name == "colour" else [str(i) for i in range(12)]
        assert inputs["validation"] == [x for x in everything if x not in inputs["train"]]
        assert not set(inputs["validation"]) & set(inputs["test"])
        assert task.describe()["validation"] == 8 and "validation" not in without.describe()
    assert load_task_sequence(sequence_file, train_per_task=4, validation_per_task=3)[0].train == plain[0].train


def test_validation_sample_is_seeded_and_leaves_the_training_sample_alone(data_dir):
    def sample(seed, validation):
        return load_cl_benchmark(tasks=["CB"], data_dir=data_dir, train_per_task=20, test_per_task=10, seed=seed,
                                 validation_per_task=validation)[0]

    task = sample(1, 30)
    assert len(task.validation) == 30 and task.validation == sample(1, 30).validation
    assert task.validation != sample(2, 30).validation
    assert task.train == sample(1, 0).train and sample(1, 0).validation == []
    rows = {id(e) for e in task.train}  # one parse of train.json: an object per row
    assert len({id(e) for e in task.validation}) == 30 and not rows & {id(e) for e in task.validation}
    assert not {e.input for e in task.validation} & {e.input for e in task.test}
    for benchmark, name in (("superni", "task363_sst2_polarity_classification"), ("trace", "ScienceQA")):
        for task in load_cl_benchmark(benchmark, tasks=[name], data_dir=data_dir, train_per_task=3, test_per_task=1,
                                      validation_per_task=2):  # their loaders draw it the same way
            assert len(task.validation) == 2 and not {e.input for e in task.validation} & {e.input for e in task.train}


@pytest.mark.parametrize("kwargs, message", [
    (dict(train_per_task=240, validation_per_task=20),
     "CB: .*train.json has 250 training examples, too few for 240 training \\+ 20 validation examples; lower "
     "--train-per-task or --validation-per-task \\(together at most 250\\)"),
    (dict(validation_per_task=20), "give --train-per-task too \\(at most 230"),
    (dict(train_per_task=5, validation_per_task=-1),
     "validation_per_task must be 0 \\(no validation sample\\) or more"),
])
def test_validation_sample_errors(data_dir, kwargs, message):
    with pytest.raises(EllaError, match=message):
        load_cl_benchmark(tasks=["CB"], data_dir=data_dir, **kwargs)


@pytest.mark.parametrize("edit, message", [
    (lambda spec, d: spec["tasks"][0].update(labels=["red"]), "'blue' is not in the task's label set"),
    (lambda spec, d: spec["tasks"][1].update(name="colour"), "appears twice"),
    (lambda spec, d: spec["tasks"][0].update(train="missing.jsonl"), "data file not found"),
    (lambda spec, d: spec["tasks"][0].update(shots=3), "unknown keys"),
    (lambda spec, d: spec.update(tasks=[]), "at least one task"),
    (lambda spec, d: (d / "colour" / "train.jsonl").write_text('{"input": "x", "output": "red"}\n{"input": \n'),
     "line 2: malformed JSON"),
])
def test_own_sequence_errors(sequence_file, edit, message):
    spec = json.loads(sequence_file.read_text())
    edit(spec, sequence_file.parent)
    sequence_file.write_text(json.dumps(spec))
    with pytest.raises(EllaError, match=message):
        load_task_sequence(sequence_file)


def test_malformed_sequence_file(tmp_path):
    (tmp_path / "seq.json").write_text("{tasks: []}")
    with pytest.raises(EllaError, match="malformed JSON at line 1"):
        load_task_sequence(tmp_path / "seq.json")
    with pytest.raises(EllaError, match="task sequence file not found"):
        load_task_sequence(tmp_path / "nope.json")


def test_superni_prompt_orders_and_metrics(data_dir):
    for order in (1, 2):
        assert len(load_cl_benchmark("superni", order, data_dir=data_dir, train_per_task=1, test_per_task=1)) == 15
    sst2, xsum = load_cl_benchmark("superni", tasks=["task363_sst2_polarity_classification",
                                                     "task1290_xsum_summarization"], data_dir=data_dir,
                                   train_per_task=2, test_per_task=2)
    assert (sst2.metric, xsum.metric) == ("exact_match", "rouge_l") and sst2.labels is None
    prompt = sst2.prompt(sst2.test[0])
    assert prompt.startswith("Definition: In this task, you are given sentences from movie reviews.")
    assert "\n\nNow complete the following example -\nInput: " + sst2.test[0].input + "\nOutput:" in prompt
    quoref = load_cl_benchmark("superni", tasks=["task002_quoref_answer_generation"], data_dir=data_dir)[0]
    assert any(e.references for e in quoref.test)  # several acceptable outputs are kept for scoring


def test_trace_tasks_keep_their_metric_and_answer_cue(data_dir):
    tasks = {t.name: t for t in load_cl_benchmark("trace", data_dir=data_dir, train_per_task=3, test_per_task=2)}
    assert list(tasks) == ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds",
                           "20Minuten"]
    assert tasks["ScienceQA"].suffix == "\nAnswer:" and tasks["ScienceQA"].metric == "choice"
    assert not tasks["ScienceQA"].test[0].input.endswith("Answer:")
    assert tasks["Py150"].keep_input_end and tasks["Py150"].metric == "edit_similarity"
    assert tasks["20Minuten"].metric == "sari" and tasks["NumGLUE-cm"].metric == "number"
    assert "trains on eval.json" in tasks["MeetingBank"].source and len(tasks["MeetingBank"].train) == 3
    with pytest.raises(EllaError, match="unknown order 2 for the trace benchmark"):
        load_cl_benchmark("trace", 2, data_dir=data_dir)


def test_a_benchmark_task_records_its_source_relative_to_the_data_directory(data_dir):
    """results.json holds each task's source: no machine's absolute path, the same wherever the data lies."""
    dbpedia, agnews = load_cl_benchmark("standard", tasks=["dbpedia", "agnews"], data_dir=data_dir,
                                        train_per_task=2, test_per_task=2)
    assert (dbpedia.source, agnews.source) == ("cl_benchmark/TC/dbpedia", "cl_benchmark/TC/agnews")
    assert (data_dir / dbpedia.source / "labels.json").is_file()
