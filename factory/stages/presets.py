"""Ingest presets: the published layouts of the public sources users start from.

`ingest.preset: NAME` fills in the ingest settings below; anything the recipe sets itself
wins. Each entry says which columns the source has (as published on the hub) and how its
reference answer is read:

    gsm8k           question, answer = rationale ending "#### 18"           -> 18 (numeric)
    math            problem, solution with \\boxed{}, level "Level 3", type -> the boxed answer
    math500         problem, solution, answer, subject, level (int), unique_id
    numina_cot      problem, solution with \\boxed{}, source, messages       -> the boxed answer
    numina_1.5      problem, solution, answer ("proof" / "notfound" when there is none), source
    openr1_math     problem, solution, answer, uuid, source, generations, ...
    aime            id, problem, solution, answer (an integer 0-999)         -> numeric
    olympiadbench   id, question, final_answer (a list: several answers joined by ", "), solution
    gpqa            Question, Correct Answer, Incorrect Answer 1..3         -> choices A-D,
                    shuffled by a seeded hash of the question (the first is always the right one)
    mmlu            question, subject, choices (a list), answer (0-based index) -> a letter

Choice presets write the options into the question ("(A) ...") so the model sees them.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "gsm8k": {"columns": {"question": "question", "answer": "answer"}, "answer_from": "gsm8k",
              "default_domain": "numeric"},
    "math": {"columns": {"question": "problem", "answer": "solution", "level": "level"}, "answer_from": "boxed",
             "default_domain": "math"},
    "math500": {"columns": {"question": "problem", "answer": "answer", "level": "level", "problem_id": "unique_id"},
                "default_domain": "math"},
    "numina_cot": {"columns": {"question": "problem", "answer": "solution", "source": "source"},
                   "answer_from": "boxed", "default_domain": "math"},
    "numina_1.5": {"columns": {"question": "problem", "answer": "answer", "source": "source"},
                   "default_domain": "math"},
    "openr1_math": {"columns": {"question": "problem", "answer": "answer", "problem_id": "uuid", "source": "source"},
                    "default_domain": "math"},
    "aime": {"columns": {"question": "problem", "answer": "answer", "problem_id": "id"},
             "default_domain": "numeric"},
    "olympiadbench": {"columns": {"question": "question", "answer": "final_answer", "problem_id": "id"},
                      "default_domain": "math"},
    "gpqa": {"columns": {"question": "Question", "answer": "Correct Answer"},
             "choice_columns": ["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"],
             "shuffle_choices": True, "answer_from": "choice_text", "choices_in_question": True,
             "default_domain": "choice"},
    "mmlu": {"columns": {"question": "question", "answer": "answer", "choices": "choices"}, "answer_from": "index",
             "choices_in_question": True, "default_domain": "choice"},
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"ingest.preset={name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]
