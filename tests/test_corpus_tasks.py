"""The built-in corpus and tasks: every stated fact and every answer is recomputed here independently, by parsing
the text with regular expressions and doing the arithmetic, reversing and sorting in plain Python."""

import collections
import json
import re

import pytest

from minigpt import corpus, tasks
from minigpt.corpus import build_corpus
from minigpt.files import read_jsonl, write_jsonl
from minigpt.tasks import (
    check_answer,
    format_prompt,
    ground_truth_score,
    ppo_prompts,
    preference_pairs,
    sft_examples,
)

N_TRAIN, N_TEST = 1000, 200


@pytest.fixture(scope="module")
def text():
    return build_corpus(0)  # the full default size: about 0.3 s


@pytest.fixture(scope="module")
def facts(text):
    """(name, property) -> answer, parsed from the corpus's statements; each must be stated one way only."""
    patterns = {
        "pet": (r"\b([A-Z]\w+) has (an? \w+)\.", r"\b([A-Z]\w+)'s pet is (an? \w+)\.",
                r"\b([A-Z]\w+) has a pet (\w+)\."),
        "colour": (r"\b([A-Z]\w+)'s favourite colour is (\w+)\.", r"\b([A-Z]\w+) likes (\w+) best of all colours\.",
                   r"The colour ([A-Z]\w+) likes best is (\w+)\.", r"\b(\w+) is ([A-Z]\w+)'s favourite colour\."),
        "food": (r"\b([A-Z]\w+)'s favourite food is (\w+)\.", r"\b([A-Z]\w+) likes (\w+) more than any other food\.",
                 r"The food ([A-Z]\w+) likes best is (\w+)\."),
    }
    seen = collections.defaultdict(set)
    for prop, pats in patterns.items():
        for pat in pats:
            for m in re.finditer(pat, text):
                name, value = m.groups()
                if pat.startswith(r"\b(\w+) is"):  # "Blue is Tom's favourite colour."
                    name, value = value, name.lower()
                if pat.endswith(r"a pet (\w+)\."):
                    value = ("an " if value[0] in "aeiou" else "a ") + value
                seen[name, prop].add(value)
    assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
    return {k: v.pop() for k, v in seen.items()}


STORY_RULES = [  # question pattern, the story sentence that answers it
    (r"Where did (\w+) go\?", r"\b{0} (?:went|walked|ran) to (the \w+)\."),
    (r"What did (\w+) find\?", r"\b{0} found (an? \w+ \w+)\."),
    (r"What colour was the (\w+)\?", r"\bfound an? (\w+) {0}\."),
    (r"Who found the (\w+)\?", r"\b(\w+) found an? \w+ {0}\."),
    (r"What did (\w+) eat\?", r"\b{0} (?:ate|had) some (\w+)\."),
    (r"What did (\w+) see\?", r"\b{0} saw (an? \w+)\."),
    (r"Who did (\w+) give the (\w+) to\?", r"\b{0} gave the {1} to (\w+)\."),
    (r"How did (\w+) feel\?", r"\b{0} (?:was|felt) (\w+)\."),
    (r"How many (\w+) does (\w+) have now\?", r"Now {1} has (\d+) {0}\."),
]
FACT_RULES = [(r"(?:What pet|What animal) does (\w+) have\?|Which pet belongs to (\w+)\?", "pet"),
              (r"What is (\w+)'s favourite colour\?|(?:What|Which) colour does (\w+) like (?:most|best)\?", "colour"),
              (r"What is (\w+)'s favourite food\?|(?:What|Which) food does (\w+) like (?:most|best)\?", "food")]


def solve_story(story, question):
    for qpat, spat in STORY_RULES:
        m = re.fullmatch(qpat, question)
        if m:
            found = set(re.findall(spat.format(*m.groups()), story))
            assert len(found) == 1, (story, question, found)
            return found.pop()
    raise AssertionError(f"unknown story question {question!r}")


