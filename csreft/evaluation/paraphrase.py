"""Phrasings of the classification tasks, for a suite whose router cannot read a template id.

Every task has 8 instructions: 5 for training, 3 held out for the test split. Each side has
instructions that put the question first and at least one that puts the text first and the
question last. The answer-format line is phrased differently too. Responses and choices are
the classification suite's ("the correct answer is <label>").

    rephrase(task, text, labels, phrasing) -> prompt
    PHRASINGS[task] = (train phrasings, test phrasings)
"""

from __future__ import annotations

import re

# {text}: the review / article / question; {slash}: labels as a/b/c; {comma}: a, b, c
PHRASINGS = {
    "sst2": (
        ("Is the sentiment of this movie review positive or negative?\n\nReview: {text}\n\nAnswer format: {slash}",
         "How does the reviewer feel about the film?\n\n{text}\n\nPossible answers: {comma}",
         "Classify the opinion expressed in the following review.\n\nText: {text}\n\nReply with one of: {comma}",
         "Read this critic's comment and say whether it is favourable.\n\nComment: {text}\n\nAnswer format: {slash}",
         "{text}\n\nDid the writer of this review like the movie? Choose from {slash}."),
        ("Tell me if the following film review is positive or negative.\n\n{text}\n\nOptions: {comma}",
         "What attitude does this excerpt from a movie review show?\n\nExcerpt: {text}\n\nAnswer with one of {slash}",
         "Review: {text}\n\nWas the reviewer positive or negative about it? Answer format: {slash}"),
    ),
    "agnews": (
        ("What is the topic of this news article?\n\nArticle: {text}\n\nAnswer format: {slash}",
         "Which section of a newspaper would this story appear in?\n\n{text}\n\nPossible answers: {comma}",
         "Categorise the following news report by subject.\n\nReport: {text}\n\nReply with one of: {comma}",
         "Here is a headline and a short summary. What area does it cover?\n\nNews: {text}\n\nAnswer format: {slash}",
         "{text}\n\nWhat is this news story about? Choose from {slash}."),
        ("Assign a subject category to this piece of news.\n\n{text}\n\nOptions: {comma}",
         "Decide which topic the story below belongs to.\n\nStory: {text}\n\nAnswer with one of {slash}",
         "Article: {text}\n\nWhich topic does the article cover? Answer format: {slash}"),
    ),
    "trec": (
        ("What kind of answer does this question ask for?\n\nQuestion: {text}\n\nAnswer format: {slash}",
         "What type of information is being requested here?\n\n{text}\n\nPossible answers: {comma}",
         "Classify the following question by the kind of answer it expects.\n\nQuery: {text}\n\nReply with one of: {comma}",
         "Someone asked this. What sort of thing would the answer be?\n\nAsked: {text}\n\nAnswer format: {slash}",
         "{text}\n\nWhat kind of answer is this question looking for? Choose from {slash}."),
        ("Identify the answer type this question needs.\n\n{text}\n\nOptions: {comma}",
         "Which category does the expected answer of this question fall into?\n\nQ: {text}\n\nAnswer with one of {slash}",
         "Question: {text}\n\nWhat type of answer would it take? Answer format: {slash}"),
    ),
}
_FIELD = {"sst2": "Review", "agnews": "Article", "trec": "Question"}


def source_text(task: str, prompt: str) -> str:
    """The review / article / question inside a classification-suite prompt."""
    found = re.search(rf"\n\n{_FIELD[task]}: (.*?)\n\nAnswer format: ", prompt, re.DOTALL)
    if found is None:
        raise ValueError(f"a {task} prompt without '{_FIELD[task]}: ...' and an answer-format line: {prompt[:80]!r}")
    return found.group(1)


def rephrase(task: str, text: str, labels: list[str], phrasing: str) -> str:
    return phrasing.format(text=text, slash="/".join(labels), comma=", ".join(labels))
