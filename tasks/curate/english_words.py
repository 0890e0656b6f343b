"""English words as datatrove counts them: spaCy 3.8's rule-based English tokenizer, re-implemented.

datatrove splits English into words with spaCy's tokenizer (``spacy.blank("en")``) and counts C4
sentences with spaCy's sentencizer; the quality signals
(:mod:`llmflow.tasks.curate.quality_signals`) must count the same words. Running spaCy is most of
datatrove's cost, and spaCy is not a dependency here, so :func:`split_words` re-implements that
tokenizer: the same algorithm (whitespace chunks, then special cases, prefixes, suffixes, URLs and
infixes, spaCy's ``Tokenizer.explain`` order) with spaCy 3.8's English rules, and a cache per
distinct chunk, so words repeat at dictionary speed. It gave spaCy's words and sentence counts on
all 55,000 documents of the curation benchmark corpus and on 50,000 random strings of
punctuation, quotes, dots, URLs and emoticons. Where it can still differ: letters and symbols
outside Latin, Greek and Cyrillic and spaCy's listed scripts (derived here from Unicode
categories, spaCy enumerates them), URLs over 2,000 characters (not looked for), and affixes
longer than 14 characters other than runs of dots (none exist in spaCy's English rules).

This file is long because spaCy's rules are data (its exception list, its character classes):
they are copied here once, beside the few functions that apply them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import cache
from itertools import chain

# ---------------------------------------------------------------------------------------------
# Character sets, as spaCy (lang/char_classes.py) defines them.

# Unicode's Sentence_Terminal characters: datatrove's TERMINAL_PUNCTUATION (FineWeb's stop_chars).
TERMINAL_PUNCTUATION = frozenset(
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964"
    "\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803"
    "\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c"
    "\u1c7e\u1c7f\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f"
    "\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb"
    "\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57\U00010f55\U00010f56\U00010f57"
    "\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011047\U00011048\U000110be"
    "\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd"
    "\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c"
    "\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf"
    "\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641"
    "\U00011642\U0001173c\U0001173d\U0001173e\U00011944\U00011946\U00011a42\U00011a43\U00011a9b"
    "\U00011a9c\U00011c41\U00011c42\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f"
    "\U00016af5\U00016b37\U00016b38\U00016b44\U00016e98\U0001bc9f\U0001da88"
)
# spaCy's Sentencizer.default_punct_chars: the terminal set of an older Unicode, without these.
_SENTENCIZER_PUNCT = TERMINAL_PUNCTUATION - frozenset(
    "\u061d\u061e\u0837\u0839\u083d\u083e\u17d4\u17d5\u17d6\u17d9\u17da\u1b7d\u1b7e\u2e53\u2e54"
    "\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89"
    "\U00011944\U00011946\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016e98"
)

# spaCy's lists (lang/char_classes.py), space-separated regex pieces, copied verbatim.
_PUNCT = (
    r"… …… , : ; \! \? ¿ ؟ ¡ \( \) \[ \] \{ \} < > _ # \* & 。 ？ ！ ， 、 ； ： ～ · । ، ۔ ؛ ٪"
)
_QUOTES = r"\' \" ” “ ` ‘ ´ ’ ‚ , „ » « 「 」 『 』 （ ） 〔 〕 【 】 《 》 〈 〉 〈 〉  ⟦ ⟧"
_HYPHENS = "- – — -- --- —— ~"
_CURRENCY = (
    r"\$ £ € ¥ ฿ US\$ C\$ A\$ ₽ ﷼ ₴ ₠ ₡ ₢ ₣ ₤ ₥ ₦ ₧ ₨ ₩ ₪ ₫ € ₭ ₮ ₯ ₰ ₱ ₲ ₳ ₴ ₵ ₶ ₷ ₸ ₹ ₺ ₻ ₼ ₽ ₾ ₿"
)
_UNITS = (
    "km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s"
    " km/h kmh mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K % км км² км³ м м² м³ дм дм² дм³ см"
    " см² см³ мм мм² мм³ нм кг г мг м/с км/ч кПа Па мбар Кб КБ кб Мб МБ мб Гб ГБ гб Тб ТБ тбكم"
    " كم² كم³ م م² م³ سم سم² سم³ مم مم² مم³ كم غرام جرام جم كغ ملغ كوب اكواب"
)


# Letters spaCy's rules treat as uncased (lang/char_classes.py: Ethiopic, Bengali, Hebrew, Persian,
# Sinhala, Hindi, Kannada, Tamil, Telugu, Hangul, Kana, and CJK with its punctuation blocks): they
# count as lower and as upper case.
_UNCASED = (
    r"\u1200-\u137F\u0980-\u09FF\u0591-\u05F4\uFB1D-\uFB4F\u0620-\u064A\u066E-\u06D5\u06E5-\u06FF"
    r"\u0750-\u077F\u08A0-\u08BD\uFB50-\uFBB1\uFBD3-\uFD3D\uFD50-\uFDC7\uFDF0-\uFDFB\uFE70-\uFEFC"
    r"\U0001EE00-\U0001EEBB\u0D80-\u0DFF\u0900-\u097F\u0C80-\u0CFF\u0B80-\u0BFF\u0C00-\u0C7F"
    r"\uAC00-\uD7AF\u1100-\u11FF\u3040-\u309F\u30A0-\u30FF\u4E00-\u9FFF\u3400-\u4DBF"
    r"\U00020000-\U0002EBEF\u2E80-\u2EFF\u2F00-\u2FDF\u2FF0-\u2FFF\u3000-\u303F\u31C0-\u31EF"
    r"\u3200-\u33FF\uF900-\uFAFF\uFE30-\uFE4F\U0001F200-\U0001F2FF\U0002F800-\U0002FA1F"
)
# Cased letters: spaCy lists those of Latin (with its extensions and phonetic letters), Greek and
# Cyrillic; here, the letters of those blocks by Unicode category.
_CASED_BLOCKS = (
    (0x0041, 0x024F),
    (0x0250, 0x02AF),
    (0x0370, 0x03FF),
    (0x0400, 0x04FF),
    (0x1D00, 0x1D9A),
    (0x1E00, 0x1EFF),
    (0x2C60, 0x2C7F),
    (0xA722, 0xA7FA),
    (0xAB30, 0xAB64),
    (0xFF21, 0xFF5A),
)


def _cased_class(categories: frozenset[str]) -> str:
    """A regex character-class body of the letters of _CASED_BLOCKS in the given categories."""
    chars = [
        chr(cp)
        for low, high in _CASED_BLOCKS
        for cp in range(low, high + 1)
        if unicodedata.category(chr(cp)) in categories and cp != 0xB5  # spaCy leaves out µ
    ]
    return "".join(re.escape(ch) for ch in chars)


def _symbol_class() -> str:
    """spaCy's ICONS: 'other symbols' (So), here by category, in the BMP and the emoji planes."""
    parts = []
    for low, high in ((0, 0xFFFF), (0x1F000, 0x1FAFF)):
        run_start = None
        for cp in range(low, high + 2):
            inside = cp <= high and unicodedata.category(chr(cp)) == "So"
            if inside and run_start is None:
                run_start = cp
            elif not inside and run_start is not None:
                parts.append(f"{re.escape(chr(run_start))}-{re.escape(chr(cp - 1))}")
                run_start = None
    return "".join(parts)


