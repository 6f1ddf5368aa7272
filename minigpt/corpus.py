"""The built-in world and the pretraining text written about it.

Nothing is downloaded: every stage of the pipeline reads text made here, deterministically from a seed, so the demo
tells one story. ``build_world(seed)`` picks a few dozen characters and gives each a pet, a favourite colour and a
favourite food. ``build_corpus(seed, n_chars)`` writes documents about that world, separated by a blank line:

- stories ("Tom went to the garden. Tom found a red ball. ...") followed by questions and answers about them;
- facts about the characters and the world ("Tom has a dog.", "A cow says moo.");
- arithmetic facts with small numbers in several phrasings ("3 + 4 = 7", "7 minus 4 is 3", word problems);
- lists and list operations: reversing, sorting words alphabetically, sorting numbers, first and last words;
- question/answer drills that use the instruction phrasings of the fine-tuning tasks (``minigpt.tasks``).

These are the skills the fine-tuning tasks test, so a tiny GPT pretrained on this text fine-tunes quickly.
Each document is one paragraph (no blank line inside), so splitting on blank lines gives the documents back.

CLI: ``python -m minigpt.corpus --seed 0 --n-chars 1500000 --out corpus.txt``
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

NAME_POOL = (
    "Tom", "Mia", "Sam", "Ann", "Ben", "Eva", "Max", "Lily", "Jack", "Zoe", "Leo", "Ruby", "Dan", "Ivy", "Ned",
    "Amy", "Bob", "Kim", "Joe", "Nina", "Tim", "Sue", "Ella", "Paul", "Rose", "Finn", "Jane", "Alex", "Owen", "Lucy",
    "Hugo", "Emma", "Carl", "Tess", "Adam", "Nora", "Fred", "Kate", "Oscar", "Gus",
)  # fmt: skip
PLACES = (
    "the garden", "the park", "the school", "the beach", "the forest", "the market", "the library", "the farm",
    "the river", "the kitchen", "the shop", "the zoo", "the hill", "the lake",
)  # fmt: skip
OBJECTS = ("ball", "box", "cup", "hat", "kite", "book", "bag", "key", "pen", "bell", "coat", "drum", "lamp", "shoe",
           "boat", "sock")
ANIMAL_SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "pig": "oink", "sheep": "baa",
                 "frog": "ribbit", "bird": "tweet", "horse": "neigh", "mouse": "squeak", "owl": "hoot", "goat": "maa"}
ANIMALS = tuple(ANIMAL_SOUNDS)
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "pink", "brown", "orange", "purple")
FOODS = ("cake", "bread", "soup", "rice", "cheese", "pie", "jam", "honey", "toast", "corn", "pasta", "salad")
THINGS = ("apples", "eggs", "coins", "shells", "stones", "pears", "cards", "plums")  # counted in word problems
FEELINGS = ("happy", "sad", "tired", "hungry", "excited", "sleepy")
# Words for the list tasks: the world's short nouns and colours (at most five letters, so lists stay short).
LIST_WORDS = tuple(sorted({w for w in OBJECTS + ANIMALS + COLOURS + FOODS if len(w) <= 5}))
MAX_OPERAND = 12  # arithmetic uses a + b and (a + b) - b with 0 <= a, b <= MAX_OPERAND

# The closed-book questions about a character, by property: answered from the facts the corpus states.
FACT_QUESTIONS = {
    "pet": ("What pet does {name} have?", "What animal does {name} have?", "Which pet belongs to {name}?"),
    "colour": ("What is {name}'s favourite colour?", "Which colour does {name} like best?",
               "What colour does {name} like most?"),
    "food": ("What is {name}'s favourite food?", "Which food does {name} like best?",
             "What food does {name} like most?"),
}
FACT_STATEMENTS = {
    "pet": ("{name} has {value}.", "{name}'s pet is {value}.", "{name} has a pet {word}."),  # value: "an owl"
    "colour": ("{name}'s favourite colour is {value}.", "{name} likes {value} best of all colours.",
               "The colour {name} likes best is {value}."),
    "food": ("{name}'s favourite food is {value}.", "{name} likes {value} more than any other food.",
             "The food {name} likes best is {value}."),
}


@dataclass(frozen=True)
class Person:
    """A character of the world and the properties the corpus states about them."""

    name: str
    pet: str
    colour: str
    food: str

    def fact(self, prop: str) -> str:
        """The answer to a FACT_QUESTIONS question about ``prop`` ("pet" -> "a dog", "colour" -> "blue")."""
        value = getattr(self, prop)
        return f"{article(value)} {value}" if prop == "pet" else value


@dataclass(frozen=True)
class World:
    """The characters (chosen and given properties by the seed); places, objects etc. are the module's tuples."""

    people: tuple[Person, ...]

    def person(self, name: str) -> Person:
        return next(p for p in self.people if p.name == name)


