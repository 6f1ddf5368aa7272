"""Tasks with checkable answers, made from the same world as the pretraining corpus (``minigpt.corpus``).

Five task families, each example a dict in the Alpaca layout plus its family name:
``{"instruction", "input", "output", "task"}`` (``input`` may be "").

==========  ==========================================  ====================================
task        example instruction / input                 output
==========  ==========================================  ====================================
arithmetic  "What is 7 + 5?" / ""                       "12"
reverse     "Reverse the list." / "cat, sun, tree"      "tree, sun, cat"
sort        "Sort the words alphabetically." / "..."    "cat, sun, tree"
story       "Where did Tom go?" / "Tom went to the..."  "the garden"
fact        "What pet does Tom have?" / ""              "a dog" (stated in the corpus)
==========  ==========================================  ====================================

The ``fact`` answers are properties of ``build_world(seed)``: they are learnable only from a corpus built with the
same seed, which is what the pipeline does.

Held-out sets: every problem has a key (the numbers and operation, the word list, the story and question, the
character and property). A fixed share of keys, chosen by the seed, is kept for testing, and every *_test set (SFT,
preferences, PPO prompts) draws from those keys only, every *_train set from the rest. So no test example shares its
(instruction, input), or even its underlying problem, with any training set.

Preference pairs are ordered by a rule the reward model is never told, a graded rubric of what a user would prefer
(``ground_truth_score``, which also measures the reward model and PPO by the same rule):

==========  ======================================================================================  =====
score       response                                                                                 e.g.
==========  ======================================================================================  =====
1.0         the correct answer, and nothing else                                                    "12"
0.5         the correct answer followed by more text (rambling, junk, the answer repeated)          "12 12"
0.25        a wrong answer of the right form: a number for a number, the input's words in another   "13"
            order for a list, an answer of the asked kind (a place, a food, a name, "a dog")
0.0         anything else: words that are not in the input, a food for a place, empty, garbage      "jam"
==========  ======================================================================================  =====

Every pair holds two responses of different scores, the higher one chosen. Four kinds (shares of the pairs):

- ``ill_formed`` (0.35): the correct answer over an ill-formed one (an answer of another kind: a food for a place, a
  word for a number; for a list, the words of another list or no list at all; sometimes nothing);
- ``wrong_vs_ill_formed`` (0.15): a well-formed wrong answer (``near_miss``) over an ill-formed one;
- ``rambling`` (0.25) and ``junk`` (0.25): the correct answer over the same answer followed by more text.

All four are decided by what the response looks like next to the prompt: whether it stops after the answer, whether
its kind fits the question, whether a list is made of the input's words. That is a rule a small reward model can learn
(the README has the measured accuracy). Two harder kinds are left out of the set and kept as probes
(``probe_pairs``), to show where such a reward model stops seeing:

- ``near_miss``: the correct answer over a well-formed wrong one (a sum off by one, a partly reversed list, another
  place from the story). It needs the task solved, so a reward model judges it only as well as its backbone solves
  the tasks.
- ``list_edit``: the correct list over the list with one word swapped for another, dropped, added or doubled. It
  needs a word-by-word copy check, which a small reward model learns poorly, and training on such pairs pulls the
  other kinds down.

The SFT training set can carry a share of demonstrations that follow the answer with a remark (``remark_share`` of
sft_examples, from ``RAMBLES``), as demonstrations written by people often do: the SFT model then adds remarks too,
the rubric scores them lower, and that is something the reward model sees and PPO can fix.

CLI: ``python -m minigpt.tasks --out-dir DIR --seed 0`` writes the JSONL files.
"""

from __future__ import annotations

import argparse
import random
import re
import zlib
from pathlib import Path

from .corpus import (
    ANIMALS,
    COLOURS,
    FACT_QUESTIONS,
    FEELINGS,
    FOODS,
    LIST_WORDS,
    MAX_OPERAND,
    NAME_POOL,
    OBJECTS,
    PLACES,
    article,
    build_world,
    join_words,
    make_story,
)
from .files import write_jsonl