_LOWER = _cased_class(frozenset({"Ll"}))
_UPPER = _cased_class(frozenset({"Lu", "Lt"}))
_ALPHA = _LOWER + _UPPER + _UNCASED
_ALPHA_LOWER = _LOWER + _UNCASED
_ALPHA_UPPER = _UPPER + _UNCASED
_ICONS = _symbol_class()


def _split(pieces: str) -> list[str]:
    return pieces.strip().split(" ")


def _merge(pieces: str) -> str:
    return pieces.strip().replace(" ", "|")


def _group(pieces: str) -> str:
    return pieces.strip().replace(" ", "")


_LIST_ELLIPSES = [r"\.\.+", "…"]
_LIST_ICONS = [f"[{_ICONS}]"]
_CONCAT_QUOTES = _group(_QUOTES)

_PREFIXES = (
    ["§", "%", "=", "—", "–", r"\+(?![0-9])"]
    + _split(_PUNCT)
    + _LIST_ELLIPSES
    + _split(_QUOTES)
    + _split(_CURRENCY)
    + _LIST_ICONS
)
_SUFFIXES = (
    _split(_PUNCT)
    + _LIST_ELLIPSES
    + _split(_QUOTES)
    + _LIST_ICONS
    + ["'s", "'S", "’s", "’S", "—", "–"]
    + [
        r"(?<=[0-9])\+",
        r"(?<=°[FfCcKk])\.",
        rf"(?<=[0-9])(?:{_merge(_CURRENCY)})",
        rf"(?<=[0-9])(?:{_merge(_UNITS)})",
        rf"(?<=[0-9{_ALPHA_LOWER}%²\-\+{_merge(_PUNCT)}(?:{_CONCAT_QUOTES})])\.",
        rf"(?<=[{_ALPHA_UPPER}][{_ALPHA_UPPER}])\.",
    ]
)
_INFIXES = (
    _LIST_ELLIPSES
    + _LIST_ICONS
    + [
        r"(?<=[0-9])[+\-\*^](?=[0-9-])",
        rf"(?<=[{_ALPHA_LOWER}{_CONCAT_QUOTES}])\.(?=[{_ALPHA_UPPER}{_CONCAT_QUOTES}])",
        rf"(?<=[{_ALPHA}]),(?=[{_ALPHA}])",
        rf"(?<=[{_ALPHA}0-9])(?:{_merge(_HYPHENS)})(?=[{_ALPHA}])",
        rf"(?<=[{_ALPHA}0-9])[:<>=/](?=[{_ALPHA}])",
    ]
)
_PREFIX_RE = re.compile("|".join("^" + p for p in _PREFIXES if p.strip()))
_SUFFIX_RE = re.compile("|".join(p + "$" for p in _SUFFIXES if p.strip()))
_INFIX_RE = re.compile("|".join(p for p in _INFIXES if p.strip()))
# spaCy's URL_MATCH (lang/tokenizer_exceptions.py, after Diego Perini's MIT-licensed regex).
_URL_RE = re.compile(
    r"(?u)^(?:(?:[\w\+\-\.]{2,})://)?(?:\S+(?::\S*)?@)?(?:"
    r"(?!(?:10|127)(?:\.\d{1,3}){3})(?!(?:169\.254|192\.168)(?:\.\d{1,3}){2})"
    r"(?!172\.(?:1[6-9]|2\d|3[0-1])(?:\.\d{1,3}){2})"
    r"(?:[1-9]\d?|1\d\d|2[01]\d|22[0-3])(?:\.(?:1?\d{1,2}|2[0-4]\d|25[0-5])){2}"
    r"(?:\.(?:[1-9]\d?|1\d\d|2[0-4]\d|25[0-4]))|"
    r"(?:(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]{0,62})?[A-Za-z0-9\u00a1-\uffff]\.)+"
    rf"(?:[{_ALPHA_LOWER}]{{2,63}}))(?::\d{{2,5}})?(?:[/?#]\S*)?$"
)
# Affixes are short except runs of dots: looking at a window of a chunk's ends keeps affix
# splitting linear on a pathological 100k-character "word" (spaCy's own loop is quadratic there).
_AFFIX_WINDOW = 16
# A URL longer than this is not looked for (spaCy's URL regex can backtrack quadratically).
_MAX_URL_CHARS = 2_000

