"""The lm-evaluation-harness adapter, end to end and offline, on local JSON tasks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from memlm.eval import harness  # noqa: E402
from memlm.eval.generation import greedy_generate  # noqa: E402

GEN_DOCS = [
    {"context": "The grass is green. The sky is", "answer": "blue"},
    {"context": "Here we go.", "answer": "There"},
    {"context": "One of the special magic numbers for calm-river is: 1234567. The special magic number is",
     "answer": "1234567"},
    {"context": "Make sure to memorize it. I will quiz you about the number afterwards. The number",
     "answer": "x"},
    {"context": "A", "answer": "B"},
]
BASED_DOCS = [  # the Based recall format (a document, maybe ending in its question; gold answers)
    {"context": "The sky is blue. The grass is green. What color is the sky?",
     "question": "what color is the sky?", "answers": ["blue"]},
    {"context": "One of the special magic numbers for calm-river is: 1234567.", "question": "The number is",
     "answers": ["1234567", "1,234,567"]},
]
BASED_PROMPTS = [  # the trailing copy of the question dropped, then ". " and the question
    "The sky is blue. The grass is green. what color is the sky?",
    "One of the special magic numbers for calm-river is: 1234567. The number is",
]
MC_DOCS = [
    {"question": "The sun is", "choices": ["yellow.", "green.", "a pass key."], "label": 0},
    {"question": "There and back", "choices": ["again.", "forth."], "label": 0},
    {"question": "What is the pass key?", "choices": ["The pass key is 42.", "None."], "label": 1},
]


def _write_task(folder, name: str, docs: list[dict], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}metadata:\n  version: 1.0\n"
    )


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(logp[t - 1, whole[t]].item() for t in range(n_ctx, len(whole)))


def test_local_json_tasks_match_direct_computation(tmp_path, monkeypatch, checkpoint_dir, memlm_model,
                                                    tokenizer):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_task(tasks, "local_gen", GEN_DOCS,
                'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{answer}}"\n'
                'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
                "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    _write_task(tasks, "local_mc", MC_DOCS,
                'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                "doc_to_target: label\n"
                "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    # memlm's own based_drop task (prompt, generation settings, `contains`) on a local file
    (tasks / "based.jsonl").write_text("".join(json.dumps(d) + "\n" for d in BASED_DOCS))
    (tasks / "local_based.yaml").write_text(
        f"include: {harness.TASKS_DIR / 'based_drop.yaml'}\ntask: local_based\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {tasks / 'based.jsonl'}\n")
    out = tmp_path / "results.json"
    # batch 4: prompts of different lengths share a batch, as lm-eval left-pads them
    assert harness.main(["--model", str(checkpoint_dir), "--tasks", "local_gen,local_mc,local_based",
                         "--include-path", str(tasks), "--device", "cpu", "--dtype", "float32",
                         "--batch-size", "4", "--log-samples", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"local_gen", "local_mc", "local_based"}

    for sample in results["samples"]["local_gen"]:
        doc = sample["doc"]
        expected = greedy_generate(memlm_model, tokenizer, [doc["context"]], 6)[0].split("\n")[0]
        assert sample["resps"][0][0] == expected
    based = sorted(results["samples"]["local_based"], key=lambda x: x["doc_id"])
    for sample, doc, prompt in zip(based, BASED_DOCS, BASED_PROMPTS, strict=True):
        output = greedy_generate(memlm_model, tokenizer, [prompt], 48)[0].split("\n")[0]
        assert sample["arguments"][0][0] == prompt and sample["resps"][0][0] == output
        assert sample["contains"] == float(any(a.lower() in output.lower() for a in doc["answers"]))
    for sample in results["samples"]["local_mc"]:
        doc = sample["doc"]
        got = [float(r[0][0]) for r in sample["resps"]]
        want = [_loglikelihood(memlm_model, tokenizer, doc["question"], " " + c) for c in doc["choices"]]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert sample["acc"] == float(max(range(len(want)), key=want.__getitem__) == doc["label"])

    # batch size 1: the same generations and log-likelihoods
    one = tmp_path / "one.json"
    assert harness.main(["--model", str(checkpoint_dir), "--tasks", "local_gen,local_mc",
                         "--include-path", str(tasks), "--device", "cpu", "--dtype", "float32",
                         "--batch-size", "1", "--log-samples", "--output", str(one)]) == 0
    single = json.loads(one.read_text())["samples"]
    for task in ("local_gen", "local_mc"):
        by_id = {s["doc_id"]: s for s in single[task]}
        assert len(by_id) == len(results["samples"][task])
        for sample in results["samples"][task]:
            alone = by_id[sample["doc_id"]]
            if task == "local_gen":
                assert sample["resps"] == alone["resps"]
            else:
                got = [float(r[0][0]) for r in sample["resps"]]
                assert got == pytest.approx([float(r[0][0]) for r in alone["resps"]], rel=1e-5, abs=1e-5)

    # lm-eval's own command line with the registered type: the same numbers
    lm_out = tmp_path / "lm_eval_out"
    model_args = f"pretrained={checkpoint_dir},dtype=float32"
    assert harness.main(["lm-eval", "--model", "memlm", "--model_args", model_args, "--device", "cpu",
                         "--tasks", "local_mc", "--include_path", str(tasks), "--batch_size", "2",
                         "--output_path", str(lm_out)]) == 0
    (path,) = lm_out.rglob("results_*.json")
    assert json.loads(path.read_text())["results"]["local_mc"]["acc,none"] == pytest.approx(
        results["results"]["local_mc"]["acc,none"])


def test_registered_model_and_groups():
    from lm_eval.api.registry import get_model

    assert get_model("memlm") is harness.MemLMLM
    tm = harness.task_manager()
    for name in ("memlm_commonsense", "memlm_recall", *harness.COMMONSENSE_TASKS, *harness.RECALL_TASKS):
        assert name in tm.all_tasks, name


def test_based_prompt_and_contains_score():
    from memlm.eval.tasks import based_utils

    doc = {"context": "[DOC] [TLE] Paris is the capital of France. Capital of France?",
           "question": "capital of france?", "answers": ["Paris", "paris, France"]}
    assert based_utils.triviaqa_doc_to_text(doc) == "Paris is the capital of France. capital of france?"
    assert based_utils.doc_to_target(doc) == " Paris"
    assert based_utils.process_results(doc, [" PARIS, of course"]) == {"contains": 1.0}
    assert based_utils.process_results(doc, [" Lyon"]) == {"contains": 0.0}
