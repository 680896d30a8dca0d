"""coco-caption's tokenisation of captions: the Stanford PTBTokenizer 3.4.1 (Java) and an exact Python copy.

Every coco-caption metric scores tokenised captions: ``PTBTokenizer -preserveLines -lowerCase``, then the
wrapper's punctuation removal. :func:`java_ptb_tokenize` runs the real jar (one Java call for a whole set, as
the full metric suite does); :func:`ptb_tokenize` reproduces it in Python, so per-epoch validation scores need
no Java and equal the full suite's (tests/test_metrics.py checks the two agree on real and perturbed captions).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from pycocoevalcap.tokenizer import ptbtokenizer as _ptb

# The tokens coco-caption's PTBTokenizer wrapper drops after tokenising (pycocoevalcap/tokenizer/
# ptbtokenizer.py). It compares them with the *lower-cased* tokens, so "-LRB-" never matches "-lrb-" and
# brackets survive as "-lrb-": we keep that quirk, since it is what the published numbers used.
PUNCTUATIONS = frozenset(_ptb.PUNCTUATIONS)


# ============================================================================ the Python PTB tokenizer
# A longest-match lexer in the style of Stanford's JFlex PTBLexer (the 3.4.1 jar coco-caption ships, run
# with -preserveLines -lowerCase): at each position every rule is tried, the longest match wins (trailing
# context `lookahead` counts towards the length, as in JFlex), ties go to the earlier rule. Only the rules
# that caption text can hit are reproduced (words, clitics, apostrophes, hyphens, numbers, abbreviations,
# quotes, brackets, dots, dashes, symbols). Checked equal to the Java tokenizer (tests/test_metrics.py) on all
# 4955 real Flickr8k captions, their normalised forms, ~10k perturbed captions (punctuation glued to words,
# capitals, hyphens, quotes, clitics), random decoder-like strings with stray apostrophes, and every listed
# abbreviation. Known gaps, all outside caption text: smileys (";)"), e-mails, URLs, phone numbers, SGML with
# attributes; and one cross-caption effect: Java lexes all captions as one text, so a caption ending in a
# single letter plus period ("... letter x.") keeps "x." here but becomes "x" in Java when the next caption
# starts with "A"/"The"/... (an abbreviation's extra "." is punctuation and is dropped either way).
_L = r"[^\W\d_]"                    # a letter ([:letter:])
_AN = r"[^\W_]"                     # a letter or a digit
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = r"(?:['\u0092\u2019\u0091\u2018\u201B]|&apos;)"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_SPACENL = r"[ \t\u00A0\u2000-\u200A\u3000\r\n\u2028\u2029\u000B\u000C\u0085]"
_WORD = rf"{_L}(?:{_L}|\d)*(?:[.!?]{_L}(?:{_L}|\d)*)*"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
# Words with an inner or outer apostrophe that stay whole (one alternative each, so the longest wins).
_APOWORDS = [rf"{_APOS}(?i:n){_APOS}?", rf"[lLdDjJ]{_APOS}", rf"(?i:dunkin|somethin|ol){_APOS}",
             rf"{_APOS}(?i:em)", rf"[A-HJ-XZn]{_APOSETC}{_L}{{2}}{_L}*", rf"{_APOS}[2-9]0(?i:s)", rf"{_APOS}(?i:till?)",
             rf"{_L}{_L}*[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*", rf"{_APOS}(?i:cause)",
             r"(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", rf"(?i:o){_APOSETC}(?i:o)"]
_NUM = r"\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+"
_HYPHEN = r"[-_\u058A\u2010\u2011]"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])+"


def _longest_first(words: str) -> str:
    """A caseless alternation of literal words, longest first (Python's `|` takes the first that fits)."""
    return "(?i:" + "|".join(sorted(words.split(), key=len, reverse=True)) + ")"


# Abbreviations keep their period. ABBREV1 ones before an upper-case word also end the sentence ("etc. .").
_ABBREV1 = ("(?:" + _longest_first(
    r"jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri ala ariz calif colo conn "
    r"dak fla ga ind kan kans ky md mich minn mo mont neb nev okla penn tenn va vt wis wisc wyo inc co cos "
    r"corp ltd plc bancorp dept bhd assn univ intl sys ph tel est ext sq ft jr sr bros "
    r"ed\.d ph\.d blvd rd esq etc al seq")  # and the ones whose capital letter is case-sensitive ([D]el):
    + r"|(?i:pp?t)y(?i:s)?|[D](?i:el)|[L](?i:a)|[P](?i:a)|[T](?i:ex)|[A](?i:rk)|[I](?i:ll)|[M](?i:ass|iss)"
    + r"|[O](?i:re)|[W](?i:ash))\.")
_ABBREV4 = (rf"(?:{_ACRO}|[A-Za-z]|" + _longest_first(
    r"mr mrs ms dr drs prof profs sen sens rep reps lt col gen messrs gov govs adm rev maj sgt cpl pvt mt "
    r"capt st ste ave pres lieut hon brig cmdr comdr mdr pfc spc supt supts det vs alex wm jos cie a\.k\.a cf "
    r"treas invt elec natl atty attys") + "|(?i:m)[ft](?i:g)|[M](?i:iss))")
_THING = (rf"(?:[dDoOlL]{_APOSETC}{_AN})?{_AN}+(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}{_AN})?{_AN}+)*")
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{_ACRO}\.))+"
_SENTEND = rf"{_SPACENL}(?:{_SPACENL}|[A-Z]|<\/?[A-Za-z!][^>]*>)"
# After an acronym these words (first letter upper case, the rest caseless) mean a sentence ended there.
_ACRO_NEXT = "|".join(f"{w[0]}(?i:{re.escape(w[1:])})" if len(w) > 1 else w for w in sorted((
    "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More Mr. Ms. "
    "Now Once One Other Our She Since So Some Such That The Then There These They This We When While What Yet "
    "You").split(), key=len, reverse=True))