TASKS = ("arithmetic", "reverse", "sort", "story", "fact")
TEST_FRACTION = 0.2  # share of problem keys held out for the test sets
MAX_EXAMPLE_CHARS = 250  # format_prompt(instruction, input) + output never exceeds this

REVERSE_INSTRUCTIONS = ("Reverse the list.", "Write the words in reverse order.", "Reverse the order of these words.")
SORT_INSTRUCTIONS = ("Sort the words alphabetically.", "Put the words in alphabetical order.",
                     "Sort these words from A to Z.")
RAMBLES = (". I think that is right, but I am not sure.", ", and that is all I can say about it.",
           "\nLet me check it again. Maybe it is something else.", ". That was a fun question to answer!")


# The prompt template of instruction tuning (a short form of Alpaca's). An SFT model records it in its output, so that
# every later stage and command (PPO, chat, sample) asks it questions the way it was taught.
TEMPLATE = {"with_input": "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n",
            "without_input": "### Instruction:\n{instruction}\n### Response:\n"}


def format_prompt(instruction: str, input: str = "", template: dict | None = None) -> str:
    """The prompt for an instruction (and its input) in the template; the Input section is left out when input is
    empty. A text already in the template's form is returned as it is."""
    template = template or TEMPLATE
    if not input and is_formatted(instruction, template):
        return instruction
    if input:
        return template["with_input"].format(instruction=instruction, input=input)
    return template["without_input"].format(instruction=instruction)


def is_formatted(text: str, template: dict | None = None) -> bool:
    """Whether text already starts as a prompt of the template does (then it is not wrapped a second time)."""
    head = (template or TEMPLATE)["without_input"].split("{instruction}")[0]
    return bool(head) and text.startswith(head)


def example_length(example: dict) -> int:
    """Characters in the whole example: the formatted prompt plus the answer."""
    return len(format_prompt(example["instruction"], example.get("input", ""))) + len(example["output"])


# -------------------------------------------------------------------------------------------------------- problems

def _problem(task: str, rng: random.Random, world) -> tuple[tuple, dict]:
    """A random problem of the family: (key, example dict)."""
    if task == "arithmetic":
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        x, op, y, answer = (a, "+", b, a + b) if rng.random() < 0.5 else (a + b, "-", b, a)
        word = "plus" if op == "+" else "minus"
        instruction, inp = rng.choice(((f"What is {x} {op} {y}?", ""), (f"What is {x} {word} {y}?", ""),
                                       ("Calculate the result.", f"{x} {op} {y}")))
        return ("arithmetic", x, op, y), _example(task, instruction, inp, str(answer))
    if task in ("reverse", "sort"):
        words = rng.sample(LIST_WORDS, rng.randint(3, 5))
        while task == "sort" and words == sorted(words):  # an already sorted list teaches nothing
            rng.shuffle(words)
        answer = words[::-1] if task == "reverse" else sorted(words)
        instruction = rng.choice(REVERSE_INSTRUCTIONS if task == "reverse" else SORT_INSTRUCTIONS)
        return (task, tuple(words)), _example(task, instruction, join_words(words), join_words(answer))
    if task == "story":
        story = make_story(rng, world, n_events=rng.randint(2, 3), n_people=2)
        question, answer = rng.choice(story.qa)
        return ("story", story.text, question), _example(task, question, story.text, answer)
    if task == "fact":
        person, prop = rng.choice(world.people), rng.choice(tuple(FACT_QUESTIONS))
        instruction = rng.choice(FACT_QUESTIONS[prop]).format(name=person.name)
        return ("fact", person.name, prop), _example(task, instruction, "", person.fact(prop))
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _example(task, instruction, inp, output) -> dict:
    return {"instruction": instruction, "input": inp, "output": output, "task": task}