# spaCy 3.8's English tokenizer exceptions (lang/tokenizer_exceptions.py, lang/en/, MIT licence):
# each entry is one special case, "~" marks where spaCy splits it. Every entry with an ASCII
# apostrophe also exists with "’" (spaCy adds those variants the same way).
_SPECIAL_CASES = (
    "' '' 'Cause 'Cos 'Coz 'Cuz 'S 'bout 'cause 'cos 'coz 'cuz 'd 'em 'll 'nuff 're 's "
    "(*_*) (-8 (-: (-; (-_-) (._.) (: (; (= (>_<) (^_^) (o: (¬_¬) (ಠ_ಠ) (╯°□°）╯︵┻━┻ )-: ): "
    "-_- -__- ._. 0.0 0.o 0_0 0_o 10~a.m. 10~am 10~p.m. 10~pm 11~a.m. 11~am 11~p.m. 11~pm "
    "12~a.m. 12~am 12~p.m. 12~pm 1~a.m. 1~am 1~p.m. 1~pm 2~a.m. 2~am 2~p.m. 2~pm 3~a.m. "
    "3~am 3~p.m. 3~pm 4~a.m. 4~am 4~p.m. 4~pm 5~a.m. 5~am 5~p.m. 5~pm 6~a.m. 6~am 6~p.m. "
    "6~pm 7~a.m. 7~am 7~p.m. 7~pm 8) 8-) 8-D 8D 8~a.m. 8~am 8~p.m. 8~pm 9~a.m. 9~am 9~p.m. "
    "9~pm :'( :') :'-( :'-) :( :(( :((( :() :) :)) :))) :* :-( :-(( :-((( :-) :-)) :-))) "
    ":-* :-/ :-0 :-3 :-> :-D :-O :-P :-X :-] :-o :-p :-x :-| :-} :/ :0 :1 :3 :> :D :O :P "
    ":X :] :o :o) :p :x :| :} ;) ;-) ;-D ;D ;_; <.< </3 <3 <33 <333 <space> =( =) =/ =3 =D "
    "=[ =] =| >.< >.> >:( >:o ><(((*> @_@ Adm. Ai~n't Ai~nt Ak. Ala. Apr. Are~n't Are~nt "
    "Ariz. Ark. Aug. Bros. C'm~on C++ Calif. Can~not Ca~n't Ca~n't~'ve Ca~nt Ca~nt~ve Co. "
    "Colo. Conn. Corp. Could~'ve Could~n't Could~n't~'ve Could~nt Could~nt~ve Could~ve "
    "D.C. Dare~n't Dare~nt Dec. Del. Did~n't Did~n't~'ve Did~nt Did~nt~ve Does~n't "
    "Does~n't~'ve Does~nt Does~nt~ve Doin Doin' Do~n't Do~n't~'ve Do~nt Do~nt~ve Dr. E.G. "
    "E.g. Feb. Fla. Ga. Gen. Goin Goin' Gon~na Got~ta Gov. Had~n't Had~n't~'ve Had~nt "
    "Had~nt~ve Has~n't Has~nt Have~n't Have~nt Havin Havin' He~'d He~'d~'ve He~'ll "
    "He~'ll~'ve He~'s He~d He~d~ve He~ll~ve He~s How~'d How~'d~'ve How~'d~'y How~'ll "
    "How~'ll~'ve How~'re How~'s How~'ve How~d How~d~ve How~ll How~ll~ve How~re How~s "
    "How~ve I.E. I.e. Ia. Id. Ill. Inc. Ind. Is~n't Is~nt It~'d It~'d~'ve It~'ll "
    "It~'ll~'ve It~'s It~d It~d~ve It~ll It~ll~ve I~'d I~'d~'ve I~'ll I~'ll~'ve I~'m "
    "I~'m~a I~'ve I~d I~d~ve I~ll~ve I~m I~m~a I~ve Jan. Jr. Jul. Jun. Kan. Kans. Ky. La. "
    "Let~'s Lovin Lovin' Ltd. Ma'am Mar. Mass. May~n't May~n't~'ve May~nt May~nt~ve Md. "
    "Messrs. Mich. Might~'ve Might~n't Might~n't~'ve Might~nt Might~nt~ve Might~ve Minn. "
    "Miss. Mo. Mont. Mr. Mrs. Ms. Mt. Must~'ve Must~n't Must~n't~'ve Must~nt Must~nt~ve "
    "Must~ve N.C. N.D. N.H. N.J. N.M. N.Y. Neb. Nebr. Need~n't Need~n't~'ve Need~nt "
    "Need~nt~ve Nev. Nothin Nothin' Not~'ve Not~ve Nov. Nuthin Nuthin' O'clock O.O O.o O_O "
    "O_o Oct. Okla. Ol Ol' Ore. Ought~n't Ought~n't~'ve Ought~nt Ought~nt~ve Pa. Ph.D. "
    "Prof. Rep. Rev. S.C. Sen. Sep. Sept. Sha~n't Sha~n't~'ve Sha~nt Sha~nt~ve She~'d "
    "She~'d~'ve She~'ll She~'ll~'ve She~'s She~d~ve She~ll~ve She~s Should~'ve Should~n't "
    "Should~n't~'ve Should~nt Should~nt~ve Should~ve Somethin Somethin' St. Tenn. That~'d "
    "That~'d~'ve That~'ll That~'ll~'ve That~'s That~d That~d~ve That~ll That~ll~ve That~s "
    "There~'d There~'d~'ve There~'ll There~'ll~'ve There~'re There~'s There~'ve There~d "
    "There~d~ve There~ll There~ll~ve There~re There~s There~ve These~'d These~'d~'ve "
    "These~'ll These~'ll~'ve These~'re These~'ve These~d These~d~ve These~ll These~ll~ve "
    "These~re These~ve They~'d They~'d~'ve They~'ll They~'ll~'ve They~'re They~'ve They~d "
    "They~d~ve They~ll They~ll~ve They~re They~ve This~'d This~'d~'ve This~'ll "
    "This~'ll~'ve This~'s This~d This~d~ve This~ll This~ll~ve This~s Those~'d Those~'d~'ve "
    "Those~'ll Those~'ll~'ve Those~'re Those~'ve Those~d Those~d~ve Those~ll Those~ll~ve "
    "Those~re Those~ve V.V V_V Va. Wash. Was~n't Was~nt Were~n't Were~nt We~'d We~'d~'ve "
    "We~'ll We~'ll~'ve We~'re We~'ve We~d We~d~ve We~ll~ve We~ve What~'d What~'d~'ve "
    "What~'ll What~'ll~'ve What~'re What~'s What~'ve What~d What~d~ve What~ll What~ll~ve "
    "What~re What~s What~ve When~'d When~'d~'ve When~'ll When~'ll~'ve When~'re When~'s "
    "When~'ve When~d When~d~ve When~ll When~ll~ve When~re When~s When~ve Where~'d "
    "Where~'d~'ve Where~'ll Where~'ll~'ve Where~'re Where~'s Where~'ve Where~d Where~d~ve "
    "Where~ll Where~ll~ve Where~re Where~s Where~ve Who~'d Who~'d~'ve Who~'ll Who~'ll~'ve "
    "Who~'re Who~'s Who~'ve Who~d Who~d~ve Who~ll Who~ll~ve Who~s Who~ve Why~'d Why~'d~'ve "
    "Why~'ll Why~'ll~'ve Why~'re Why~'s Why~'ve Why~d Why~d~ve Why~ll Why~ll~ve Why~re "
    "Why~s Why~ve Wis. Would~'ve Would~n't Would~n't~'ve Would~nt Would~nt~ve Would~ve "
    "Wo~n't Wo~n't~'ve Wo~nt Wo~nt~ve XD XDD You~'d You~'d~'ve You~'ll You~'ll~'ve You~'re "
    "You~'ve You~d You~d~ve You~ll You~ll~ve You~re You~ve [-: [: [= \\\") \\n \\t ]= ^_^ ^__^ "
    "^___^ a. a.m. ai~n't ai~nt and/or are~n't are~nt b. c'm~on c. can~not ca~n't "
    "ca~n't~'ve ca~nt ca~nt~ve co. could~'ve could~n't could~n't~'ve could~nt could~nt~ve "
    "could~ve d. dare~n't dare~nt did~n't did~n't~'ve did~nt did~nt~ve does~n't "
    "does~n't~'ve does~nt does~nt~ve doin doin' do~n't do~n't~'ve do~nt do~nt~ve e. e.g. "
    "em f. g. goin goin' gon~na got~ta h. had~n't had~n't~'ve had~nt had~nt~ve has~n't "
    "has~nt have~n't have~nt havin havin' he~'d he~'d~'ve he~'ll he~'ll~'ve he~'s he~d "
    "he~d~ve he~ll~ve he~s how~'d how~'d~'ve how~'d~'y how~'ll how~'ll~'ve how~'re how~'s "
    "how~'ve how~d how~d~ve how~ll how~ll~ve how~re how~s how~ve i. i.e. is~n't is~nt "
    "it~'d it~'d~'ve it~'ll it~'ll~'ve it~'s it~d it~d~ve it~ll it~ll~ve i~'d i~'d~'ve "
    "i~'ll i~'ll~'ve i~'m i~'m~a i~'ve i~d i~d~ve i~ll~ve i~m i~m~a i~ve j. k. l. let~'s "
    "ll lovin lovin' m. ma'am may~n't may~n't~'ve may~nt may~nt~ve might~'ve might~n't "
    "might~n't~'ve might~nt might~nt~ve might~ve must~'ve must~n't must~n't~'ve must~nt "
    "must~nt~ve must~ve n. need~n't need~n't~'ve need~nt need~nt~ve nothin nothin' not~'ve "
    "not~ve nuff nuthin nuthin' o'clock o. o.0 o.O o.o o_0 o_O o_o ol ol' ought~n't "
    "ought~n't~'ve ought~nt ought~nt~ve p. p.m. q. r. s. sha~n't sha~n't~'ve sha~nt "
    "sha~nt~ve she~'d she~'d~'ve she~'ll she~'ll~'ve she~'s she~d~ve she~ll~ve she~s "
    "should~'ve should~n't should~n't~'ve should~nt should~nt~ve should~ve somethin "
    "somethin' t. that~'d that~'d~'ve that~'ll that~'ll~'ve that~'s that~d that~d~ve "
    "that~ll that~ll~ve that~s there~'d there~'d~'ve there~'ll there~'ll~'ve there~'re "
    "there~'s there~'ve there~d there~d~ve there~ll there~ll~ve there~re there~s there~ve "
    "these~'d these~'d~'ve these~'ll these~'ll~'ve these~'re these~'ve these~d these~d~ve "
    "these~ll these~ll~ve these~re these~ve they~'d they~'d~'ve they~'ll they~'ll~'ve "
    "they~'re they~'ve they~d they~d~ve they~ll they~ll~ve they~re they~ve this~'d "
    "this~'d~'ve this~'ll this~'ll~'ve this~'s this~d this~d~ve this~ll this~ll~ve this~s "
    "those~'d those~'d~'ve those~'ll those~'ll~'ve those~'re those~'ve those~d those~d~ve "
    "those~ll those~ll~ve those~re those~ve u. v. v.s. v.v v_v vs. w. w/o was~n't was~nt "
    "were~n't were~nt we~'d we~'d~'ve we~'ll we~'ll~'ve we~'re we~'ve we~d we~d~ve "
    "we~ll~ve we~ve what~'d what~'d~'ve what~'ll what~'ll~'ve what~'re what~'s what~'ve "
    "what~d what~d~ve what~ll what~ll~ve what~re what~s what~ve when~'d when~'d~'ve "
    "when~'ll when~'ll~'ve when~'re when~'s when~'ve when~d when~d~ve when~ll when~ll~ve "
    "when~re when~s when~ve where~'d where~'d~'ve where~'ll where~'ll~'ve where~'re "
    "where~'s where~'ve where~d where~d~ve where~ll where~ll~ve where~re where~s where~ve "
    "who~'d who~'d~'ve who~'ll who~'ll~'ve who~'re who~'s who~'ve who~d who~d~ve who~ll "
    "who~ll~ve who~s who~ve why~'d why~'d~'ve why~'ll why~'ll~'ve why~'re why~'s why~'ve "
    "why~d why~d~ve why~ll why~ll~ve why~re why~s why~ve would~'ve would~n't would~n't~'ve "
    "would~nt would~nt~ve would~ve wo~n't wo~n't~'ve wo~nt wo~nt~ve x. xD xDD y'~all y. "
    "you~'d you~'d~'ve you~'ll you~'ll~'ve you~'re you~'ve you~d you~d~ve you~ll you~ll~ve "
    "you~re you~ve y~all z. ¯\\(ツ)/¯ °~C~. °~F~. °~K~. °~c~. °~f~. °~k~. ä. ö. ü. ಠ_ಠ ಠ︵ಠ — "
    "‘S ‘s "
)


