"""Downstream tasks for eval.py: where a task's rows come from and how a row becomes an Item.

An Item is what the harness (slmlab/harness.py) scores: one or more (context, continuation) pairs.
With a label it is multiple choice (the pair with the highest log-likelihood is the answer); without
one it is a completion (one pair: is the continuation the model's greedy output, and its
log-likelihood). The built-in tasks format their datasets' rows as lm-evaluation-harness's versions
of them do, so numbers are comparable with published ones up to tokenization; with_fewshot puts k
solved examples before each item.

A task is named on the command line (`--tasks`) as
  NAME              a built-in task, its rows from the Hugging Face hub (datasets.load_dataset)
  NAME=SOURCE       a built-in task's formatting applied to rows from SOURCE: a .jsonl file with the
                    dataset's own fields (an offline copy), or another hf:NAME[:CONFIG][@SPLIT]
  PATH.jsonl        your own task, one item per line in the generic format:
                    {"context": str, "choices": [str, ...], "label": int}        multiple choice
                    {"contexts": [str, ...], "continuation": str, "label": int}  choice of contexts
                    {"context": str, "continuation": str}                          completion
                    {"text": str}                                                  a document (bpb)
                    other keys (an id) are ignored; the keys of two formats are an error
  PATH.txt          one document: the whole file, scored for bits per byte
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import DataError


@dataclass(frozen=True)
class Item:
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: Optional[int]  # None: a completion (one pair)
    text: bool = False  # a document scored whole (its one continuation), in windows of the context length
    # A document's (bytes, words) its bpb and word_ppl are per, when not its own text's (wikitext's raw page).
    units: Optional[tuple[int, int]] = None

    def __post_init__(self):
        # Here, not per format: a built-in row's label (an offline copy's) is as unchecked as a generic one's.
        if self.label is None:
            return
        n = len(self.contexts)
        if n < 2:
            raise DataError(f"a multiple-choice item needs at least 2 choices, got {n}")
        if type(self.label) is not int or not 0 <= self.label < n:
            raise DataError(f"label {self.label!r} is not a choice index (0..{n - 1})")

    @property
    def is_choice(self) -> bool:
        return self.label is not None

    @property
    def kind(self) -> str:
        return "text" if self.text else "multiple choice" if self.is_choice else "completion"


def document(text: str, units: Optional[tuple[int, int]] = None) -> Item:
    if not isinstance(text, str) or not text.strip():
        raise DataError("a text item needs a non-empty string 'text'")
    return Item(("",), (text,), None, text=True, units=units)


def choice(context: str, choices, label: int) -> Item:
    return Item((context,) * len(choices), tuple(choices), label)


# ---- built-in tasks: lm-evaluation-harness's zero-shot formats ----
def _hellaswag_clean(text: str) -> str:
    # WikiHow rows carry " [title]" and "[step]"-style markers that are not prose.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row) -> Item:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return choice(_hellaswag_clean(row["activity_label"] + ": " + ctx),
                  [" " + _hellaswag_clean(e) for e in _strings(row["endings"], "endings")], int(row["label"]))


def _lettered(row, key: str = "answerKey") -> int:
    labels = list(_strings(row["choices"]["label"], "choices.label"))
    if row[key] not in labels:
        raise DataError(f"answer key {row[key]!r} is none of the choice labels {labels}")
    return labels.index(row[key])


def _choice_texts(row) -> list[str]:
    return [" " + t for t in _strings(row["choices"]["text"], "choices.text")]


def _arc(row) -> Item:
    return choice(f"Question: {row['question']}\nAnswer:", _choice_texts(row), _lettered(row))


def _openbookqa(row) -> Item:
    return choice(row["question_stem"], _choice_texts(row), _lettered(row))


def _piqa(row) -> Item:
    return choice(f"Question: {row['goal']}\nAnswer:", [" " + row["sol1"], " " + row["sol2"]], int(row["label"]))


def _sciq(row) -> Item:
    answers = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return choice(f"{row['support'].strip()}\nQuestion: {row['question']}\nAnswer:".lstrip(),
                  [" " + a for a in answers], 3)


def _winogrande(row) -> Item:
    # Partial scoring: the blank is filled with each option and the same rest of the sentence is scored.
    sentence = row["sentence"]
    if "_" not in sentence:
        raise DataError(f"winogrande sentence without a '_' blank: {sentence!r}")
    i = sentence.index("_")
    rest = " " + sentence[i + 1:].strip()
    return Item((sentence[:i] + row["option1"], sentence[:i] + row["option2"]), (rest, rest), int(row["answer"]) - 1)


def _mmlu(row) -> Item:
    # lm-evaluation-harness's layout without its per-subject header line (which few-shot prompts would repeat)
    choices = _strings(row["choices"], "choices")
    if len(choices) != 4:
        raise DataError(f"an MMLU question has 4 choices, this one {len(choices)}")
    lines = [row["question"].strip(), *(f"{letter}. {c}" for letter, c in zip("ABCD", choices)), "Answer:"]
    return choice("\n".join(lines), [" A", " B", " C", " D"], int(row["answer"]))


def _lambada(row) -> Item:
    context, _, last = row["text"].strip().rpartition(" ")
    if not context:
        raise DataError(f"lambada text without a last word to predict: {row['text']!r}")
    return Item((context,), (" " + last,), None)


def wikitext_detokenize(page: str) -> str:
    """WikiText's tokenized spacing (`1 @,@ 000`, `word , word`, `( a )`, `= = Title = =`) undone, the way
    lm-evaluation-harness does before scoring, so its wikitext numbers and ours measure the same text.
    (It also rewrites the literal text "/' N/", which WikiText does not contain.)"""
    s = page.replace("s '", "s'")
    for mark in "-,.":
        s = s.replace(f" @{mark}@ ", mark)
    for p in ":;.!?,":
        s = s.replace(f" {p} ", f"{p} ")
    for left, right in ("()", "[]", "{}", '""', "''"):
        s = re.sub(rf"{re.escape(left)}\s*([^{re.escape(right)}]*?)\s*{re.escape(right)}", rf"{left}\1{right}", s)
    for old, new in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"),
                     ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(old, new)
    return s


def _wikitext(row) -> Item:
    page = row["page"]
    if not isinstance(page, str):
        raise DataError(f"a wikitext row's 'page' must be a string, got {type(page).__name__}")
    # lm-evaluation-harness's units: the raw page's bytes, and its words as re.split counts them (an
    # empty string at each end that starts or ends with whitespace, as a page does).
    return document(wikitext_detokenize(page), units=(len(page.encode("utf-8")), len(re.split(r"\s+", page))))


@dataclass(frozen=True)
class Task:
    name: str
    source: str  # hf:NAME[:CONFIG][@SPLIT] or a .jsonl path
    to_item: Callable[[dict], Item]
    about: str = ""


BUILTIN = {t.name: t for t in [
    Task("hellaswag", "hf:Rowan/hellaswag@validation", _hellaswag, "sentence completion, 4 endings"),
    Task("arc_easy", "hf:allenai/ai2_arc:ARC-Easy@test", _arc, "grade-school science questions, easy set"),
    Task("arc_challenge", "hf:allenai/ai2_arc:ARC-Challenge@test", _arc, "grade-school science, challenge set"),
    Task("piqa", "hf:baber/piqa@validation", _piqa, "physical commonsense, 2 solutions"),
    Task("winogrande", "hf:allenai/winogrande:winogrande_xl@validation", _winogrande,
         "pronoun resolution, partial scoring"),
    Task("openbookqa", "hf:allenai/openbookqa:main@test", _openbookqa, "open-book science questions"),
    Task("sciq", "hf:allenai/sciq@test", _sciq, "science questions with a support passage"),
    Task("mmlu", "hf:cais/mmlu:all@test", _mmlu, "57 subjects, 4 lettered choices (usually 5-shot: --fewshot 5)"),
    Task("lambada", "hf:EleutherAI/lambada_openai:default@test", _lambada,
         "last word of a passage: greedy accuracy and perplexity"),
    Task("wikitext", "hf:EleutherAI/wikitext_document_level:wikitext-2-raw-v1@test", _wikitext,
         "Wikipedia articles: bits per byte and word perplexity"),
]}


def with_fewshot(items: list[Item], k: int, seed: int = 1234) -> list[Item]:
    """Each item's contexts prefixed by `k` other items of the task written out with their answers (the
    gold context + continuation), blank lines between; drawn for item i by a Random seeded with
    (seed, i), so an item's shots do not depend on --limit. The task's own items serve as shots (no
    separate train split is read), never the item itself."""
    if k == 0:
        return items
    if items[0].text:
        raise DataError("--fewshot applies to multiple-choice and completion tasks; this one is text (bits per byte)")
    if k >= len(items):
        raise DataError(f"--fewshot {k} needs more than {k} items in the task, it has {len(items)}")
    import random

    def solved(it: Item) -> str:
        gold = it.label or 0
        return it.contexts[gold] + it.continuations[gold]

    out = []
    for i, it in enumerate(items):
        # k of the other n - 1 items: a draw from range(n - 1) with i skipped (O(k), not O(n), per item)
        others = [j + (j >= i) for j in random.Random(f"{seed}:{i}").sample(range(len(items) - 1), k)]
        prefix = "".join(solved(items[j]) + "\n\n" for j in others)
        out.append(Item(tuple(prefix + c for c in it.contexts), it.continuations, it.label))
    return out


# The generic format's fields; a row's other keys (an id, a source) are ignored, as in the built-in rows.
FIELDS = {"context", "contexts", "choices", "continuation", "label", "text"}


def generic_item(row: dict) -> Item:
    """An item of the generic jsonl format (module docstring); DataError naming what is wrong."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    fields = FIELDS & set(row)
    # Exact field sets, not subsets: a row with the fields of two formats would lose one's silently.
    if fields == {"text"}:
        return document(row["text"])
    if fields == {"context", "choices", "label"}:
        item = choice(_string(row["context"], "context"), _strings(row["choices"], "choices"), row["label"])
    elif fields == {"contexts", "continuation", "label"}:
        contexts = _strings(row["contexts"], "contexts")
        item = Item(contexts, (_string(row["continuation"], "continuation"),) * len(contexts), row["label"])
    elif fields == {"context", "continuation"}:
        item = Item((_string(row["context"], "context"),), (_string(row["continuation"], "continuation"),), None)
    else:
        raise DataError(f"keys {sorted(row)} fit no item format: give context+choices+label, "
                        "contexts+continuation+label, context+continuation, or text")
    if not all(item.continuations):
        raise DataError("an empty continuation has nothing to score")
    return item


