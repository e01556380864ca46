"""What every suite is made of: the Suite container, the answer checkers, and the generated
inputs (words, sentences with a sentiment, digit lists) that the generated suites share.

csreft.evaluation.suites builds the suites from these; csreft.evaluation.grid builds the
composition grid from them too.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

# -- checkers --------------------------------------------------------------------------------
CHECK_KINDS = ("exact", "caseless", "numbers", "label")
_QUOTES = "\"'`"


def _normalise(text: str) -> str:
    """Format noise every skill tolerates: outer whitespace and quotes, one trailing period,
    runs of whitespace. Case is kept."""
    text = " ".join(str(text).split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
        text = text[1:-1].strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def _numbers(text: str) -> list[int] | None:
    """Integers of a list written with spaces and/or commas; None if anything else is there."""
    parts = text.replace(",", " ").split()
    if not parts or not all(re.fullmatch(r"[+-]?\d+", p) for p in parts):
        return None
    return [int(p) for p in parts]


def _label(text: str) -> str:
    """The label in "the correct answer is <label>" (or a bare label), lower-cased."""
    text = _normalise(text).lower()
    head = "the correct answer is"
    if text.startswith(head):
        text = text[len(head):].strip()
    return _normalise(text)


def check_answer(kind: str, reference: str, output: str) -> bool:
    """Does `output` give `reference`?

    exact: case-sensitive text (reverse, upper-case); caseless: case-insensitive text
    (sentiment words); numbers: the same integers in the same order, spaces or commas between
    them; label: "the correct answer is <label>" or the bare label, case-insensitive.
    All kinds ignore outer whitespace/quotes, a trailing period and repeated spaces.
    """
    if kind == "exact":
        return _normalise(output) == _normalise(reference)
    if kind == "caseless":
        return _normalise(output).lower() == _normalise(reference).lower()
    if kind == "numbers":
        got = _numbers(_normalise(output))
        return got is not None and got == _numbers(_normalise(reference))
    if kind == "label":
        return _label(output) == _label(reference)
    raise ValueError(f"unknown check kind {kind!r}; expected one of {CHECK_KINDS}")


# -- the suite container ---------------------------------------------------------------------
class SuiteUnavailable(RuntimeError):
    """A real-data suite's files are not there (a fresh clone has no ../shared/data)."""


@dataclass
class Suite:
    """Records of several skills. train/test hold each skill's disjoint prompts; composed holds
    held-out prompts that need two skills at once (never in train); validation holds further
    composed prompts for choosing how to compose (the grid suite's validation cells), never
    scored as results. scoring is "exact" (greedy generation + checker) or "label"
    (log-likelihood choice among record["choices"])."""

    name: str
    skills: list[str]
    train: list[dict]
    test: list[dict]
    composed: list[dict] = field(default_factory=list)
    scoring: str = "exact"
    info: dict = field(default_factory=dict)
    validation: list[dict] = field(default_factory=list)

    def check(self, record: dict, output_text: str) -> bool:
        """True iff output_text gives the record's answer (see check_answer for the kinds)."""
        kind = record.get("check") or ("label" if self.scoring == "label" else "exact")
        return check_answer(kind, record.get("answer", record["response"]), output_text)

    def split(self, name: str) -> list[dict]:
        """The records of "train", "test", "composed" or "validation"."""
        if name not in ("train", "test", "composed", "validation"):
            raise ValueError(f"unknown split {name!r}; expected 'train', 'test', 'composed' or 'validation'")
        return getattr(self, name)

    def skill_index(self, record: dict) -> list[int]:
        """Indices into self.skills of the skills a record needs (two for a composed one)."""
        return [self.skills.index(s) for s in record.get("skills", [record["skill"]])]


# -- generated inputs ------------------------------------------------------------------------
_WORDS = sorted({w for w in """
    apple bread chair river stone cloud table horse plant music light grass water sugar
    paper glass money honey lemon mouse night ocean piano queen robot shirt smile snake
    spoon storm tiger train truck voice whale wheel world zebra angel badge beach berry
    blade block board bonus brain brick brush cabin camel candy cargo chain chalk charm
    chess chief child coast coral couch crane crowd crown dance diary dream dress drink
    eagle earth fairy feast fence field flame flock flute forest frost fruit ghost giant
    grape heart hotel house image jelly juice knife label lamp lake leaf lion magic maple
    march medal metal mirror moon motor mountain nest novel olive onion orbit otter owner
    panda party pearl pepper photo pilot pizza planet pocket poem pond pride prince puppy
    quilt radio rain ranch rider rocket roof rose salad scarf scout sheep shell shore
    silver skirt sleep snow socks sound space spice spider sport star steam stick sun
    sweet sword teeth thumb toast tooth tower toy trail tree tulip turtle uncle union
    valley vase video wagon watch wind window winter wolf yacht yard yellow young bag bed
    bell bird boat book box bus cake car cat coat cup desk dog door drum egg farm fish flag
    fork frog gift goat hat hill jar key kite lamb map milk nail net nut pan pen pig pot
    ring road rug seed ship shoe sock tent tin top van web wing yarn cow fox owl bee ant
    bear duck hen king mask ball bowl card coin corn dish doll fan film fire gate gold
    harp iron jet kid lock meal mint nose oak path pear pine rock rope salt sand soap song
    soup tail tape tea town wall wave wood
""".split() if w != w[::-1]})

_NOUNS = """
    movie food meal book song game show hotel trip room service view story day party
    class film concert coffee pizza team ride visit weather garden lesson album shop
""".split()
_POSITIVE = "good great lovely nice wonderful fun tasty excellent pleasant amazing superb fine".split()
_NEGATIVE = "bad awful boring terrible dull poor horrible nasty bland sad weak rude".split()
_SENTENCE_TEMPLATES = [
    "{adj} {noun}",
    "a {adj} {noun}",
    "the {noun} was {adj}",
    "what a {adj} {noun}",
    "the {noun} was really {adj}",
    "i think the {noun} is {adj}",
    "honestly the {noun} felt very {adj}",
]


@lru_cache(maxsize=None)
def _sentences() -> tuple[tuple[str, str], ...]:
    """Every (sentence, sentiment) the templates make (deterministic order)."""
    out = []
    for template in _SENTENCE_TEMPLATES:
        for noun in _NOUNS:
            for label, adjectives in (("positive", _POSITIVE), ("negative", _NEGATIVE)):
                for adj in adjectives:
                    text = template.format(adj=adj, noun=noun)
                    out.append((re.sub(r"\ba (?=[aeiou])", "an ", text), label))
    return tuple(out)


@lru_cache(maxsize=None)
def _number_lists() -> tuple[tuple[int, ...], ...]:
    """Lists of 3 to 5 distinct digits 1..9, neither ascending nor descending (so sorting
    them is never a copy), in a fixed pseudo-random order."""
    rng = random.Random("csreft-number-lists")
    seen, out = set(), []
    while len(out) < 2000:
        x = tuple(rng.sample(range(1, 10), rng.choice((3, 4, 4, 5))))
        if x not in seen and list(x) != sorted(x) and list(x) != sorted(x, reverse=True):
            seen.add(x)
            out.append(x)
    return tuple(out)


def _fmt(nums) -> str:
    return " ".join(str(n) for n in nums)