def _special_cases() -> dict[str, tuple[str, ...]]:
    cases: dict[str, tuple[str, ...]] = {}
    for entry in _SPECIAL_CASES.split():
        pieces = tuple(entry.split("~"))
        cases["".join(pieces)] = pieces
        if "'" in entry:
            curly = tuple(p.replace("'", "’") for p in pieces)
            cases["".join(curly)] = curly
    return cases


_SPECIALS = _special_cases()
_MAX_SPECIAL = max(map(len, _SPECIALS))


# ---------------------------------------------------------------------------------------------
# Words: spaCy's English tokenizer, re-implemented.


def _is_special(s: str, start: int, end: int) -> bool:
    return 0 < end - start <= _MAX_SPECIAL and s[start:end] in _SPECIALS


def _prefix_len(s: str, start: int, end: int) -> int:
    """Length of spaCy's prefix of ``s[start:end]`` (0 if none), looking at a short window."""
    window = s[start : min(end, start + _AFFIX_WINDOW)]
    m = _PREFIX_RE.search(window)
    if m is None:
        return 0
    if m.end() == len(window) and start + len(window) < end:
        m = _PREFIX_RE.search(s[start:end])  # a run of dots, or a lookahead past the window
        if m is None:
            return 0
    return m.end() - m.start()


