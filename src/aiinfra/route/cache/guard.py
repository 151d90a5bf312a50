"""The guard: a hit must ask the same question as the entry, not just sit near it in embedding space.

Embeddings place near-opposites closer than paraphrases ("enable 2FA" / "disable 2FA" 0.91 on all-MiniLM-L6-v2),
so a cosine threshold alone cannot tell them apart. Each prompt is reduced once to the features that flip an
answer while barely moving an embedding, and a hit needs them to agree:

- polarity: negators (not, no, without, ...-n't) in the same parity, and no axis of opposites (enable/disable,
  include/exclude, on/off, ascending/descending, ...) or prefixed opposite (lock/unlock, like/dislike) on
  different ends;
- numbers (digits and number words, in order), units (in order: miles to km is not km to miles), operators;
- named things: proper names, code identifiers, quoted strings, programming languages and tools, the same set
  and, where a relation runs between them (to, from, than, who did what to whom), the same order;
- the kind of question (why, when, where, who, how many ...), code blocks verbatim, and the same text past the
  embedding model's window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from aiinfra.route.cache.lexicon import (
    DIRECTIONAL,
    NEGATORS,
    NUMBER_ONLY,
    NUMBER_WORDS,
    OPPOSITES,
    QUESTION_KINDS,
    STOPWORDS,
    SYMMETRIC,
    TECH_NAMES,
    UNITS,
)

TOKEN = re.compile(r"`[^`\n]+`|\"[^\"\n]{1,80}\"|[A-Za-z0-9_][\w#+]*(?:[.'\-][\w#+]+)*(?:\(\))?|[$€£%]|"
                   r"[+\-*/<>=!&|^~]{1,3}|,")
CODE_BLOCK = re.compile(r"```.*?(?:```|$)", re.S)
NUMBER = re.compile(r"^\d+(?:[.,]\d+)*$")
OPERATOR = re.compile(r"^[+\-*/<>=!&|^~]{1,3}$")
WINDOW_WORDS = 180  # past about this many words the embedding (256 word pieces) no longer sees the text
PREFIXES = ("un", "dis", "de", "in", "im", "non", "anti", "ir", "il")


def _variants(word: str) -> set[str]:
    stem = word[:-1] if word.endswith("e") else word
    doubled = word + word[-1]
    forms = {word, word + "s", word + "es", word + "d", word + "ed", stem + "ing", stem + "ed", doubled + "ed",
             doubled + "ing", word + "er", word + "est", doubled + "er", doubled + "est", stem + "er", stem + "est"}
    if word.endswith("y"):
        forms |= {word[:-1] + "ier", word[:-1] + "iest", word[:-1] + "ies", word[:-1] + "ied"}
    return forms


def _axes() -> dict[str, tuple[int, int]]:
    axes: dict[str, tuple[int, int]] = {}
    for index, line in enumerate(" ".join(OPPOSITES.split("\n    ")).splitlines()):
        ends = line.split("|")
        for sign, words in enumerate(ends):
            for word in words.split():
                for form in _variants(word) if "_" not in word else {word}:
                    axes.setdefault(form, (index, sign))
    return axes


AXES = _axes()
UNIT_OF = {word: unit for unit, words in UNITS.items() for word in words.split()}
PHRASES = {("turn", "on"): "turn_on", ("turn", "off"): "turn_off", ("switch", "on"): "switch_on",
           ("switch", "off"): "switch_off", ("log", "in"): "log_in", ("log", "out"): "log_out",
           ("sign", "in"): "sign_in", ("sign", "out"): "sign_out", ("speed", "up"): "speed_up",
           ("slow", "down"): "slow_down", ("upper", "case"): "upper_case", ("lower", "case"): "lower_case"}


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


@dataclass(frozen=True)
class Features:
    """What of a prompt must match for two prompts to ask the same thing."""

    negations: int
    polarity: frozenset[tuple[int, int]]
    words: frozenset[str]
    numbers: tuple[str, ...]
    units: tuple[str, ...]
    operators: tuple[str, ...]
    names: tuple[str, ...]
    content: tuple[str, ...]
    tokens: tuple[str, ...]
    question: frozenset[str]
    code: tuple[str, ...]
    tail: str


def _is_name(token: str, first: bool) -> bool:
    lower = token.lower()
    if lower in TECH_NAMES or token[0] in "`\"":
        return True
    if any(ch.isdigit() for ch in token) and not NUMBER.match(token):
        return True  # 2fa, ipv6, python3, utf-8
    if "_" in token or token.endswith("()") or ("." in token and not NUMBER.match(token)):
        return True
    if re.search(r"[a-z][A-Z]", token) or (token.isupper() and len(token) > 1):
        return True  # camelCase, SQL, API
    return token[0].isupper() and not first and lower not in STOPWORDS and token != "I"


def _merge_phrases(words: list[str]) -> list[str]:
    merged: list[str] = []
    for word in words:
        if merged and (merged[-1], word) in PHRASES:
            merged[-1] = PHRASES[(merged[-1], word)]
        else:
            merged.append(word)
    return merged


def _operators(words: list[str]) -> tuple[str, ...]:
    """Operators between numbers or names (7 // 2, a + b): in prose a slash or a dash is punctuation."""
    found = []
    for index in range(1, len(words) - 1):
        if OPERATOR.match(words[index]) and not OPERATOR.match(words[index - 1]) and (
                NUMBER.match(words[index - 1]) or NUMBER.match(words[index + 1])):
            found.append(words[index])
    return tuple(found)


def _question_kinds(words: list[str]) -> frozenset[str]:
    kinds = set()
    for index, word in enumerate(words):
        pair = f"{word}_{words[index + 1]}" if index + 1 < len(words) else ""
        if pair in QUESTION_KINDS:
            kinds.add(QUESTION_KINDS[pair])
        elif word in QUESTION_KINDS and word != "how":
            kinds.add(QUESTION_KINDS[word])
    return frozenset(kinds)


@lru_cache(maxsize=65_536)
def features(text: str) -> Features:
    """The guard's reading of one prompt (memoised: an entry's text is read once)."""
    code = tuple(" ".join(block.split()) for block in CODE_BLOCK.findall(text))
    prose = CODE_BLOCK.sub(" ", text)
    raw = TOKEN.findall(prose)
    sentence_start = {0} | {i + 1 for i, token in enumerate(raw) if token in ".?!:"}
    words = _merge_phrases([token.lower() for token in raw])
    negations = sum(word in NEGATORS or word.endswith("n't") for word in words)
    polarity = frozenset(AXES[word] for word in words if word in AXES)
    numbers = tuple(str(NUMBER_WORDS[w]) if w in NUMBER_ONLY else w.replace(",", "") for w in words
                    if NUMBER.match(w) or w in NUMBER_ONLY)
    units: list[str] = []
    for word in words:
        unit = UNIT_OF.get(word)
        if unit is not None and (not units or units[-1] != unit):
            units.append(unit)
    names: list[str] = []
    for index, token in enumerate(raw):
        if _is_name(token, index in sentence_start):
            name = token.strip("`\"").lower()
            if name not in names:
                names.append(name)
    content: list[str] = []
    stems: set[str] = set()
    for word in words:
        stem = _stem(word)
        if word not in STOPWORDS and not NUMBER.match(word) and len(word) > 1 and stem not in stems:
            stems.add(stem)
            content.append(word)
    tail_words = text.split()[WINDOW_WORDS:]
    return Features(
        negations=negations, polarity=polarity, words=frozenset(words), numbers=numbers, units=tuple(units),
        operators=_operators(words), names=tuple(names), content=tuple(content),
        tokens=tuple(words), question=_question_kinds(words), code=code, tail=" ".join(tail_words))


def _opposite_ends(a: Features, b: Features) -> bool:
    axes_a = {axis for axis, _ in a.polarity}
    for axis in axes_a & {axis for axis, _ in b.polarity}:
        if {s for x, s in a.polarity if x == axis} != {s for x, s in b.polarity if x == axis}:
            return True
    return False


def _prefixed_opposite(a: Features, b: Features) -> bool:
    only_a, only_b = a.words - b.words, b.words - a.words
    for word in only_a:
        for prefix in PREFIXES:
            root = word[len(prefix):]
            if (word.startswith(prefix) and len(root) >= 3 and root in only_b) or (
                    len(word) >= 3 and prefix + word in only_b):
                return True
    return False


def _between(tokens: tuple[str, ...], x: str, y: str) -> set[str] | None:
    """The words between the first x and the first y after it, or None if y does not follow x."""
    try:
        start = tokens.index(x)
        end = tokens.index(y, start + 1)
    except ValueError:
        return None
    return set(tokens[start + 1 : end])


def _swapped(order_a: tuple[str, ...], order_b: tuple[str, ...], a: Features, b: Features) -> bool:
    """Two shared items in opposite orders with a relation between them that is not symmetric in both."""
    shared = [item for item in order_a if item in order_b]
    position_b = {item: order_b.index(item) for item in shared}
    for i, x in enumerate(shared):
        for y in shared[i + 1 :]:
            if position_b[x] < position_b[y]:
                continue
            between_a = _between(a.tokens, x, y)
            between_b = _between(b.tokens, y, x)
            if between_a is None or between_b is None:
                continue
            relation_a, relation_b = between_a - SYMMETRIC - STOPWORDS, between_b - SYMMETRIC - STOPWORDS
            directional = between_a & between_b & DIRECTIONAL
            if (relation_a and relation_a == relation_b) or (directional and not (between_a | between_b) & SYMMETRIC):
                return True
    return False


def _direction_swapped(a: Features, b: Features) -> bool:
    """The same preposition with each other's objects: from Paris to London / from London to Paris."""
    def objects(features: Features) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Each preposition's first object and the words before the preposition."""
        found = {}
        tokens = features.tokens
        for index, word in enumerate(tokens[:-1]):
            if word in DIRECTIONAL and word not in found:
                following = [t for t in tokens[index + 1 : index + 4] if t not in STOPWORDS]
                if following:
                    found[word] = (following[0], tokens[:index])
        return found

    objects_a, objects_b = objects(a), objects(b)
    for preposition in objects_a.keys() & objects_b.keys():
        (x, before_a), (y, before_b) = objects_a[preposition], objects_b[preposition]
        if x != y and x in before_b and y in before_a:
            return True
    return False


def mismatch(a_text: str, b_text: str) -> str | None:
    """Why two prompts ask different things (the first check that fails), or None when nothing says they do."""
    if a_text == b_text:
        return None
    a, b = features(a_text), features(b_text)
    if a.negations % 2 != b.negations % 2:
        return "negation"
    if _opposite_ends(a, b) or _prefixed_opposite(a, b):
        return "polarity"
    if a.numbers != b.numbers or a.operators != b.operators:
        return "numbers"
    if a.units != b.units:
        return "units"
    if set(a.names) != set(b.names):
        return "names"
    if a.question and b.question and a.question != b.question:
        return "question"
    if a.code != b.code or a.tail != b.tail:
        return "verbatim"
    if _swapped(a.names, b.names, a, b) or _direction_swapped(a, b) or _swapped(a.content, b.content, a, b):
        return "order"
    return None