def build_world(seed: int = 0, n_people: int = 24) -> World:
    """n_people characters drawn from NAME_POOL, each with a pet, a favourite colour and a favourite food."""
    if not 2 <= n_people <= len(NAME_POOL):
        raise ValueError(f"n_people must be in [2, {len(NAME_POOL)}], got {n_people}")
    rng = random.Random(f"world-{seed}")
    names = rng.sample(NAME_POOL, n_people)
    return World(tuple(Person(n, rng.choice(ANIMALS), rng.choice(COLOURS), rng.choice(FOODS)) for n in names))


def article(word: str) -> str:
    """The indefinite article for word: 'an' before a vowel letter, else 'a'."""
    return "an" if word[0] in "aeiou" else "a"


def join_words(words) -> str:
    """The list notation used everywhere: 'cat, sun, tree'."""
    return ", ".join(str(w) for w in words)


# ----------------------------------------------------------------------------------------------------------- stories

@dataclass
class Story:
    """Sentences of a story and the (question, answer) pairs it answers unambiguously."""

    sentences: list[str] = field(default_factory=list)
    qa: list[tuple[str, str]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.sentences)


EVENTS = ("go", "find", "eat", "see", "give", "feel")


def make_story(rng: random.Random, world: World, n_events: int = 3, n_people: int = 2, extras: bool = False) -> Story:
    """A story of n_events simple events among n_people characters, with its questions and answers.

    Each character does each kind of event at most once and every found object is different, so every question
    ("Where did Tom go?", "Who found the kite?") has one answer. extras adds an opening, world facts, a counting
    event and an ending, for the longer stories of the pretraining text.
    """
    people = rng.sample(world.people, n_people)
    objects = rng.sample(OBJECTS, len(OBJECTS))  # drawn from the end, so never repeated in one story
    done, found = set(), {}  # (name, event) pairs used; name -> object in hand
    story = Story()
    if extras:
        names = ", ".join(p.name for p in people[:-1]) + f" and {people[-1].name}" if n_people > 1 else people[0].name
        story.sentences.append(rng.choice((f"This is a story about {names}.", f"Once upon a time there were {names}.",
                                           f"One day {names} met.")))
        p = rng.choice(people)
        story.sentences.append(f"{p.name} has {p.fact('pet')}.")
    for _ in range(n_events):
        for _attempt in range(30):
            p, event = rng.choice(people), rng.choice(EVENTS)
            if (p.name, event) not in done and (event != "give" or (p.name in found and n_people > 1)):
                break
        else:
            continue
        done.add((p.name, event))
        x = p.name
        if event == "go":
            place = rng.choice(PLACES)
            verb = rng.choice(("went", "walked", "ran"))
            story.sentences.append(f"{x} {verb} to {place}.")
            story.qa.append((f"Where did {x} go?", place))
        elif event == "find":
            obj = objects.pop()
            colour = p.colour if rng.random() < 0.3 else rng.choice(COLOURS)
            story.sentences.append(f"{x} found {article(colour)} {colour} {obj}.")
            story.qa += [(f"What did {x} find?", f"{article(colour)} {colour} {obj}"),
                         (f"What colour was the {obj}?", colour), (f"Who found the {obj}?", x)]
            found[x] = obj
            if extras and colour == p.colour:
                story.sentences.append(f"{colour.capitalize()} is {x}'s favourite colour.")
        elif event == "eat":
            food = p.food if rng.random() < 0.3 else rng.choice(FOODS)
            story.sentences.append(f"{x} {rng.choice(('ate', 'had'))} some {food}.")
            story.qa.append((f"What did {x} eat?", food))
        elif event == "see":
            animal = rng.choice(ANIMALS)
            story.sentences.append(f"{x} saw {article(animal)} {animal}.")
            story.qa.append((f"What did {x} see?", f"{article(animal)} {animal}"))
        elif event == "give":
            y = rng.choice([q.name for q in people if q.name != x])
            obj = found.pop(x)
            story.sentences.append(f"{x} gave the {obj} to {y}.")
            story.qa.append((f"Who did {x} give the {obj} to?", y))
        else:  # feel
            feeling = rng.choice(FEELINGS)
            story.sentences.append(f"{x} {rng.choice(('was', 'felt'))} {feeling}.")
            story.qa.append((f"How did {x} feel?", feeling))
    if extras and rng.random() < 0.5:
        x, y = rng.sample([q.name for q in people], 2) if n_people > 1 else (people[0].name, "A friend")
        a, b, things = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND), rng.choice(THINGS)
        story.sentences.append(f"{x} had {a} {things}. {y} gave {x} {b} more. Now {x} has {a + b} {things}.")
        story.qa.append((f"How many {things} does {x} have now?", str(a + b)))
    if extras:
        story.sentences.append(rng.choice(("The end.", "It was a good day.", "Then everyone went home.")))
    return story