def _suffix_len(s: str, start: int, end: int) -> int:
    """Length of spaCy's suffix of ``s[start:end]`` (0 if none), looking at a short window.

    Every suffix rule but runs of dots matches at most a few characters after a lookbehind of at
    most two, so a match starting past the window's first two characters is the one a search of
    the whole string finds; anything else is searched again on the whole string.
    """
    window_start = max(start, end - _AFFIX_WINDOW)
    window = s[window_start:end]
    m = _SUFFIX_RE.search(window)
    if m is not None and window_start > start and m.start() < 2:
        m = _SUFFIX_RE.search(s[start:end])
        return end - start - m.start() if m else 0
    return len(window) - m.start() if m else 0


def _split_affixes(chunk: str) -> tuple[list[str], str, list[str]]:
    """spaCy's Tokenizer._split_affixes: peel prefixes and suffixes until a special case or none.

    Works on offsets, not slices, so a 100k-character run of brackets stays linear.
    """
    prefixes: list[str] = []
    suffixes: list[str] = []
    start, end = 0, len(chunk)
    last = -1
    while start < end and end - start != last:
        if _is_special(chunk, start, end):
            break
        last = end - start
        pre_len = _prefix_len(chunk, start, end)
        if pre_len and _is_special(chunk, start + pre_len, end):
            prefixes.append(chunk[start : start + pre_len])
            start += pre_len
            break
        suf_len = _suffix_len(chunk, start + pre_len, end)
        if suf_len and _is_special(chunk, start, end - suf_len):
            suffixes.append(chunk[end - suf_len : end])
            end -= suf_len
            break
        if pre_len and suf_len and pre_len + suf_len <= end - start:
            prefixes.append(chunk[start : start + pre_len])
            suffixes.append(chunk[end - suf_len : end])
            start, end = start + pre_len, end - suf_len
        elif pre_len:
            prefixes.append(chunk[start : start + pre_len])
            start += pre_len
        elif suf_len:
            suffixes.append(chunk[end - suf_len : end])
            end -= suf_len
    return prefixes, chunk[start:end], suffixes