_QUOTES = rf"''|{_APOS}|[`\u2018-\u201F\u0091-\u0094\u2039\u203A\u00AB\u00BB]{{1,2}}"
_MISC = ("[\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u2020-\u2023\u2032-\u2038"
         "\u2100-\u214F\u2190-\u21FF\u2200-\u22FF\u2600-\u26FF]")  # stand-alone symbols: ° × → ∀


def _latex_quote(text: str, left: bool) -> str:
    """PTBLexer's latexQuotes: ' and " become ` and `` when they probably open, ' and '' otherwise."""
    text = re.sub(r"&apos;|'", "`" if left else "'", text)
    text = re.sub(r'"|&quot;', "``" if left else "''", text)
    text = re.sub("[\u0091\u2018\u201B\u2039]", "`", text)
    text = re.sub("[\u0092\u2019\u203A]", "'", text)
    text = re.sub("[\u0093\u201C\u00AB]", "``", text)
    return re.sub("[\u0094\u201D\u00BB]", "''", text)


# (token regex, trailing-context regex or None, action). Actions: None keeps the text, a string replaces it,
# a callable maps it, "" drops it; ("push", n) gives back the last n characters to be lexed again ("cannot" ->
# "can" + "not"); ("dup", 1) emits the text and lexes its final period again ("etc." + "."); ("acronym",) is
# "dup" except that a single letter loses its period ("I. The" -> "I" + ".").
_RULES: list[tuple[str, str | None, object]] = [
    (r"(?i:cannot)", None, ("push", 3)),
    (r"(?i:gonna|gotta|lemme|gimme|wanna)", None, ("push", 2)),
    (rf"{_APOS}(?i:tis)", None, ("push", 2)),
    (rf"{_APOS}(?i:twas)", None, ("push", 3)),
    (r"<\/?[A-Za-z!][^>]*>", None, lambda t: t.replace(" ", "\u00A0")),
    (r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, "--"),
    (r"&amp;", None, "&"),
    (r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", None, None),
    (_WORD, _REDAUX, None),
    (_SWORD, _SREDAUX, None),
    (_WORD, None, None),
    *[(alt, None, None) for alt in _APOWORDS],
    (rf"(?i:y){_APOS}", _L, None),
    (rf"{_REDAUX}", r"[^A-Za-z]", lambda t: _latex_quote(t, False)),
    (r"[@\uFF20][a-zA-Z_][a-zA-Z_0-9]*", None, None),
    (rf"[#\uFF03]{_L}(?:{_L}|\d|_)*(?:{_L}|\d)", None, None),
    (_SREDAUX, None, lambda t: _latex_quote(t, False)),
    (r"\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4}", None, None),
    (rf"[\-+]?(?:{_NUM})", None, None),
    (r"(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", None, lambda t: t.replace(" ", "\u00A0")),
    (r"\u00BC|\u00BD|\u00BE", None, {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4"}.get),
    (r"-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:C\.D\.s|pro-|anti-|S&P-500|S&Ls)|(?i:cap)" + _APOS + r"(?i:n)"
     r"|(?i:c)" + _APOS + r"(?i:est)", None, None),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None, None),
    (r"[A-Z]*\$|#", None, None),
    (r"[\u00A2\u00A3\u00A4\u00A5\u20A0\u20AC]", None,
     lambda t: {"\u00A2": "cents", "\u00A3": "#"}.get(t, "$") if t != "\u00A5" else t),
    (r"[A-Za-z](?:\.[A-Za-z])*\.", rf"{_SPACENL}+(?:{_ACRO_NEXT}){_SPACENL}", ("acronym",)),
    (_ABBREV1, _SENTEND, ("dup", 1)),
    (_ABBREV1, None, None),
    (rf"{_ABBREV4}\.", None, None),
    (_ABBREV4, _SPACE, None),
    (_ACRO, _SPACENL, None),
    (rf"{_APOS}[0-9][0-9]", _SPACENL, None),
    (rf"{_WORD}\.", r"[,;:]", None),
    (r'"|&quot;', r"[A-Za-z0-9$]", lambda t: _latex_quote(t, True)),
    (r'"|&quot;', None, lambda t: _latex_quote(t, False)),
    (r"\+", None, None),
    (r"[%&\u2030\u2031]", None, None),
    (r"~|\^", None, None),
    (r"\||\\", None, ""),
    (r"\[|&lt;", None, "-LSB-"),
    (r"\]|&gt;", None, "-RSB-"),
    (r"<", None, "<"),
    (r">", None, ">"),
    (r"\{", None, "-LCB-"),
    (r"\}", None, "-RCB-"),
    (r"\(", None, "-LRB-"),
    (r"\)", None, "-RRB-"),
    (r"-+", None, lambda t: "--" if 2 <= len(t) <= 4 else t),
    (r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", None, "..."),
    (r"@+|#+|_+", None, None),
    (r"\*+", None, None),
    (r"[,;:]", None, None),
    (r"[?!]+", None, None),
    (r"[.\u00A1\u00BF]", None, None),
    (r"=", None, None),
    (r"/", None, None),
    (rf"{_HTHING}\.", r"[,;:]", None),
    (_HTHING, None, None),
    (rf"{_THING}\.", r"[,;:]", None),
    (_THING, None, None),
    (r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+", None, None),
    (r"'", r"[A-Za-z][^ \t\n\r\u00A0]", lambda t: _latex_quote(t, True)),
    (_REDAUX, None, lambda t: _latex_quote(t, False)),
    (_QUOTES, None, lambda t: _latex_quote(t, False)),
    (_MISC, None, None),
    (rf"{_SPACENL}+|[\u200B\u200E\u200F\uFEFF\x00]", None, ""),
]
_COMPILED = [(re.compile(tok if la is None else f"(?:{tok})(?=(?P<la>{la}))"), la is not None, act)
             for tok, la, act in _RULES]
_FIRST_CHAR_RULES: dict[str, list[int]] = {}  # rules that can start at a given character (filled lazily)
_PLAIN = re.compile(r"[A-Za-z]+")          # chunks no rule splits further, the common case


def _lex(line: str) -> list[str]:
    """PTB tokens of one line, original case (the caller lower-cases, as -lowerCase does after lexing)."""
    tokens: list[str] = []
    pos, end = 0, len(line)
    while pos < end:
        char = line[pos]
        if char == " ":
            pos += 1
            continue
        plain = _PLAIN.match(line, pos)
        if plain and (plain.end() == end or line[plain.end()] == " ") and plain.group().lower() not in _SPECIAL_WORDS:
            tokens.append(plain.group())
            pos = plain.end()
            continue
        best_len, best = 0, None
        for index, (regex, has_la, action) in enumerate(_COMPILED):
            match = regex.match(line, pos)
            if match is None:
                continue
            total = match.end() - pos + (len(match.group("la")) if has_la else 0)
            if total > best_len:
                best_len, best = total, (match.group(0), action)
        if best is None:  # untokenizable character: PTBLexer deletes it (with one warning on stderr)
            pos += 1
            continue
        text, action = best
        consumed = len(text)
        if isinstance(action, tuple) and action[0] == "push":
            consumed -= action[1]
            out: str | None = text[:consumed]
        elif isinstance(action, tuple) and action[0] == "acronym":  # "U.S. The" -> "U.S." "."; "I. The" -> "I" "."
            consumed -= 1
            out = text[:-1] if len(text) == 2 else text
        elif isinstance(action, tuple) and action[0] == "dup":
            consumed -= action[1]
            out = text
        elif action is None:
            out = text
        elif isinstance(action, str):
            out = action
        else:
            out = action(text)
        if out:
            tokens.append(out)
        pos += max(consumed, 1)
    return tokens


# Plain words the rules above still split or change ("cannot" -> "can not", "gonna" -> "gon na").
_SPECIAL_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


@functools.lru_cache(maxsize=1 << 18)
def ptb_tokenize(caption: str) -> str:
    """coco-caption's tokenisation of one caption, in Python: lower-cased PTB tokens minus punctuation.

    Reproduces ``PTBTokenizer().tokenize`` (Stanford PTBTokenizer 3.4.1 -preserveLines -lowerCase, then
    removal of :data:`PUNCTUATIONS`), e.g. ``"A dog's ball isn't red."`` -> ``"a dog 's ball is n't red"``.
    Cached: references are tokenised once per process, not every epoch.
    """
    # The wrapper joins captions with newlines; the newline is trailing context for some rules ("I'll").
    line = caption.replace("\n", " ").replace("\r", " ") + "\n"
    return " ".join(tok for tok in (t.lower() for t in _lex(line)) if tok not in PUNCTUATIONS)



def java_ptb_tokenize(captions: Sequence[str], java: str) -> list[str]:
    """coco-caption's tokenisation by the real Stanford PTBTokenizer: one Java call for all captions.

    The same command line as ``pycocoevalcap``'s ``PTBTokenizer``, but the temporary file goes to the system
    temp folder (the wrapper writes it into site-packages, which may be read-only) and the output is checked
    to have one line per caption (a silent misalignment would pair hypotheses with the wrong images).
    """
    jar = Path(_ptb.__file__).parent / _ptb.STANFORD_CORENLP_3_4_1_JAR
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(c.replace("\n", " ").replace("\r", " ") for c in captions).encode())
    try:
        result = subprocess.run([java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                                 "-preserveLines", "-lowerCase", handle.name], capture_output=True, check=True)
    finally:
        os.remove(handle.name)
    lines = result.stdout.decode().split("\n")
    if len(lines) > len(captions) and not any(lines[len(captions):]):
        lines = lines[:len(captions)]
    if len(lines) > len(captions):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(captions)} captions")
    lines += [""] * (len(captions) - len(lines))  # trailing empty captions come back as nothing
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in PUNCTUATIONS) for line in lines]
