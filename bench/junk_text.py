"""Realistic junk mixed into real text, for benchmarks that need known-bad documents.

Each kind copies something a web crawl is full of, applied to a real document so that the junk
and the clean text share their vocabulary (a classifier must learn the junk, not the topic):

* ``boilerplate``: navigation, cookie, share and footer lines around and between paragraphs;
* ``spam``: a keyword list and one sentence repeated, as link farms and SEO pages do;
* ``mojibake``: UTF-8 read as Windows-1252 (``’`` becomes ``â€™``) in every paragraph, plus
  punctuation a page would have in its place;
* ``word_salad``: the words of each paragraph shuffled (machine-generated filler);
* ``truncated``: paragraphs cut mid-sentence and listed, as scraped snippets are.
"""

from __future__ import annotations

import random

KINDS = ("boilerplate", "spam", "mojibake", "word_salad", "truncated")

NAV = [
    "Home | About Us | Services | Blog | Contact",
    "Skip to main content",
    "Menu ☰  Search 🔍",
    "Privacy Policy | Terms of Use | Cookie Settings | Sitemap",
    "© 2024 All rights reserved.",
    "We use cookies to improve your experience. By continuing you accept our use of cookies."
    " Accept | Learn more",
    "Share this: Facebook Twitter LinkedIn Pinterest Email",
    "Subscribe to our newsletter! Enter your email address",
    "Posted in Uncategorized | Leave a comment",
    "Previous post / Next post",
    "Related posts:",
    "Click here to read more »",
    "Log in | Register | Forgot password?",
    "Tags: news, blog, update, info, best, top, free",
]
SPAM_WORDS = [
    "cheap", "best", "free", "online", "buy", "discount", "deal", "review", "top", "2024",
    "casino", "loans", "download", "pdf", "viagra", "crypto", "bonus", "win", "sale", "offer",
]  # fmt: skip
PUNCTUATION = {"'": "\u2019", '"': "\u201c", "-": "\u2014"}


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def boilerplate(text: str, rng: random.Random) -> str:
    parts = paragraphs(text)
    out = rng.sample(NAV, 3)
    for part in parts:
        out.append(part)
        if rng.random() < 0.5:
            out.append(rng.choice(NAV))
    out += rng.sample(NAV, 4)
    return "\n\n".join(out)


def spam(text: str, rng: random.Random) -> str:
    parts = paragraphs(text)
    keywords = " ".join(rng.choice(SPAM_WORDS) for _ in range(rng.randint(20, 60)))
    sentence = parts[0].split(". ")[0][:120] if parts else "best deals online"
    repeated = "\n".join(f"{sentence} {rng.choice(SPAM_WORDS)}" for _ in range(rng.randint(5, 15)))
    return "\n\n".join([keywords, *parts[: max(1, len(parts) // 2)], repeated, keywords])


def mojibake(text: str, rng: random.Random) -> str:
    for plain, fancy in PUNCTUATION.items():
        text = text.replace(plain, fancy)
    garbled = text.encode("utf-8").decode("cp1252", errors="replace")
    return garbled if rng.random() < 0.5 else garbled.replace("\u2019", "'")


def word_salad(text: str, rng: random.Random) -> str:
    out = []
    for part in paragraphs(text):
        words = part.split()
        rng.shuffle(words)
        out.append(" ".join(words))
    return "\n\n".join(out)


def truncated(text: str, rng: random.Random) -> str:
    out = []
    for part in paragraphs(text):
        cut = rng.randint(min(30, len(part)), max(30, len(part) // 2))
        out.append(f"• {part[:cut]}...")
    return "\n".join(out)


CORRUPT = {
    "boilerplate": boilerplate,
    "spam": spam,
    "mojibake": mojibake,
    "word_salad": word_salad,
    "truncated": truncated,
}


def corrupt(text: str, rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """``text`` with one kind of junk (chosen at random when ``kind`` is None): (text, kind)."""
    kind = kind or rng.choice(KINDS)
    return CORRUPT[kind](text, rng), kind