def _format_qa(rng: random.Random, qa: list[tuple[str, str]]) -> list[str]:
    """Question/answer lines in one of several styles."""
    style = rng.randrange(5)
    lines = []
    for q, a in qa:
        if style == 0:
            lines.append(f"Q: {q} A: {a}.")
        elif style == 1:
            lines.append(f"Question: {q}\nAnswer: {a}")
        elif style == 2:
            lines.append(f"{q} The answer is {a}.")
        elif style == 3:
            lines.append(f"{q} {a[0].upper() + a[1:]}.")
        else:  # the answer starts a line, as it does after the fine-tuning prompt
            lines.append(f"{q}\n{a}")
    return lines


def story_doc(rng: random.Random, world: World) -> str:
    """A story (short like the tasks' or long), usually followed by questions and answers about it."""
    if rng.random() < 0.4:
        story = make_story(rng, world, n_events=rng.randint(2, 3), n_people=2)
    else:
        story = make_story(rng, world, n_events=rng.randint(4, 8), n_people=rng.randint(2, 3), extras=True)
    qa = rng.sample(story.qa, min(len(story.qa), rng.randint(0, 3)))
    return "\n".join([story.text] + _format_qa(rng, qa))


# ------------------------------------------------------------------------------------------------- facts and lists

def facts_doc(rng: random.Random, world: World) -> str:
    """Facts about one to three characters, or general facts about animals, foods, colours and places."""
    lines = []
    if rng.random() < 0.75:
        for p in rng.sample(world.people, rng.randint(1, 3)):
            props = rng.sample(tuple(FACT_STATEMENTS), rng.randint(2, 3))
            statements = (rng.choice(FACT_STATEMENTS[k]).format(name=p.name, value=p.fact(k), word=getattr(p, k))
                          for k in props)
            lines.append(" ".join(statements))
            if rng.random() < 0.5:
                k = rng.choice(props)
                lines += _format_qa(rng, [(rng.choice(FACT_QUESTIONS[k]).format(name=p.name), p.fact(k))])
    else:
        for _ in range(rng.randint(3, 6)):
            kind = rng.randrange(4)
            if kind == 0:
                animal = rng.choice(ANIMALS)
                lines.append(f"{article(animal).capitalize()} {animal} says {ANIMAL_SOUNDS[animal]}.")
            elif kind == 1:
                lines.append(f"{rng.choice(FOODS).capitalize()} is a food.")
            elif kind == 2:
                lines.append(f"{rng.choice(COLOURS).capitalize()} is a colour.")
            else:
                animal = rng.choice(ANIMALS)
                lines.append(f"{article(animal).capitalize()} {animal} is an animal.")
    return "\n".join(lines)


def arithmetic_line(rng: random.Random, world: World) -> str:
    """One true addition or subtraction fact in one of several phrasings."""
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    c = a + b
    templates = (
        "{a} + {b} = {c}", "{a} plus {b} is {c}.", "What is {a} + {b}? {c}.", "What is {a} + {b}? The answer is {c}.",
        "Add {a} and {b} to get {c}.", "{c} - {b} = {a}", "{c} minus {b} is {a}.", "What is {c} - {b}? {a}.",
        "What is {c} - {b}? The answer is {a}.", "Take {b} from {c} and you have {a}.",
    )  # fmt: skip
    if rng.random() < 0.15:
        x, y = rng.sample([p.name for p in world.people], 2)
        things = rng.choice(THINGS)
        if rng.random() < 0.5:
            return f"{x} had {a} {things}. {y} gave {x} {b} more. Now {x} has {c} {things}."
        return f"{x} had {c} {things}. {x} gave {b} to {y}. Now {x} has {a} {things}."
    return rng.choice(templates).format(a=a, b=b, c=c)


def arithmetic_doc(rng: random.Random, world: World) -> str:
    """A table (adding or taking away one number) or a mix of arithmetic facts, one per line."""
    if rng.random() < 0.3:
        b = rng.randint(1, MAX_OPERAND)
        if rng.random() < 0.5:
            return "\n".join(f"{a} + {b} = {a + b}" for a in range(MAX_OPERAND + 1))
        return "\n".join(f"{a + b} - {b} = {a}" for a in range(MAX_OPERAND + 1))
    return "\n".join(arithmetic_line(rng, world) for _ in range(rng.randint(4, 10)))