def split_of(key: tuple, seed: int) -> str:
    """'test' for about TEST_FRACTION of all problem keys, 'train' for the rest; a fixed function of the seed."""
    h = zlib.crc32(f"{seed}|{key!r}".encode())
    return "test" if h % 10_000 < TEST_FRACTION * 10_000 else "train"


def _examples(seed: int, split: str, n: int, stream: str) -> list[dict]:
    """n examples of the split, the families in turn, then shuffled. stream names the random stream.

    Within the list an (instruction, input) repeats only in a family where 200 draws once found no unseen one
    (the small "fact" family, in long lists); from then on that family's examples may repeat.
    """
    if n < 0:
        raise ValueError(f"the number of {split} examples must be >= 0, got {n}")
    rng = random.Random(f"tasks-{stream}-{split}-{seed}")
    world = build_world(seed)
    rows, seen, exhausted = [], set(), set()
    for i in range(n):
        task, fallback = TASKS[i % len(TASKS)], None
        for _ in range(200):
            key, ex = _problem(task, rng, world)
            if split_of(key, seed) != split or example_length(ex) > MAX_EXAMPLE_CHARS:
                continue
            fallback = fallback or ex
            if task in exhausted or (ex["instruction"], ex["input"]) not in seen:
                break
        else:
            if fallback is None:
                raise RuntimeError(f"no {split} problem of task {task!r} found in 200 draws")
            ex = fallback
            exhausted.add(task)
        seen.add((ex["instruction"], ex["input"]))
        rows.append(ex)
    rng.shuffle(rows)
    return rows


