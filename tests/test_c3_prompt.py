"""The C3 prompt (evaluation/tasks/c3.yaml) as lm-eval renders it: OpenCompass's C3 PPL template
(configs/datasets/CLUE_C3/CLUE_C3_ppl_56b537.py: '文章：{content}\\n问题：{question}\\n答案：{choice}', the
content being the context list joined by single spaces, opencompass/datasets/c3.py), against hand-written strings."""

from __future__ import annotations

import json

from tests.eval_fixtures import FIXTURES  # noqa: F401  (sets the offline HF environment first)

# isort: split
from pd_lightning.eval.tasks import write_task_dir

DIALOGUE = {"id": 0, "context": ["男：明天几点出发？", "女：早上八点。", "男：那我七点半来接你。"],
            "question": "男的几点来接女的？", "choice": ["七点", "七点半", "八点"], "answer": "七点半"}  # fmt: skip
PASSAGE = {"id": 1, "context": ["小河边有一棵老树。", "每年春天，树上都开满了花。"], "question": "老树在哪里？",
           "choice": ["山上", "河边", "路旁", "院子里"], "answer": "河边"}  # fmt: skip
SHOT = {"id": 0, "context": ["女：你喝茶吗？", "男：不，我喝咖啡。"], "question": "男的喝什么？",
        "choice": ["茶", "咖啡"], "answer": "咖啡"}  # fmt: skip


def _c3_task(tmp_path, shots: int):
    from lm_eval.tasks import TaskManager, get_task_dict

    data = tmp_path / "data"
    (data / "c3").mkdir(parents=True)
    for name, rows in (("validation", [DIALOGUE, PASSAGE]), ("train", [SHOT])):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (data / "c3" / f"{name}.jsonl").write_text(text, encoding="utf-8")
    write_task_dir(data, tmp_path / "tasks", ["c3"], {"c3": shots})
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    return get_task_dict(["c3"], manager)["c3"]


def test_c3_prompt_is_opencompass_ppl_template(tmp_path):
    task = _c3_task(tmp_path, 0)
    docs = list(task.validation_docs())
    doc = docs[0]
    # Several turns, joined by one space after "文章：" (OpenCompass's C3Dataset), 3 options in the hub's order.
    prompt = "文章：男：明天几点出发？ 女：早上八点。 男：那我七点半来接你。\n问题：男的几点来接女的？\n答案："
    assert task.doc_to_text(doc) == prompt
    assert task.doc_to_choice(doc) == ["七点", "七点半", "八点"] and task.doc_to_target(doc) == 1
    assert task.config.target_delimiter == ""
    ctx = task.fewshot_context(doc, 0)
    assert ctx == prompt
    # What lm-eval scores: the log-likelihood of each choice's text right after "答案：".
    requests = task.construct_requests(doc, ctx, metadata=("c3", 0, 1))
    assert [r.arguments for r in requests] == [(prompt, "七点"), (prompt, "七点半"), (prompt, "八点")]
    passage = docs[1]
    assert (
        task.doc_to_text(passage) == "文章：小河边有一棵老树。 每年春天，树上都开满了花。\n问题：老树在哪里？\n答案："
    )
    assert task.doc_to_choice(passage) == ["山上", "河边", "路旁", "院子里"] and task.doc_to_target(passage) == 1


def test_c3_few_shot_examples_use_the_same_template(tmp_path):
    task = _c3_task(tmp_path, 1)
    doc = next(iter(task.validation_docs()))
    assert task.fewshot_context(doc, 1) == (
        "文章：女：你喝茶吗？ 男：不，我喝咖啡。\n问题：男的喝什么？\n答案：咖啡\n\n"
        "文章：男：明天几点出发？ 女：早上八点。 男：那我七点半来接你。\n问题：男的几点来接女的？\n答案："
    )