def _split_infixes(s: str) -> list[str]:
    matches = list(_INFIX_RE.finditer(s))
    if not matches:
        return [s]
    tokens: list[str] = []
    start = 0
    for m in matches:
        if m.start() == 0:
            continue
        if m.start() != start:
            tokens.append(s[start : m.start()])
        if m.start() != m.end():
            tokens.append(s[m.start() : m.end()])
        start = m.end()
    if s[start:]:
        tokens.append(s[start:])
    return tokens


def _tokenize_affixes(chunk: str, specials: bool) -> list[str]:
    """spaCy's _tokenize for one whitespace-free chunk, with or without its special cases."""
    if specials and chunk in _SPECIALS:
        return list(_SPECIALS[chunk])
    if specials:
        prefixes, core, suffixes = _split_affixes(chunk)
    else:
        prefixes, core, suffixes = _split_affixes_plain(chunk)
    tokens = prefixes
    if core:
        if specials and core in _SPECIALS:
            tokens.extend(_SPECIALS[core])
        elif len(core) <= _MAX_URL_CHARS and _URL_RE.match(core):
            tokens.append(core)
        else:
            tokens.extend(_split_infixes(core))
    tokens.extend(reversed(suffixes))
    return tokens


def _split_affixes_plain(s: str) -> tuple[list[str], str, list[str]]:
    """Affix splitting with no special cases (how spaCy builds its special-case phrase patterns)."""
    prefixes: list[str] = []
    suffixes: list[str] = []
    last = -1
    while s and len(s) != last:
        last = len(s)
        m = _PREFIX_RE.search(s)
        pre_len = m.end() - m.start() if m else 0
        suf_len = _suffix_len(s, pre_len, len(s))
        if pre_len and suf_len and pre_len + suf_len <= len(s):
            prefixes.append(s[:pre_len])
            suffixes.append(s[-suf_len:])
            s = s[pre_len:-suf_len]
        elif pre_len:
            prefixes.append(s[:pre_len])
            s = s[pre_len:]
        elif suf_len:
            suffixes.append(s[-suf_len:])
            s = s[:-suf_len]
    return prefixes, s, suffixes


