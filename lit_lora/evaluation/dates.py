"""The quickstart's task for a real model: write the date found in a sentence in ISO 8601 form, YYYY-MM-DD.

    {"instruction": "Write the date in this sentence in ISO format (YYYY-MM-DD).",
     "input": "The invoice is due the 3rd of March 2021.",
     "output": "2021-03-03",
     "task": "the Dth of Month YYYY"}                       <- how the date is written: scores split by form

Why this task? It separates what a small instruct model already knows from what finetuning adds.
Asked for this format, SmolLM2-135M-Instruct mostly repeats the sentence or answers in its own habits
("22 July 2002", "12/12/1964"): 6 % exact matches (3 of 48) on the quickstart's held-out sentences. A
fixed answer format is what a few dozen steps of finetuning teach best (the quickstart's LoRA reaches
96 % in 24 steps), and every answer is checkable exactly.

Held out: the test dates are drawn first and never appear in training, so a model that only learned
training answers by heart scores nothing; it has to learn the mapping. The five written forms and
eight sentences are shared by train and test (the format is the lesson, not the sentence).

Everything is seeded: the same seed gives the same records, and the test records do not depend on
how many train records are asked for.
"""

import datetime
import random
from typing import Callable, Dict, List, Tuple


INSTRUCTION = "Write the date in this sentence in ISO format (YYYY-MM-DD)."
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
SENTENCES = ("The meeting was moved to {date}.", "She was born on {date}.", "The contract ends on {date}.",
             "We arrived in Lisbon on {date}.", "The invoice is due {date}.", "The bridge opened on {date}.",
             "Payment was received on {date}.", "The concert is on {date}.")
FIRST_DAY, LAST_DAY = datetime.date(1950, 1, 1), datetime.date(2030, 12, 31)


def ordinal(day: int) -> str:
    """1st, 2nd, 3rd, 4th, ... 11th, 12th, 13th, ... 21st, 22nd, 23rd, ... 31st."""
    suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# How a date is written in the sentences (Dth: the day as an ordinal, 3rd; Mon: the month's first three letters).
FORMS: Dict[str, Callable[[datetime.date], str]] = {
    "Month D, YYYY": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "D Month YYYY": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    "the Dth of Month YYYY": lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    "Mon D, YYYY": lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",
    "Dth Month, YYYY": lambda d: f"{ordinal(d.day)} {MONTHS[d.month - 1]}, {d.year}",
}


def date_record(date: datetime.date, rng: random.Random) -> Dict[str, str]:
    """One Alpaca-format record for `date`: a random sentence with the date in a random written form."""
    form = rng.choice(list(FORMS))
    sentence = rng.choice(SENTENCES).format(date=FORMS[form](date))
    return {"instruction": INSTRUCTION, "input": sentence, "output": date.isoformat(), "task": form}


def make_date_records(n_train: int, n_test: int, seed: int = 1337) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """(train records, held-out test records) over distinct dates between 1950 and 2030."""
    days_available = LAST_DAY.toordinal() - FIRST_DAY.toordinal() + 1
    if n_train < 1 or n_test < 1 or n_train + n_test > days_available:
        raise ValueError(f"n_train ({n_train}) and n_test ({n_test}) must be positive and together at most "
                         f"{days_available:,}, the days from {FIRST_DAY} to {LAST_DAY}")
    rng, days = random.Random(seed), {}  # a dict keeps the order of drawing: the first n_test days are the test's
    while len(days) < n_test + n_train:
        days.setdefault(rng.randint(FIRST_DAY.toordinal(), LAST_DAY.toordinal()), None)
    days = list(days)
    test_rng, train_rng = random.Random(seed + 1), random.Random(seed + 2)  # the test set is the same for any n_train
    test = [date_record(datetime.date.fromordinal(day), test_rng) for day in days[:n_test]]
    train = [date_record(datetime.date.fromordinal(day), train_rng) for day in days[n_test:]]
    return train, test