def solve(task, instruction, inp, facts):
    """The answer, recomputed from the question alone (and the corpus's facts)."""
    if task == "arithmetic":
        a, op, b = re.search(r"(\d+) (\+|-|plus|minus) (\d+)", f"{instruction} {inp}").groups()
        return str(int(a) + int(b) if op in ("+", "plus") else int(a) - int(b))
    words = inp.split(", ")
    if task == "reverse":
        assert "revers" in instruction.lower()
        return ", ".join(reversed(words))
    if task == "sort":
        assert "alphabetical" in instruction or "A to Z" in instruction
        return ", ".join(sorted(words))
    if task == "story":
        return solve_story(inp, instruction)
    for pat, prop in FACT_RULES:
        m = re.fullmatch(pat, instruction)
        if m:
            return facts[next(g for g in m.groups() if g), prop]
    raise AssertionError(f"unknown question {instruction!r} of task {task!r}")


def parse_prompt(prompt):
    m = re.fullmatch(r"### Instruction:\n(.*)\n(?:### Input:\n(.*)\n)?### Response:\n", prompt)
    return m.group(1), m.group(2) or ""


# ------------------------------------------------------------------------------------------------------------ corpus

def test_corpus_is_deterministic_different_across_seeds_and_about_the_size_asked():
    a, b, c = build_corpus(1, 100_000), build_corpus(1, 100_000), build_corpus(2, 100_000)
    assert a == b and a != c
    for s in (a, c):
        assert 99_000 <= len(s) <= 100_000
    assert len(build_corpus(3, 10)) > 0  # at least one document
    with pytest.raises(ValueError, match="n_chars"):
        build_corpus(0, 0)


def test_corpus_documents_are_paragraphs_of_plain_text(text):
    assert 1_490_000 <= len(text) <= 1_500_000
    docs = text.split("\n\n")
    assert len(docs) > 3000 and all(d.strip() == d and d for d in docs)
    assert set(text) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:?!'+-=\n")


ARITHMETIC = [  # pattern, check
    (r"\b(\d+) \+ (\d+) = (\d+)\b", lambda a, b, c: a + b == c),
    (r"\b(\d+) - (\d+) = (\d+)\b", lambda a, b, c: a - b == c),
    (r"\b(\d+) plus (\d+) is (\d+)\b", lambda a, b, c: a + b == c),
    (r"\b(\d+) minus (\d+) is (\d+)\b", lambda a, b, c: a - b == c),
    (r"Add (\d+) and (\d+) to get (\d+)\b", lambda a, b, c: a + b == c),
    (r"Take (\d+) from (\d+) and you have (\d+)\b", lambda b, a, c: a - b == c),
    (r"\bhad (\d+) (\w+)\. \w+ gave \w+ (\d+) more\. Now \w+ has (\d+) \2\.", lambda a, _, b, c: a + b == c),
    (r"\bhad (\d+) (\w+)\. \w+ gave (\d+) to \w+\. Now \w+ has (\d+) \2\.", lambda a, _, b, c: a - b == c),
]
QUESTION = r"What is (\d+) (\+|-|plus|minus) (\d+)\?\s*(?:A: |Answer: |The answer is )?(\d+)\b"


def test_every_arithmetic_fact_in_the_corpus_is_true(text):
    n_with_operator = 0
    for i, (pat, check) in enumerate(ARITHMETIC):
        matches = re.findall(pat, text)
        for groups in matches:
            assert check(*[int(g) if g.isdigit() else g for g in groups]), (pat, groups)
        assert len(matches) > 100, pat
        n_with_operator += len(matches) if i < 4 else 0
    questions = re.findall(QUESTION, text)
    for a, op, b, c in questions:
        assert (int(a) + int(b) if op in ("+", "plus") else int(a) - int(b)) == int(c), (a, op, b, c)
    # every "3 + 4", "7 minus 2" in the text belongs to a fact checked above
    assert n_with_operator + len(questions) == len(re.findall(r"\d (?:[+-]|plus|minus) \d", text))