def list_line(rng: random.Random) -> str:
    """One true statement about a list: reversed, sorted, its first or last word, its length."""
    words = rng.sample(LIST_WORDS, rng.randint(3, 6))
    w, r, s = join_words(words), join_words(words[::-1]), join_words(sorted(words))
    kind = rng.randrange(10)
    if kind < 4:
        return rng.choice((
            f"The words {w} in reverse order are {r}.", f"Reverse the list {w} and you get {r}.",
            f"Reversed, {w} becomes {r}.", f"Backwards, the list {w} is {r}.",
        ))  # fmt: skip
    if kind < 8:
        return rng.choice((
            f"The words {w} in alphabetical order are {s}.", f"Sorted alphabetically, {w} becomes {s}.",
            f"Put {w} in order from A to Z: {s}.", f"In alphabetical order, the list {w} is {s}.",
        ))  # fmt: skip
    if kind == 8:
        numbers = rng.sample(range(31), rng.randint(3, 6))
        n, ns = join_words(numbers), join_words(sorted(numbers))
        return rng.choice((f"The numbers {n} from smallest to largest are {ns}.",
                           f"Sorted, the numbers {n} become {ns}."))
    return rng.choice((f"The first word in {w} is {words[0]}.", f"The last word in {w} is {words[-1]}.",
                       f"The list {w} has {len(words)} words."))


def list_doc(rng: random.Random, world: World) -> str:
    return "\n".join(list_line(rng) for _ in range(rng.randint(3, 6)))


def drill_doc(rng: random.Random, world: World) -> str:
    """Question/answer drills worded like the fine-tuning instructions (see minigpt.tasks)."""
    lines = []
    for _ in range(rng.randint(2, 5)):
        kind = rng.randrange(5)
        if kind == 0:
            a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
            q, ans = rng.choice(((f"What is {a} + {b}?", a + b), (f"What is {a + b} - {b}?", a),
                                 (f"What is {a} plus {b}?", a + b), (f"What is {a + b} minus {b}?", a)))
        elif kind == 1:
            words = rng.sample(LIST_WORDS, rng.randint(3, 5))
            q, ans = f"Reverse the list: {join_words(words)}.", join_words(words[::-1])
        elif kind == 2:
            words = rng.sample(LIST_WORDS, rng.randint(3, 5))
            q, ans = f"Sort the words alphabetically: {join_words(words)}.", join_words(sorted(words))
        elif kind == 3:
            p, prop = rng.choice(world.people), rng.choice(tuple(FACT_QUESTIONS))
            q, ans = rng.choice(FACT_QUESTIONS[prop]).format(name=p.name), p.fact(prop)
        else:
            story = make_story(rng, world, n_events=rng.randint(2, 3))
            q, ans = rng.choice(story.qa)
            q = f"{story.text} {q}"
        lines += _format_qa(rng, [(q, str(ans))])
    return "\n".join(lines)


DOC_KINDS = ((story_doc, 0.35), (facts_doc, 0.12), (arithmetic_doc, 0.2), (list_doc, 0.18), (drill_doc, 0.15))


def build_documents(seed: int = 0, n_chars: int = 1_500_000) -> list[str]:
    """Documents (paragraphs without blank lines) whose total length, joined by blank lines, is about n_chars.

    The total is at most n_chars and short of it by less than one document (a few hundred characters); at least
    one document is returned.
    """
    if n_chars <= 0:
        raise ValueError(f"n_chars must be positive, got {n_chars}")
    world = build_world(seed)
    rng = random.Random(f"corpus-{seed}")
    makers, weights = zip(*DOC_KINDS)
    docs, total = [], 0
    while True:
        doc = rng.choices(makers, weights)[0](rng, world)
        added = len(doc) + (2 if docs else 0)  # the blank line before it
        if docs and total + added > n_chars:
            return docs
        docs.append(doc)
        total += added


def build_corpus(seed: int = 0, n_chars: int = 1_500_000) -> str:
    """The pretraining text: about n_chars characters of documents about build_world(seed), one blank line apart."""
    return "\n\n".join(build_documents(seed, n_chars))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the built-in pretraining corpus (deterministic from a seed).")
    parser.add_argument("--seed", type=int, default=0, help="world and text seed (default 0)")
    parser.add_argument("--n-chars", type=int, default=1_500_000, help="about this many characters (default 1500000)")
    parser.add_argument("--out", default="corpus.txt", help="output text file (default corpus.txt)")
    args = parser.parse_args(argv)
    if args.n_chars <= 0:
        parser.error(f"--n-chars must be positive, got {args.n_chars}")
    t0 = time.perf_counter()
    text = build_corpus(args.seed, args.n_chars)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {len(text):,} characters ({text.count(chr(10) * 2) + 1:,} documents) to {out} "
          f"in {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
