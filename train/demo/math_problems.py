"""The demo corpus's math domain: word and arithmetic problems from 18 templates, each
answer showing every step (`12 * 7 = 84. 84 - 19 = 65. The answer is 65.`)."""

from __future__ import annotations

import hashlib
import random

from train.demo.sources import SPLITS, split_of

NAMES = ("Ana", "Ben", "Chen", "Dana", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena",
         "Mo", "Nia", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vic", "Wen", "Yara", "Zoe")
ITEMS = ("apples", "pens", "books", "marbles", "cookies", "stickers", "cards", "eggs", "shells",
         "coins", "cups", "balls", "pencils", "stamps", "oranges", "beads")
CONTAINERS = ("boxes", "bags", "crates", "baskets", "packs", "trays", "jars")
MATH_TEMPLATES = ("add", "sub", "mul", "div", "add3", "mixed", "paren", "mul_sub", "remainder",
                  "shop", "buy", "rate", "share", "change", "speed", "save", "packs", "compare")


def _num(rng, digits_choices=(1, 2, 2, 3)):
    d = rng.choice(digits_choices)
    return rng.randint(1 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


def _steps_answer(steps, final) -> str:
    return " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps) + f" The answer is {final}."


def _math_problem(rng):
    """(template, prompt, answer) of one random problem; answers show every step."""
    t = rng.choice(MATH_TEMPLATES)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if t == "add":
        a, b = _num(rng), _num(rng)
        return t, f"What is {a} + {b}?", _steps_answer([(a, "+", b, a + b)], a + b)
    if t == "sub":
        a, b = sorted((_num(rng), _num(rng)), reverse=True)
        return t, f"What is {a} - {b}?", _steps_answer([(a, "-", b, a - b)], a - b)
    if t == "mul":
        a, b = rng.randint(2, 99), rng.randint(2, 12)
        return t, f"What is {a} * {b}?", _steps_answer([(a, "*", b, a * b)], a * b)
    if t == "div":
        b, q = rng.randint(2, 12), rng.randint(2, 99)
        return t, f"What is {b * q} / {b}?", _steps_answer([(b * q, "/", b, q)], q)
    if t == "add3":
        a, b, c = _num(rng), _num(rng), _num(rng)
        return t, f"What is {a} + {b} + {c}?", _steps_answer([(a, "+", b, a + b), (a + b, "+", c, a + b + c)],
                                                              a + b + c)
    if t == "mixed":
        a, b, c = _num(rng), rng.randint(2, 30), rng.randint(2, 12)
        return t, f"What is {a} + {b} * {c}?", _steps_answer([(b, "*", c, b * c), (a, "+", b * c, a + b * c)],
                                                              a + b * c)
    if t == "paren":
        a, b, c = rng.randint(1, 60), rng.randint(1, 60), rng.randint(2, 12)
        return t, f"What is ({a} + {b}) * {c}?", _steps_answer([(a, "+", b, a + b), (a + b, "*", c, (a + b) * c)],
                                                                (a + b) * c)
    if t == "mul_sub":
        a, b = rng.randint(2, 40), rng.randint(2, 12)
        c = rng.randint(1, a * b - 1)
        return t, f"What is {a} * {b} - {c}?", _steps_answer([(a, "*", b, a * b), (a * b, "-", c, a * b - c)],
                                                              a * b - c)
    if t == "remainder":
        b, q = rng.randint(3, 12), rng.randint(2, 60)
        r = rng.randint(1, b - 1)
        a = b * q + r
        return t, f"What is the remainder when {a} is divided by {b}?", _steps_answer(
            [(a, "//", b, q), (q, "*", b, q * b), (a, "-", q * b, r)], r)
    if t == "shop":
        n, k = rng.randint(2, 30), rng.randint(2, 12)
        s = rng.randint(1, n * k - 1)
        box = rng.choice(CONTAINERS)
        return t, (f"A shop has {n} {box} with {k} {item} each. It sells {s} {item}. "
                   f"How many {item} are left?"), _steps_answer([(n, "*", k, n * k), (n * k, "-", s, n * k - s)],
                                                                n * k - s)
    if t == "buy":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        c = rng.randint(1, a + b - 1)
        return t, (f"{name} has {a} {item}. {name} buys {b} more and then gives away {c}. "
                   f"How many {item} does {name} have now?"), _steps_answer(
            [(a, "+", b, a + b), (a + b, "-", c, a + b - c)], a + b - c)
    if t == "rate":
        p, d = rng.randint(2, 60), rng.randint(2, 14)
        return t, f"{name} reads {p} pages a day for {d} days. How many pages does {name} read in total?", \
            _steps_answer([(p, "*", d, p * d)], p * d)
    if t == "share":
        n, q = rng.randint(2, 12), rng.randint(2, 25)
        return t, (f"{n * q} {item} are shared equally among {n} friends. "
                   f"How many {item} does each friend get?"), _steps_answer([(n * q, "/", n, q)], q)
    if t == "change":
        n, p = rng.randint(2, 9), rng.randint(1, 15)
        bill = rng.choice([b for b in (10, 20, 50, 100, 200) if b >= n * p] or [n * p + 5])
        return t, (f"{name} buys {n} notebooks at {p} dollars each and pays with {bill} dollars. "
                   f"How much change does {name} get?"), _steps_answer(
            [(n, "*", p, n * p), (bill, "-", n * p, bill - n * p)], bill - n * p)
    if t == "speed":
        s, h = rng.randint(20, 120), rng.randint(2, 9)
        return t, f"A train travels at {s} km per hour for {h} hours. How many km does it travel?", \
            _steps_answer([(s, "*", h, s * h)], s * h)
    if t == "save":
        a, w = rng.randint(2, 50), rng.randint(2, 20)
        s = rng.randint(1, a * w - 1)
        return t, (f"{name} saves {a} dollars every week for {w} weeks and then spends {s} dollars. "
                   f"How many dollars are left?"), _steps_answer([(a, "*", w, a * w), (a * w, "-", s, a * w - s)],
                                                                 a * w - s)
    if t == "packs":
        a, k, b = rng.randint(2, 20), rng.randint(2, 12), rng.randint(1, 30)
        return t, (f"{name} buys {a} packs of {k} {item} and {b} loose {item}. "
                   f"How many {item} does {name} have?"), _steps_answer(
            [(a, "*", k, a * k), (a * k, "+", b, a * k + b)], a * k + b)
    # compare
    other = rng.choice([n for n in NAMES if n != name])
    a, b = sorted(rng.sample(range(1, 200), 2), reverse=True)
    return t, (f"{name} has {a} {item} and {other} has {b} {item}. "
               f"How many more {item} does {name} have than {other}?"), _steps_answer([(a, "-", b, a - b)], a - b)


def math_examples(caps: dict, seed: int, max_attempts_factor: int = 50):
    """Problems in generation order until every split is full; identical prompts share a source
    (so they land in the same split) and are kept once."""
    rng = random.Random(seed)
    need = dict(caps)
    chosen = {s: [] for s in SPLITS}
    seen = set()
    attempts, limit = 0, max_attempts_factor * max(1, sum(caps.values()))
    while any(len(chosen[s]) < need[s] for s in SPLITS) and attempts < limit:
        attempts += 1
        template, prompt, answer = _math_problem(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        source = f"generated:math/{template}/{hashlib.sha256(prompt.encode()).hexdigest()[:12]}"
        split = split_of(source, seed)
        if len(chosen[split]) < need[split]:
            chosen[split].append({"prompt": prompt, "answer": answer, "domain": "math", "source": source,
                                  "kind": template, "key": f"math|{source}"})
    return chosen, {"generated": attempts, "unique": len(seen)}