def _string(value, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{name!r} must be a string, got {_shown(value)}")
    return value


def _strings(value, name: str) -> tuple[str, ...]:
    # tuple() or iteration over a string would make each character a choice
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise DataError(f"{name!r} must be a list of strings, got {_shown(value)}")
    return tuple(value)


def _shown(value) -> str:
    text = json.dumps(value)  # escaped: one line whatever the value holds
    return text if len(text) <= 60 else text[:57] + "..."


def resolve(spec: str) -> Task:
    """A --tasks entry (module docstring) as a Task; DataError for an unknown name or a missing file."""
    name, eq, source = spec.partition("=")
    if eq:
        if name not in BUILTIN:
            raise DataError(f"unknown task {name!r} in {spec!r}: NAME=SOURCE gives a built-in task "
                            f"({', '.join(BUILTIN)}) other rows")
        _check_source(source, spec)
        return Task(name, source, BUILTIN[name].to_item, BUILTIN[name].about)
    if name in BUILTIN:
        return BUILTIN[name]
    if name.endswith((".jsonl", ".txt")) or "/" in name or Path(name).exists():
        _check_source(name, spec)
        return Task(Path(name).stem, name, generic_item, "your task")
    raise DataError(f"unknown task {name!r}: built-in tasks are {', '.join(BUILTIN)}; or give a .jsonl or .txt "
                    "file")


def resolve_all(specs: str, flag: str) -> list[tuple[str, Task]]:
    """A comma-separated task list (eval.py --tasks, train.eval_tasks, ablate.py --tasks) as (spec, Task)
    pairs, every spec resolved before any item is read; one-line DataErrors naming `flag` for an empty
    list, a bad spec or a task named twice."""
    specs_list = [s.strip() for s in specs.split(",") if s.strip()]
    if not specs_list:
        raise DataError(f"{flag} names no task: give NAME, NAME=SOURCE, FILE.jsonl or FILE.txt, comma-separated")
    resolved = []
    for spec in specs_list:
        try:
            resolved.append((spec, resolve(spec)))
        except DataError as e:
            raise DataError(f"{flag}: {e}") from None
    names = [t.name for _, t in resolved]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise DataError(f"{flag} names task {twice!r} twice")
    return resolved


def _check_source(source: str, spec: str):
    if source.startswith("hf:"):
        from .data import parse_hf_spec

        parse_hf_spec(source)
    elif not Path(source).is_file():
        raise DataError(f"{spec}: no such file {source!r}")


def read_items(task: Task, limit: Optional[int] = None, fewshot: int = 0) -> tuple[list[Item], int]:
    """(the task's first `limit` items (all when None), how many it has), each with `fewshot` solved
    examples drawn from all of the task's items (with_fewshot); DataError naming the row."""
    rows = _rows(task.source)
    items = []
    for where, row in rows if fewshot or not limit else rows[:limit]:
        try:
            items.append(task.to_item(row))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise DataError(f"{where}: not a {task.name} row ({type(e).__name__}: {e})") from None
    if not items:
        raise DataError(f"{task.source}: no items")
    odd = next((i for i, it in enumerate(items) if it.kind != items[0].kind), None)
    if odd is not None:
        raise DataError(f"{rows[odd][0]}: a {items[odd].kind} item in a task whose first item is {items[0].kind}: "
                        "one kind per task")
    return with_fewshot(items, fewshot)[:limit], len(rows)


def _rows(source: str) -> list[tuple[str, object]]:
    """(where, row) pairs: 'FILE:LINE' or 'hf:... row N' names a row in errors."""
    if source.startswith("hf:"):
        from .data import load_hf

        return [(f"{source} row {i}", row) for i, row in enumerate(load_hf(source))]
    if source.endswith(".txt"):  # one document: the whole file
        # strict, as training reads its data: a byte that is not UTF-8 is named, not scored as U+FFFD
        return [(source, {"text": "".join(_utf8_lines(source))})]
    from .data import jsonl_records

    return list(jsonl_records(source))


def _utf8_lines(source: str) -> list[str]:
    """The file's lines (universal newlines, as open() reads them); DataError naming the line of a byte
    that is not UTF-8. Decoded whole: a streaming decoder fails a chunk ahead of the line being read."""
    raw = Path(source).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = io.StringIO(raw[:e.start].decode("utf-8"), newline=None).read().count("\n") + 1
        raise DataError(f"{source}:{line}: not UTF-8 (byte {raw[e.start]:#04x}: {e.reason}); save the file "
                        "as UTF-8") from None
    return io.StringIO(text, newline=None).readlines()