@cache
def _special_patterns() -> dict[str, list[tuple[tuple[str, ...], str]]]:
    """Special cases spaCy also finds after splitting (e.g. ":)" in "word:)"), by first token."""
    patterns: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for key in _SPECIALS:
        pieces = tuple(_tokenize_affixes(key, specials=False))
        if len(pieces) > 1 or pieces != (key,):
            patterns.setdefault(pieces[0], []).append((pieces, key))
    return patterns


def _special_matches(tokens: Sequence[str | None]) -> list[tuple[int, int]]:
    """Spans where spaCy's special-case phrase matcher keeps a match (``None``: a whitespace
    token). spaCy takes the longest first, then the leftmost, and drops a match whose first or
    last token an earlier candidate covered, kept or not."""
    patterns = _special_patterns()
    found = []
    for i, tok in enumerate(tokens):
        for pieces, _key in patterns.get(tok, ()) if tok is not None else ():
            if tuple(tokens[i : i + len(pieces)]) == pieces:
                found.append((i, i + len(pieces)))
    found.sort(key=lambda m: (m[0] - m[1], m[0]))
    seen: set[int] = set()
    kept = []
    for start, end in found:
        if start not in seen and end - 1 not in seen:
            kept.append((start, end))
        seen.update(range(start, end))
    return sorted(kept)


class _ChunkCache(dict[str, tuple[str, ...]]):
    """Tokens of each distinct whitespace-free chunk, computed once per process.

    Chunks whose tokens spaCy's special-case matcher would merge (``word:)`` -> ``word``, ``:)``)
    are also remembered unmerged in ``unmerged``: a match that reaches across a single space into
    the next chunk can block such a merge, so documents holding one are matched as a whole.
    """

    MAX_ENTRIES = 200_000

    def __init__(self) -> None:
        super().__init__()
        self.unmerged: dict[str, tuple[str, ...]] = {}

    def __missing__(self, chunk: str) -> tuple[str, ...]:
        tokens = tuple(_tokenize_affixes(chunk, specials=True))
        if len(self.unmerged) >= self.MAX_ENTRIES:
            self.unmerged.clear()  # (with the merged chunks, so none is left unchecked)
            self.clear()
        elif len(self) >= self.MAX_ENTRIES:
            self.clear()  # ``unmerged`` stays: it is small, and its entries stay true
        if len(tokens) > 1 and (matches := _special_matches(tokens)):
            merged = _merge_matches(tokens, matches)
            if merged != tokens:
                self.unmerged[chunk] = tokens
                tokens = merged
        self[chunk] = tokens
        return tokens


def _merge_matches(tokens: Sequence[str], matches: list[tuple[int, int]]) -> tuple[str, ...]:
    out: list[str] = []
    position = 0
    for start, end in matches:
        out.extend(tokens[position:start])
        out.extend(_SPECIALS["".join(tokens[start:end])])
        position = end
    out.extend(tokens[position:])
    return tuple(out)


_CHUNKS = _ChunkCache()
_CHUNK_RE = re.compile(r"\S+")
SPACE = " "  # stands for a whitespace token in token lists