REVERSE, SORT, SORT_NUMBERS = (lambda w: w[::-1]), sorted, (lambda w: sorted(w, key=int))
ANSWER = r"\.\s*(?:A: |Answer: |The answer is )?([A-Za-z, ]+)"  # the drills' answer styles
LISTS = [  # the phrase that starts a statement, the statement (given list, stated result), the operation
    ("in reverse order are", r"The words ([a-z, ]+?) in reverse order are ([a-z, ]+)\.", REVERSE),
    ("Reverse the list ", r"Reverse the list ([a-z, ]+?) and you get ([a-z, ]+)\.", REVERSE),
    ("Reversed, ", r"Reversed, ([a-z, ]+?) becomes ([a-z, ]+)\.", REVERSE),
    ("Backwards, ", r"Backwards, the list ([a-z, ]+?) is ([a-z, ]+)\.", REVERSE),
    ("Reverse the list:", r"Reverse the list: ([a-z, ]+)" + ANSWER, REVERSE),
    ("in alphabetical order are", r"The words ([a-z, ]+?) in alphabetical order are ([a-z, ]+)\.", SORT),
    ("Sorted alphabetically, ", r"Sorted alphabetically, ([a-z, ]+?) becomes ([a-z, ]+)\.", SORT),
    ("in order from A to Z", r"Put ([a-z, ]+?) in order from A to Z: ([a-z, ]+)\.", SORT),
    ("In alphabetical order, ", r"In alphabetical order, the list ([a-z, ]+?) is ([a-z, ]+)\.", SORT),
    ("Sort the words alphabetically:", r"Sort the words alphabetically: ([a-z, ]+)" + ANSWER, SORT),
    ("from smallest to largest", r"The numbers ([\d, ]+?) from smallest to largest are ([\d, ]+)\.", SORT_NUMBERS),
    ("Sorted, the numbers", r"Sorted, the numbers ([\d, ]+?) become ([\d, ]+)\.", SORT_NUMBERS),
    ("The first word in", r"The first word in ([a-z, ]+?) is ([a-z]+)\.", lambda w: w[:1]),
    ("The last word in", r"The last word in ([a-z, ]+?) is ([a-z]+)\.", lambda w: w[-1:]),
    ("words.", r"The list ([a-z, ]+?) has (\d+) words\.", lambda w: [str(len(w))]),
]


def test_every_reverse_and_sort_statement_in_the_corpus_is_true(text):
    for phrase, pat, op in LISTS:
        matches = re.findall(pat, text)
        for given, stated in matches:
            assert op(given.split(", ")) == stated.strip().lower().split(", "), (given, stated)
        assert len(matches) == text.count(phrase) > 20, phrase  # every statement of the kind was checked


def test_corpus_questions_about_stories_and_facts_are_answered_correctly(text, facts):
    n = 0
    for doc in text.split("\n\n"):
        for m in re.finditer(r"^Q: (.*?)(\b[A-Z][^.?]*\?) A: (.*)\.$", doc, flags=re.MULTILINE):
            # a drill gives its story on the question's line; a story document's story is its first line
            context, question, answer = m.group(1) or doc.split("\n")[0], m.group(2), m.group(3)
            if any(re.fullmatch(q, question) for q, _ in STORY_RULES):
                assert solve_story(context, question) == answer
                n += 1
            elif any(re.fullmatch(q, question) for q, _ in FACT_RULES):
                assert solve("fact", question, "", facts) == answer
                n += 1
    assert n > 300
    assert len(facts) == 24 * 3  # every character's pet, colour and food is stated


# ------------------------------------------------------------------------------------------------------------- tasks

@pytest.fixture(scope="module")
def sft():
    return sft_examples(0, N_TRAIN, N_TEST)