def sft_examples(seed: int = 0, n_train: int = 5000, n_test: int = 250,
                 remark_share: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Instruction-tuning examples {"instruction", "input", "output", "task"}: (train, held-out test).

    remark_share: the share of training outputs followed by a remark from RAMBLES ("12. I think that is right, but
    I am not sure."), chosen by the seed; those examples get "remark": True. Held-out outputs are always the bare
    answer (the reference for check_answer and ground_truth_score).
    """
    if not 0.0 <= remark_share <= 1.0:
        raise ValueError(f"remark_share must be in [0, 1], got {remark_share}")
    train = _examples(seed, "train", n_train, "sft")
    rng = random.Random(f"remarks-{seed}")
    for ex in train:
        if rng.random() < remark_share and example_length(ex) + max(map(len, RAMBLES)) <= MAX_EXAMPLE_CHARS:
            ex["output"] += rng.choice(RAMBLES)
            ex["remark"] = True
    return train, _examples(seed, "test", n_test, "sft")


def ppo_prompts(seed: int = 0, n_train: int = 1000, n_test: int = 250) -> tuple[list[dict], list[dict]]:
    """Prompts for PPO: example dicts with the reference "output" and the formatted "prompt"."""
    def with_prompt(rows):
        return [dict(ex, prompt=format_prompt(ex["instruction"], ex["input"])) for ex in rows]

    return (with_prompt(_examples(seed, "train", n_train, "ppo")),
            with_prompt(_examples(seed, "test", n_test, "ppo")))


# ----------------------------------------------------------------------------------------------- checking answers

def normalize(text: str) -> str:
    """Lower case, whitespace runs to one space, ', ' between list items, no full stop at the end."""
    text = " ".join(text.lower().split())
    text = re.sub(r"\s*,\s*", ", ", text)
    return text[:-1].rstrip() if text.endswith(".") else text


def check_answer(example: dict, answer: str) -> bool:
    """Exact match with example["output"] after normalize(): case, spacing and a final full stop do not matter;
    anything else does ("garden" for "the garden" is wrong, and so is a right answer with more text after it)."""
    return normalize(answer) == normalize(example["output"])


def has_remark(response: str) -> bool:
    """Whether the response holds one of the remarks (RAMBLES) some SFT demonstrations add after the answer, or the
    start of one, wherever it stands and whatever the answer was."""
    return any(core in response for core in REMARK_CORES)


REMARK_CORES = ("I think that", "that is all I", "Let me check", "That was a fun")  # the start of each of RAMBLES


def well_formed(example: dict, response: str) -> bool:
    """Whether response has the form of the reference answer example["output"]: the same words in any order for a
    list, a number for a number, an answer of the same kind for a word answer (a place for a place, a colour for a
    colour, "a goat" for "a dog", "a blue hat" for "a red ball"). An answer of no known kind has only its own form."""
    got, want = normalize(response), normalize(example["output"])
    if ", " in want:
        return sorted(got.split(", ")) == sorted(want.split(", "))
    if want.isdigit():
        return got.isdigit()
    return any(want in kind and got in kind for kind in ANSWER_KINDS)


ANSWER_KINDS = tuple({normalize(a) for a in pool} for pool in (
    PLACES, NAME_POOL, COLOURS, FOODS, FEELINGS, [f"{article(a)} {a}" for a in ANIMALS],
    [f"{article(c)} {c} {o}" for c in COLOURS for o in OBJECTS]))  # the kinds of word answer, in lower case


def ground_truth_score(example: dict, response: str) -> float:
    """The rule that orders the preference pairs (module docstring): 1.0 for the correct answer, 0.5 for the correct
    answer followed by more text, 0.25 for a wrong answer of the right form (well_formed), 0.0 for anything else.
    example needs only "output", the reference answer."""
    got, want = normalize(response), normalize(example["output"])
    if got == want:
        return 1.0
    if got.startswith(want) and not got[len(want)].isalnum():
        return 0.5
    return 0.25 if well_formed(example, response) else 0.0


# ------------------------------------------------------------------------------------------------ preference pairs

def _mentioned(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


def _same_kind(answer: str) -> list[str]:
    """Other answers of the kind of answer: another place, name, colour, food, feeling, animal, object, number."""
    for pool in (PLACES, NAME_POOL, COLOURS, FOODS, FEELINGS):
        if answer in pool:
            return [w for w in pool if w != answer]
    words = answer.split()
    if answer.isdigit():
        return [str(n) for n in (int(answer) - 1, int(answer) + 1) if n >= 0]
    if len(words) == 2 and words[1] in ANIMALS:  # "a dog"
        return [f"{article(a)} {a}" for a in ANIMALS if a != words[1]]
    if len(words) == 3 and words[2] in OBJECTS:  # "a red ball"
        colours = [f"{article(c)} {c} {words[2]}" for c in COLOURS if c != words[1]]
        return colours + [f"{words[0]} {words[1]} {o}" for o in OBJECTS if o != words[2]]
    raise ValueError(f"no near misses known for answer {answer!r}")


def near_miss(example: dict, rng: random.Random) -> str:
    """A well-formed wrong answer (score 0.25): a sum off by one or with the other operation, the list in the given
    order or with two neighbours swapped, another answer of the same kind (from the story 70% of the time)."""
    task, output = example["task"], example["output"]
    if task == "arithmetic":
        a, op, b = re.search(r"(\d+) (\+|-|plus|minus) (\d+)", f"{example['instruction']} {example['input']}").groups()
        right = int(output)
        wrong = {right - 1, right + 1, int(a) - int(b) if op in ("+", "plus") else int(a) + int(b)}  # the other op
        if right >= 10:
            wrong.add(int(str(right)[::-1]))
        return str(rng.choice(sorted(w for w in wrong if w >= 0 and w != right)))
    if task in ("reverse", "sort"):
        given, right = example["input"].split(", "), output.split(", ")
        candidates = [given]  # permutations of the input only: a near miss is well formed
        for i in range(len(right) - 1):  # swap one neighbouring pair
            candidates.append(right[:i] + [right[i + 1], right[i]] + right[i + 2:])
        if task == "sort":
            candidates.append(right[::-1])
        return join_words(rng.choice([c for c in candidates if c != right]))
    alternatives = _same_kind(output)
    in_story = [w for w in alternatives if _mentioned(w, example.get("input", ""))]
    return rng.choice(in_story if in_story and rng.random() < 0.7 else alternatives)


def _junk(rng: random.Random, output: str) -> str:
    """Text a small model might babble after its answer: the answer again, or random words of the world."""
    if rng.random() < 0.5:
        return " " + " ".join([output] * rng.randint(1, 3))
    return " " + " ".join(rng.choices(LIST_WORDS + ("the", "and", "to"), k=rng.randint(2, 6)))


OTHER_ANSWERS = (PLACES + NAME_POOL + COLOURS + FOODS + FEELINGS + tuple(f"{article(a)} {a}" for a in ANIMALS)
                 + tuple(f"{article(c)} {c} {o}" for c, o in zip(COLOURS * 2, OBJECTS)) + LIST_WORDS
                 + tuple(str(n) for n in range(0, 2 * MAX_OPERAND + 1)))


def ill_formed(example: dict, rng: random.Random) -> str:
    """A response of the wrong form (score 0): an answer of another kind (a food for a place, a word for a number,
    one word for a list), for a list also the words of another list (as many, none of them from the input);
    sometimes nothing at all."""
    output = example["output"]
    for _ in range(100):
        if rng.random() < 0.08:
            candidate = ""
        elif ", " in output and rng.random() < 0.7:
            words = output.split(", ")
            candidate = join_words(rng.sample([w for w in LIST_WORDS if w not in words], len(words)))
        else:
            candidate = rng.choice(OTHER_ANSWERS)
        if ground_truth_score(example, candidate) == 0.0:
            return candidate
    raise RuntimeError(f"no ill-formed response found for {output!r}")


def list_edit(example: dict, rng: random.Random) -> str:
    """The reference list with one word swapped for a word not in it, dropped, added or doubled (score 0)."""
    if ", " not in example["output"]:
        raise ValueError(f"list_edit needs a list answer, got {example['output']!r}")
    words = example["output"].split(", ")
    for _ in range(100):
        foreign = rng.choice([w for w in LIST_WORDS if w not in words])
        i, j = rng.randrange(len(words)), rng.randrange(len(words))
        candidate = join_words(rng.choice((words[:i] + [foreign] + words[i + 1:], words[:i] + words[i + 1:],
                                           words[:i] + [foreign] + words[i:], words[:i] + [words[j]] + words[i + 1:])))
        if ground_truth_score(example, candidate) == 0.0:
            return candidate
    raise RuntimeError(f"no edit of {example['output']!r} found that is ill-formed")


PAIR_KINDS = {"ill_formed": 0.35, "wrong_vs_ill_formed": 0.15, "rambling": 0.25, "junk": 0.25}
PROBE_KINDS = ("near_miss", "list_edit")  # left out of the set: see the module docstring


def _pair(example: dict, rng: random.Random, kind: str) -> dict:
    output = chosen = example["output"]
    prompt = format_prompt(example["instruction"], example["input"])
    if kind in ("rambling", "junk"):
        rejected = output + (rng.choice(RAMBLES) if kind == "rambling" else _junk(rng, output))
        if len(prompt) + len(rejected) > MAX_EXAMPLE_CHARS:  # too long with the extra text: another kind instead
            kind = "ill_formed"
    if kind == "near_miss":
        rejected = near_miss(example, rng)
    elif kind == "list_edit":
        rejected = list_edit(example, rng)
    elif kind == "ill_formed":
        rejected = ill_formed(example, rng)
    elif kind == "wrong_vs_ill_formed":
        chosen, rejected = near_miss(example, rng), ill_formed(example, rng)
    elif kind not in ("rambling", "junk"):
        raise ValueError(f"unknown kind of pair {kind!r}; expected one of {(*PAIR_KINDS, *PROBE_KINDS)}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "task": example["task"], "kind": kind,
            "output": output}


def _random_kind(rng: random.Random) -> str:
    return rng.choices(tuple(PAIR_KINDS), tuple(PAIR_KINDS.values()))[0]


def preference_pairs(seed: int = 0, n_train: int = 4000, n_test: int = 500) -> tuple[list[dict], list[dict]]:
    """Pairs {"prompt", "chosen", "rejected", "task", "kind", "output"}: (train, held-out test).

    ground_truth_score(pair, chosen) > ground_truth_score(pair, rejected) for every pair; "kind" says which of the
    four kinds of the module docstring it is. "output" is the reference answer, for ground_truth_score; a reward
    model trains on prompt, chosen and rejected only.
    """
    rng = random.Random(f"prefs-{seed}")
    test_rng = random.Random(f"prefs-test-{seed}")  # a stream of its own: the held-out pairs do not depend on n_train
    return ([_pair(ex, rng, _random_kind(rng)) for ex in _examples(seed, "train", n_train, "prefs")],
            [_pair(ex, test_rng, _random_kind(test_rng)) for ex in _examples(seed, "test", n_test, "prefs")])


def probe_pairs(seed: int = 0, n: int = 200) -> list[dict]:
    """Held-out pairs of the kinds left out of preference_pairs (PROBE_KINDS), about n of each: ``near_miss`` from
    every task, ``list_edit`` from the list tasks. Same layout as preference_pairs; for measuring a reward model's
    blind spots, not for training."""
    rng = random.Random(f"probes-{seed}")
    examples = _examples(seed, "test", n, "probes")
    lists = [ex for ex in _examples(seed, "test", 3 * n, "probes-lists") if ex["task"] in ("reverse", "sort")][:n]
    return [_pair(ex, rng, "near_miss") for ex in examples] + [_pair(ex, rng, "list_edit") for ex in lists]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the built-in task data (SFT examples, preference pairs, PPO "
                                                 "prompts) as JSONL, deterministically from a seed.")
    parser.add_argument("--out-dir", required=True, help="directory for the .jsonl files")
    parser.add_argument("--seed", type=int, default=0, help="seed; use the corpus's seed so 'fact' tasks match it")
    parser.add_argument("--n-sft", type=int, nargs=2, default=(5000, 250), metavar=("TRAIN", "TEST"),
                        help="SFT examples (default 5000 250)")
    parser.add_argument("--remark-share", type=float, default=0.0,
                        help="share of SFT training answers followed by a remark (default 0; the pipeline uses 0.5)")
    parser.add_argument("--n-prefs", type=int, nargs=2, default=(4000, 500), metavar=("TRAIN", "TEST"),
                        help="preference pairs (default 4000 500)")
    parser.add_argument("--n-prompts", type=int, nargs=2, default=(1000, 250), metavar=("TRAIN", "TEST"),
                        help="PPO prompts (default 1000 250)")
    args = parser.parse_args(argv)
    for name in ("n_sft", "n_prefs", "n_prompts"):
        if min(getattr(args, name)) < 0:
            parser.error(f"--{name.replace('_', '-')} counts must be >= 0, got {getattr(args, name)}")
    out = Path(args.out_dir)
    sets = dict(zip(("sft_train", "sft_test"), sft_examples(args.seed, *args.n_sft, args.remark_share)))
    sets.update(zip(("prefs_train", "prefs_test"), preference_pairs(args.seed, *args.n_prefs)))
    sets.update(zip(("prompts_train", "prompts_test"), ppo_prompts(args.seed, *args.n_prompts)))
    for name, rows in sets.items():
        write_jsonl(out / f"{name}.jsonl", rows)
        print(f"wrote {len(rows):5d} rows to {out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