def _matched_tokens(text: str) -> list[str]:
    """spaCy's tokens of a text holding a chunk its matcher merges: the matcher runs over the
    whole token sequence. Runs of whitespace other than one space are tokens (``SPACE``); a
    match across a single space merges nothing (its text has a space) but blocks others."""
    sequence: list[str | None] = []
    owner: list[int] = []
    position = 0
    for index, m in enumerate(_CHUNK_RE.finditer(text)):
        gap = text[position : m.start()]
        if gap and (index == 0 or gap != " "):
            sequence.append(None)
            owner.append(-1)
        chunk = m.group()
        pieces = _CHUNKS[chunk]
        pieces = _CHUNKS.unmerged.get(chunk, pieces)
        sequence.extend(pieces)
        owner.extend([index] * len(pieces))
        position = m.end()
    if text[position:] not in ("", " "):
        sequence.append(None)
        owner.append(-1)
    merges = [(a, b) for a, b in _special_matches(sequence) if owner[a] == owner[b - 1]]
    out: list[str] = []
    position = 0
    for start, end in merges:
        out.extend(SPACE if t is None else t for t in sequence[position:start])
        out.extend(_SPECIALS["".join(t or "" for t in sequence[start:end])])
        position = end
    out.extend(SPACE if t is None else t for t in sequence[position:])
    return out


class TokenProperty(dict[str, int]):
    """One property of each distinct token, measured on first sight.

    Rules sum a property over a document's tokens with ``map(prop.__getitem__, tokens)``, at C
    speed. The caches here are shared by the threads of a process: they are only ever added to
    or cleared whole, and a lookup that misses measures again, so no thread sees a stale value.
    """

    MAX_ENTRIES = 200_000

    def __init__(self, measure: Callable[[str], int]) -> None:
        super().__init__()
        self.measure = measure

    def __missing__(self, token: str) -> int:
        if len(self) >= self.MAX_ENTRIES:
            self.clear()
        value = self[token] = self.measure(token)
        return value


def _sentence_role(token: str) -> int:
    """For the sentencizer: 2 ends a sentence, 1 is other punctuation (spaCy is_punct), else 0."""
    if token in _SENTENCIZER_PUNCT:
        return 2
    return int(all(unicodedata.category(ch).startswith("P") for ch in token))


_SENTENCE_ROLE = TokenProperty(_sentence_role)


def _crosses_chunks(chunks: list[str]) -> bool:
    """Whether a special-case match could reach across a space into a chunk the matcher merges.

    Such a match needs the last token of one chunk inside a pattern and the first token of the
    next one after its start; where no merged chunk has such a neighbour, the chunk-by-chunk
    tokens are spaCy's.
    """
    unmerged = _CHUNKS.unmerged
    inner_last, inner_first = _pattern_edges()
    for i, chunk in enumerate(chunks):
        tokens = unmerged.get(chunk)
        if tokens is None:
            continue
        if i > 0:
            before = unmerged.get(chunks[i - 1]) or _CHUNKS[chunks[i - 1]]
            if before[-1] in inner_last and tokens[0] in inner_first:
                return True
        if i + 1 < len(chunks):
            after = unmerged.get(chunks[i + 1]) or _CHUNKS[chunks[i + 1]]
            if tokens[-1] in inner_last and after[0] in inner_first:
                return True
    return False


@cache
def _pattern_edges() -> tuple[frozenset[str], frozenset[str]]:
    """Tokens found before the last / after the first position of a special-case pattern."""
    patterns = [p for group in _special_patterns().values() for p, _ in group]
    return (
        frozenset(t for p in patterns for t in p[:-1]),
        frozenset(t for p in patterns for t in p[1:]),
    )


def _chunk_tokens(text: str, chunks: list[str], regular: bool = True) -> list[str]:
    """spaCy's tokens of a text split into whitespace-free chunks; ``SPACE`` marks whitespace
    tokens when the text's spacing is not ``regular`` (single spaces only)."""
    tokens = list(chain.from_iterable(map(_CHUNKS.__getitem__, chunks)))  # fills the cache
    if regular and (
        not _CHUNKS.unmerged
        or _CHUNKS.unmerged.keys().isdisjoint(chunks)
        or not _crosses_chunks(chunks)
    ):
        return tokens
    return _matched_tokens(text)


def split_words(text: str) -> list[str]:
    """Words as datatrove's ``split_into_words(text, "eng")`` gives them: spaCy tokens."""
    tokens = _chunk_tokens(text, text.split())
    return [t for t in tokens if t is not SPACE] if SPACE in tokens else tokens


def line_tokens(line: str) -> list[str]:
    """spaCy's tokens of one stripped line, with ``SPACE`` for its whitespace tokens (runs of
    whitespace other than one space)."""
    chunks = line.split()
    regular = line.count(" ") == len(chunks) - 1 == len(line) - sum(map(len, chunks))
    return _chunk_tokens(line, chunks, regular)


def count_sentences(tokens: list[str]) -> int:
    """Sentences spaCy's sentencizer finds in one line's tokens (C4's min_num_sentences).

    A sentence starts at a token that is neither punctuation nor a sentence-ending character,
    after a sentence-ending character was seen. Whitespace tokens are such tokens.
    """
    sentences = 1
    seen_end = False
    for kind in map(_SENTENCE_ROLE.__getitem__, tokens):
        if kind == 2:
            seen_end = True
        elif seen_end and not kind:
            sentences += 1
            seen_end = False
    return sentences