def test_sft_answers_are_right_and_short(sft, facts):
    for split in sft:
        assert collections.Counter(ex["task"] for ex in split) == {t: len(split) // 5 for t in tasks.TASKS}
        for ex in split:
            assert set(ex) == {"instruction", "input", "output", "task"}
            assert ex["output"] == solve(ex["task"], ex["instruction"], ex["input"], facts), ex
            assert 1 <= len(ex["output"].split()) <= 6
            assert len(format_prompt(ex["instruction"], ex["input"]) + ex["output"]) <= 250
    lengths = [len(format_prompt(ex["instruction"], ex["input"]) + ex["output"]) for ex in sft[0]]
    assert sum(lengths) / len(lengths) < 120 and sum(n > 150 for n in lengths) < 0.01 * len(lengths)


def test_sft_train_and_test_are_disjoint_and_deterministic(sft):
    train, test = sft
    train_keys = {(ex["instruction"], ex["input"]) for ex in train}
    assert not train_keys & {(ex["instruction"], ex["input"]) for ex in test}
    # the arithmetic problems themselves (not only their wording) are held out
    problem = lambda ex: re.search(r"(\d+) (\+|-|plus|minus) (\d+)", ex["instruction"] + " " + ex["input"]).groups()
    numbers = lambda rows: {tuple(p.replace("plus", "+").replace("minus", "-") for p in problem(ex))
                            for ex in rows if ex["task"] == "arithmetic"}
    assert not numbers(train) & numbers(test)
    assert sft_examples(0, N_TRAIN, N_TEST) == sft and sft_examples(1, N_TRAIN, N_TEST) != sft
    # the other stages' held-out sets are disjoint from every training set too
    pref_test = {parse_prompt(p["prompt"]) for p in preference_pairs(0, 0, 100)[1]}
    ppo_test = {(ex["instruction"], ex["input"]) for ex in ppo_prompts(0, 0, 100)[1]}
    assert not (pref_test | ppo_test) & train_keys


def test_check_answer_and_ground_truth_score():
    ex = {"output": "the garden"}
    assert check_answer(ex, "the garden") and check_answer(ex, "  The Garden. \n") and check_answer(ex, "the  garden")
    assert not check_answer(ex, "garden") and not check_answer(ex, "the park") and not check_answer(ex, "")
    assert check_answer({"output": "tree, sun, cat"}, "tree,sun ,  cat")
    assert not check_answer({"output": "tree, sun, cat"}, "tree, cat, sun")
    seven = {"output": "7"}
    assert [ground_truth_score(seven, r) for r in ("7", " 7.\n", "7 7 7", "7\nmore", "70", "8", "", "17", "seven",
                                                   "7a")] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.0, 0.25, 0.0, 0.0]
    assert ground_truth_score(ex, "the garden. I think so.") == 0.5
    assert ground_truth_score(ex, "the gardens") == 0.0 and ground_truth_score(ex, "jam") == 0.0
    assert ground_truth_score(ex, "The park.") == 0.25  # another place: the right form
    listed = {"output": "tree, sun, cat"}  # a list: the same words in another order has the right form
    responses = ("tree, sun, cat", "cat, sun, tree", "tree, sun, sun", "tree, sun", "tree, sun, cat, dog",
                 "tree, sun, cat, and more")
    assert [ground_truth_score(listed, r) for r in responses] == [1.0, 0.25, 0.0, 0.0, 0.5, 0.5]
    assert [ground_truth_score({"output": "a dog"}, r) for r in ("a dog", "a goat", "a red ball", "dog")] == \
           [1.0, 0.25, 0.0, 0.0]
    assert [ground_truth_score({"output": "a red ball"}, r) for r in ("a blue ball", "a red kite", "a dog")] == \
           [0.25, 0.25, 0.0]
    assert ground_truth_score({"output": "an unknown answer"}, "another answer") == 0.0


def hand_score(task, right, response):
    """The rubric of minigpt.tasks, recomputed by hand from the task family and the right answer."""
    r = " ".join(response.lower().split()).rstrip(".").rstrip()
    if r == right.lower():
        return 1.0
    if r.startswith(right.lower()) and not r[len(right)].isalnum():
        return 0.5
    if task in ("reverse", "sort"):
        return 0.25 if sorted(r.split(", ")) == sorted(right.split(", ")) else 0.0
    if right.isdigit():
        return 0.25 if r.isdigit() else 0.0
    pools = [tasks.PLACES, tasks.NAME_POOL, tasks.COLOURS, tasks.FOODS, tasks.FEELINGS,
             [f"{corpus.article(a)} {a}" for a in corpus.ANIMALS],
             [f"{corpus.article(c)} {c} {o}" for c in corpus.COLOURS for o in corpus.OBJECTS]]
    pool = next(p for p in pools if right in p)
    return 0.25 if r in {w.lower() for w in pool} else 0.0


def test_preference_pairs_follow_the_rubric(facts):
    train, test = preference_pairs(0, N_TRAIN, N_TEST)
    assert len(train) == N_TRAIN and len(test) == N_TEST
    kinds = collections.Counter(p["kind"] for p in train)
    shares = {"ill_formed": 0.35, "wrong_vs_ill_formed": 0.15, "rambling": 0.25, "junk": 0.25}  # module docstring
    assert set(kinds) == set(shares)
    for kind, share in shares.items():
        assert abs(kinds[kind] / N_TRAIN - share) < 0.05, (kind, kinds)
    # the held-out pairs are the same whatever the number of training pairs
    assert preference_pairs(0, 10, N_TEST)[1] == test
    for p in train + test:
        check_pair(p, facts)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    # a list's ill-formed answer is no list of the input's words: another list as long, one word or nothing
    for p in train:
        if p["task"] in ("reverse", "sort") and p["kind"] == "ill_formed" and ", " in p["rejected"]:
            got, right = p["rejected"].split(", "), p["output"].split(", ")
            assert len(got) == len(right) and not set(got) & set(right), p


def check_pair(p, facts):
    """The pair's two responses get the scores of its kind, by the hand-written rubric."""
    expected = {"ill_formed": (1.0, 0.0), "wrong_vs_ill_formed": (0.25, 0.0), "rambling": (1.0, 0.5),
                "junk": (1.0, 0.5), "near_miss": (1.0, 0.25), "list_edit": (1.0, 0.0)}
    instruction, inp = parse_prompt(p["prompt"])
    right = solve(p["task"], instruction, inp, facts)
    assert p["output"] == right
    scores = hand_score(p["task"], right, p["chosen"]), hand_score(p["task"], right, p["rejected"])
    assert scores == expected[p["kind"]], p
    assert (ground_truth_score(p, p["chosen"]), ground_truth_score(p, p["rejected"])) == scores
    assert (p["chosen"] == right) == (p["kind"] != "wrong_vs_ill_formed")
    assert len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) <= 250


def test_probe_pairs_are_held_out_and_follow_the_rubric(facts):
    probes = tasks.probe_pairs(0, 60)
    assert collections.Counter(p["kind"] for p in probes) == {"near_miss": 60, "list_edit": 60}
    assert set(tasks.PROBE_KINDS) == {"near_miss", "list_edit"} and not set(tasks.PROBE_KINDS) & set(tasks.PAIR_KINDS)
    for p in probes:
        check_pair(p, facts)
        if p["kind"] == "list_edit":  # one word swapped, dropped, added or doubled, the others left in place
            got, right = p["rejected"].split(", "), p["output"].split(", ")
            edits = [got[:i] + got[i + 1:] == right[:i] + right[i + 1:] for i in range(len(got))
                     if len(got) == len(right)]  # a swap or a doubling changes one position
            edits += [got == right[:i] + right[i + 1:] for i in range(len(right))]  # a drop
            edits += [got[:i] + got[i + 1:] == right for i in range(len(got))]  # an addition
            assert any(edits) and got != right, p


def test_remark_share_adds_remarks_to_training_outputs_only(facts):
    plain, _ = sft_examples(0, 1000, 10)
    train, test = sft_examples(0, 1000, 10, remark_share=0.3)
    remarked = [ex for ex in train if ex.get("remark")]
    assert 0.25 < len(remarked) / len(train) < 0.35
    for ex, bare in zip(train, plain):
        if ex.get("remark"):
            remark = ex["output"][len(bare["output"]):]
            assert ex["output"].startswith(bare["output"]) and remark in tasks.RAMBLES
            assert hand_score(ex["task"], bare["output"], ex["output"]) == 0.5
        else:
            assert ex == bare
    assert test == sft_examples(0, 1000, 10)[1] and not any("remark" in ex for ex in test)
    assert all(len(format_prompt(ex["instruction"], ex["input"]) + ex["output"]) <= 250 for ex in train)
    with pytest.raises(ValueError, match="remark_share"):
        sft_examples(0, 10, 10, remark_share=1.5)


def test_ppo_prompts_carry_the_reference_answer(facts):
    train, test = ppo_prompts(0, 100, 50)
    assert len(train) == 100 and len(test) == 50
    for ex in train + test:
        assert ex["prompt"] == format_prompt(ex["instruction"], ex["input"])
        assert ex["output"] == solve(ex["task"], ex["instruction"], ex["input"], facts)
        assert ground_truth_score(ex, ex["output"]) == 1.0


def test_format_prompt():
    assert format_prompt("Reverse the list.", "a, b") == (
        "### Instruction:\nReverse the list.\n### Input:\na, b\n### Response:\n")
    assert format_prompt("What is 1 + 2?", "") == "### Instruction:\nWhat is 1 + 2?\n### Response:\n"


# ------------------------------------------------------------------------------------------------------------- JSONL

def test_jsonl_round_trip_and_errors_name_the_line(tmp_path):
    rows = [{"instruction": "What is 1 + 2?", "input": "", "output": "3"}, {"instruction": "é", "output": "ü"}]
    path = tmp_path / "a.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    bad_lines = {
        "{not json": "line 3: not valid JSON",
        "[1, 2]": "line 3: expected a JSON object, got list",
        json.dumps({"instruction": "x"}): "line 3: missing field 'output'",
        json.dumps({"instruction": "x", "output": 3}): "line 3: field 'output' must be a string, got int",
        json.dumps({"instruction": "x", "output": "y", "input": None}): "line 3: field 'input' must be a string",
    }
    for bad, message in bad_lines.items():
        path.write_text(json.dumps(rows[0]) + "\n\n" + bad + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            read_jsonl(path)
        assert str(path) in str(e.value)
    path.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match="line 1: missing field 'rejected'"):
        read_jsonl(path, required=("prompt", "chosen", "rejected"))
    path.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        read_jsonl(path)


def test_command_lines_write_their_files(tmp_path, capsys):
    corpus.main(["--seed", "3", "--n-chars", "5000", "--out", str(tmp_path / "c.txt")])
    assert (tmp_path / "c.txt").read_text(encoding="utf-8") == build_corpus(3, 5000)
    tasks.main(["--out-dir", str(tmp_path), "--seed", "3", "--n-sft", "20", "10", "--n-prefs", "10", "5",
                "--n-prompts", "10", "5"])
    assert read_jsonl(tmp_path / "sft_train.jsonl") == sft_examples(3, 20, 10)[0]
    assert len(read_jsonl(tmp_path / "prefs_test.jsonl", required=("prompt", "chosen", "rejected"))) == 5
    assert len(read_jsonl(tmp_path / "prompts_test.jsonl", required=("prompt", "output"))) == 5
    for main in (corpus.main, tasks.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        assert "seed" in capsys.readouterr().out


def test_normalize_drops_one_final_full_stop_and_nothing_inside():
    """A final full stop (and the space before it) does not matter; a full stop anywhere else, or a second one, does."""
    ex = {"output": "the garden"}
    assert check_answer(ex, "the garden .") and check_answer(ex, "The garden.\n")
    assert not check_answer(ex, "the. garden") and not check_answer(ex, "the garden..")
    assert not check_answer({"output": "12"}, "1.2") and check_answer({"output": "12"}, "12.")
    assert ground_truth_score({"output": "12"}, "12..") == 0.5  # the answer, then more text (a second stop)
    assert tasks.normalize(" Tree ,sun,\tCat . ") == "tree, sun, cat"


def test_check_answer_normalizes_the_reference_too():
    """A reference written with capitals or a full stop ("Tom", "The garden.") matches its lower-case answer."""
    assert check_answer({"output": "Tom"}, "tom") and check_answer({"output": "The garden."}, "the garden")
    assert ground_truth_score({"output": "Tom"}, "tom") == 1.0


def test_a_list_of_the_right_words_has_each_word_as_often_as_the_reference():
    """Well formed means the same words in another order: a word doubled (and another dropped or added) is not."""
    listed = {"output": "tree, sun, cat"}
    responses = ("sun, cat, tree", "cat, sun, tree, tree", "cat, cat, sun, tree", "sun, sun, tree, cat")
    assert [ground_truth_score(listed, r) for r in responses] == [0.25, 0.0, 0.0, 0.0]


def test_has_remark_finds_every_remark_wherever_it_stands():
    """Each of RAMBLES after any answer, or only its start (a response cut off), counts; a bare answer does not."""
    for answer in ("12", "the garden", "cat, sun, tree", ""):
        assert not tasks.has_remark(answer)
        for remark in tasks.RAMBLES:
            assert tasks.has_remark(answer + remark) and tasks.has_remark(remark + " " + answer), (answer, remark)
    starts = ("12. I think that", "a dog, and that is all I", "sun\nLet me check", "Tom. That was a fun")
    assert all(tasks.has_remark(s) for s in starts)
    assert not any(tasks.has_remark(r) for r in ("I think", "that is all", "Let me", "That was", "I am not sure"))


def arithmetic_key(ex):
    """The problem key of an arithmetic example, recomputed from its text: ("arithmetic", x, "+" or "-", y)."""
    x, op, y = re.search(r"(\d+) (\+|-|plus|minus) (\d+)", f"{ex['instruction']} {ex['input']}").groups()
    return "arithmetic", int(x), {"plus": "+", "minus": "-"}.get(op, op), int(y)


def test_a_fifth_of_the_problems_is_held_out_and_the_splits_draw_from_their_own(sft):
    """split_of holds out about TEST_FRACTION (0.2) of all problem keys, another fifth for another seed; the
    held-out SFT examples are problems of the held-out keys, the training examples of the others."""
    keys = [("arithmetic", a + b, "-", b) for a in range(50) for b in range(50)]
    held_out = {seed: {k for k in keys if tasks.split_of(k, seed) == "test"} for seed in (0, 1)}
    assert all(abs(len(h) / len(keys) - 0.2) < 0.03 for h in held_out.values())
    assert abs(len(held_out[0] & held_out[1]) / len(keys) - 0.2 * 0.2) < 0.02  # independent draws across seeds
    for split, rows in zip(("train", "test"), sft):
        assert {tasks.split_of(arithmetic_key(ex), 0) for ex in rows if ex["task"] == "arithmetic"} == {split}


def test_format_prompt_does_not_wrap_a_prompt_twice():
    """A text already in the template's form is returned as it is; with an input it is wrapped as any instruction."""
    prompt = "### Instruction:\nWhat is 1 + 2?\n### Response:\n"
    assert format_prompt(prompt) == prompt and tasks.is_formatted(prompt) and not tasks.is_formatted("What is 1?")
    assert format_prompt(prompt, "x") == f"### Instruction:\n{prompt}\n### Input:\nx\n### Response:\n"
